"""What train.py and sample.py share about their command line: the researcher's errors as one line."""
import contextlib
import sys


@contextlib.contextmanager
def one_line_errors(errors, debug=False):
    """`errors` raised inside end the process with one line, `error: <message>` (exit code 1); with `debug` the
    exception goes on, with its traceback. Only around checking flags and reading or writing files: an error of the
    model's own code keeps its traceback."""
    try:
        yield
    except errors as e:
        if debug:
            raise
        sys.exit(f"error: {e}")
