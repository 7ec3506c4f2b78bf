"""An error in the model's own code reaches the researcher as a traceback naming the broken code, not as the one
line that train.py and sample.py print for a bad flag or file: a copy of U-Net's transformer block with a bug (a
4-d unpacking of its 3-d tokens, a ValueError like those of a bad file) put in place by a small wrapper script,
which then runs the script's main() in a fresh Python process."""
import os
import subprocess
import sys
from pathlib import Path

from tinyfiles import images, tiny  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """\
import sys
sys.path.insert(0, {root!r})
import minisd.unet
import {script}


def broken_block_forward(self, x, context):
    batch, channels, height, width = x.shape  # the bug: x is (B, tokens, C)
    return x


minisd.unet.BasicTransformerBlock.forward = broken_block_forward
{script}.main(sys.argv[1:])
"""


def run_broken(script, argv, tmp_path):
    """`script`.main(argv) with the broken block, in a subprocess: (exit code, stderr)."""
    wrapper = tmp_path / f"broken_{script}.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), script=script))
    run = subprocess.run([sys.executable, str(wrapper), *map(str, argv)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run.returncode, run.stderr


def assert_traceback_names_the_bug(code, stderr):
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and "Traceback (most recent call last)" in stderr, stderr[-2000:]
    assert "in broken_block_forward" in stderr and "batch, channels, height, width = x.shape" in stderr, stderr[-2000:]
    assert last.startswith("ValueError: not enough values to unpack"), last


def test_train_shows_the_traceback_of_a_broken_layer(tiny, images, tmp_path):
    out = tmp_path / "a.safetensors"
    code, stderr = run_broken("train", ["--ckpt", tiny["safetensors"], "--tokenizer", tiny["tokenizer"],
                                        "--data", images, "--prompt", "a box", "--resolution", 16, "--batch", 2,
                                        "--steps", 1, "--device", "cpu", "--out", out, "--quiet"], tmp_path)
    assert_traceback_names_the_bug(code, stderr)
    assert "error: " not in stderr and not out.exists()
    assert not out.with_name(".a.safetensors.lock").exists()  # the lock is let go as the traceback unwinds


def test_sample_shows_the_traceback_of_a_broken_layer(tiny, tmp_path):
    out = tmp_path / "x.png"
    code, stderr = run_broken("sample", ["--ckpt", tiny["safetensors"], "--tokenizer", tiny["tokenizer"], "--steps", 1,
                                         "--height", 16, "--width", 16, "--device", "cpu", "--out", out], tmp_path)
    assert_traceback_names_the_bug(code, stderr)
    assert "error: " not in stderr and not out.exists()


def test_a_bad_file_is_still_one_line_with_the_broken_layer(tiny, images, tmp_path):
    """The same wrapper with a damaged --ckpt: the file's error comes first, as one line, no traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, stderr = run_broken("train", ["--ckpt", bad, "--tokenizer", tiny["tokenizer"], "--data", images, "--prompt",
                                        "a box", "--resolution", 16, "--steps", 1, "--device", "cpu",
                                        "--out", tmp_path / "a.safetensors", "--quiet"], tmp_path)
    assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a readable safetensors file"), stderr
