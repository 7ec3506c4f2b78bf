"""Files that must not cost more than they say, and writes that never leave a half-written file.

- `read_regular`: a regular file only (not a FIFO, which would block forever, nor a link to /dev/zero, which never
  ends), and at most `limit` bytes.
- `check_zip`: a torch zip checkpoint whose records declare more bytes than the file could hold stored is refused
  before anything is inflated (torch writes its records stored, uncompressed: a record that inflates 1000-fold is
  a zip bomb, not a checkpoint).
- `atomic_save`: write beside the target, fsync, rename; a failure (a full disk) leaves the old file or none.
"""
import os
import stat
import zipfile
from pathlib import Path

from safetensors import SafetensorError

ZIP_SLACK = 1 << 20  # zip records may declare up to file size + 1 MiB (headers, rounding); torch's are all stored


def read_regular(path, limit, what="file"):
    """The bytes of `path`, which must be a regular file of at most `limit` bytes; a ValueError naming it if not.
    The file is opened non-blocking (a FIFO neither blocks the open nor the read) and checked on its descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a {what} must be one)")
        if st.st_size > limit:
            raise ValueError(f"{path}: {st.st_size} bytes, more than a {what} may have ({limit})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise ValueError(f"{path}: more than {limit} bytes, more than a {what} may have")
    return data


def check_zip(path):
    """Refuse a zip (torch checkpoint) whose records together declare more than the file's size (+ 1 MiB)."""
    size = Path(path).stat().st_size
    with zipfile.ZipFile(path) as z:
        declared = sum(info.file_size for info in z.infolist())
    if declared > size + ZIP_SLACK:
        raise ValueError(f"its zip records declare {declared} bytes in a file of {size}: a zip bomb, not a checkpoint")


def atomic_save(write, path):
    """Call write(tmp) for a temporary file beside `path`, flush it to the disk, then rename it to `path`: neither a
    killed run, a power loss nor a full disk leaves a half-written file under `path`. A write that fails raises an
    OSError naming `path` (the cause chained), and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the data reaches the disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as a RuntimeError
        raise OSError(f"{path}: not written ({getattr(e, 'strerror', None) or str(e).splitlines()[0]})") from e
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # and the rename itself (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
