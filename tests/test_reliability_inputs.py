"""The adversarial pass: lost work, small inputs of unbounded cost, crashes and silent nonsense, adapters.

Every case runs on the tiny model of tests/tinyfiles.py (or the shipped weights/tiny), single-threaded. Cases that
would allocate without bound if the code regressed run under an address-space limit (`memory_limit`: RLIMIT_AS at
what the process uses now + 1 GiB) and an alarm (`deadline`), so a regression fails the test instead of exhausting
the machine or hanging. The figures of docs/reliability.md come from here:

    python -m pytest tests/test_reliability_inputs.py
"""
import contextlib
import copy
import errno
import json
import os
import re
import resource
import shutil
import signal
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import lora
import minisd
import sample
import train
from minisd import CheckpointError
from minisd.checkpoint import read_pickle
from tinyfiles import images, one_line_exit, tiny, train_argv, train_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # the tiny U-Net's first to_q: 32 -> 32
Q_DIFFUSERS = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = Q.replace("to_q", "to_k")


def sample_argv(tiny, out, *extra):
    return ["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--steps", "1", "--height", "16",
            "--width", "16", "--out", str(out), *map(str, extra)]


def _vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@contextlib.contextmanager
def memory_limit(extra=1 << 30):
    """RLIMIT_AS at the process's present address space + `extra`: a runaway allocation fails (MemoryError or a
    clean refusal) instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def deadline(seconds=30):
    """SIGALRM after `seconds`: a blocking open or read (a FIFO) becomes a failure, not a hang."""
    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def leftovers(folder):
    """Temporary files of atomic_save left behind."""
    return [p.name for p in Path(folder).rglob(".tmp*")]


# ------------------------------------------------------------------------------------------ 1. lost work or data

def test_out_never_replaces_the_base_model_or_another_file(tiny, images, tmp_path):
    base = tmp_path / "base.safetensors"
    shutil.copy(tiny["safetensors"], base)
    before = base.read_bytes()
    argv = train_argv(tiny, images, base, "--steps", 1)
    argv[1] = str(base)
    assert f"--out {base}: is the --ckpt base model" in one_line_exit(train.main, argv)
    other = tmp_path / "notes.safetensors"  # any file that is no kohya adapter (here: not even safetensors)
    other.write_text("my notes")
    message = one_line_exit(train.main, train_argv(tiny, images, other, "--steps", 1))
    assert "exists and is not a kohya adapter file" in message
    assert base.read_bytes() == before and other.read_text() == "my notes"
    adapter = tmp_path / "adapter.safetensors"  # an adapter at --out is replaced, as before
    shutil.copy(tiny["adapter"], adapter)
    train.main(train_argv(tiny, images, adapter, "--steps", 1))
    assert load_file(str(adapter)).keys() != load_file(str(tiny["adapter"])).keys()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_sample_writes_its_png_atomically(tiny, tmp_path, monkeypatch):
    out = tmp_path / "x.png"
    Image.new("RGB", (4, 4), "red").save(out)
    before = out.read_bytes()

    def torn_write(self, fp, *args, **kwargs):  # half a PNG reaches the file, then the disk is full
        Path(fp).write_bytes(before[:20])
        enospc()
    monkeypatch.setattr(Image.Image, "save", torn_write)
    message = one_line_exit(sample.main, sample_argv(tiny, out))
    assert message == f"error: {out}: not written (No space left on device)"
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def fail_for(name_part, real):
    """A writer that raises ENOSPC when the temporary file for a name containing `name_part` is written."""
    def write(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, Path)))
        if name_part in Path(path).name:
            enospc()
        return real(*args, **kwargs)
    return write


def test_disk_full_at_the_final_adapter_keeps_the_run(tiny, images, tmp_path, monkeypatch):
    out = tmp_path / "a.safetensors"
    argv = train_argv(tiny, images, out, "--steps", 3)
    monkeypatch.setattr(lora, "save", fail_for("-a.safetensors", lora.save))  # the final file only
    message = one_line_exit(train.main, argv)
    state = tmp_path / "a-step000003.state.pt"
    assert message == (f"error: {out}: not written (No space left on device); saved {state} instead: run the same "
                       f"command with --resume to write a.safetensors")
    assert not out.exists() and leftovers(tmp_path) == [] and read_pickle(state)["step"] == 3
    monkeypatch.undo()
    train.main(argv + ["--resume"])  # after space was freed: writes the adapter the run trained
    reference = train.main(train_argv(tiny, images, tmp_path / "ref" / "a.safetensors", "--steps", 3))
    a, b = load_file(str(out)), load_file(str(reference))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)


def test_disk_full_at_a_step_checkpoint_leaves_whole_pairs(tiny, images, tmp_path, monkeypatch):
    out = tmp_path / "a.safetensors"
    monkeypatch.setattr(torch, "save", fail_for("a-step000002.state.pt", torch.save))
    message = one_line_exit(train.main, train_argv(tiny, images, out, "--steps", 4, "--save-every", 1))
    good = tmp_path / "a-step000001.state.pt"
    assert message == (f"error: {tmp_path / 'a-step000002.state.pt'}: not written (No space left on device); "
                       f"the last checkpoint is {good}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-step000001.safetensors", "a-step000001.state.pt"]


def test_a_real_file_size_limit_is_a_clean_line(tiny, images, tmp_path):
    """The same with the kernel refusing the write (RLIMIT_FSIZE: EFBIG, like a full disk) inside safetensors' and
    torch's own writers, in a train.py process of its own."""
    out = tmp_path / "a.safetensors"
    log = tmp_path / "log"
    limit_file_size = ("import resource, signal\n"  # the write fails with EFBIG instead of killing the process
                       "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                       "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))")
    run = train_process(train_argv(tiny, images, out, "--steps", 2, "--rank", 16), log, setup=limit_file_size)
    assert run.wait() == 1
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: {out}: not written (") and "no checkpoint either" in last, last
    assert not out.exists() and leftovers(tmp_path) == []


def wait_for(condition, seconds=120):
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < seconds, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(sig, tiny, images, tmp_path, capsys):
    out, log = tmp_path / "a.safetensors", tmp_path / "log"
    argv = train_argv(tiny, images, out, "--steps", 400, "--save-every", 2, "--lr", "1e-2", "--schedule", "constant")
    run = train_process(argv, log)
    wait_for(lambda: train.state_files(out))  # training has begun
    run.send_signal(sig)
    code = run.wait()
    last = log.read_text().strip().splitlines()[-1]
    m = re.fullmatch(rf"error: {sig.name} at step (\d+): saved (\S+); to continue, run the same command with --resume",
                     last)
    assert code == 1 and m, (code, last)
    step, state = int(m[1]), Path(m[2])
    assert 2 <= step < 400 and state == train.state_files(out)[-1] and read_pickle(state)["step"] == step
    assert leftovers(tmp_path) == [] and not (tmp_path / ".a.safetensors.lock").exists()
    # resumed for 2 more steps, it ends as an uninterrupted run of as many steps (a constant schedule: the same lr)
    argv[argv.index("--steps") + 1] = str(step + 2)
    capsys.readouterr()
    train.main(argv + ["--resume"])
    assert f"trained {step + 2} steps, 2 after the resume at {step}, (" in capsys.readouterr().out  # its images/s too
    reference = train.main(train_argv(tiny, images, tmp_path / "ref" / "a.safetensors", "--steps", step + 2,
                                      "--lr", "1e-2", "--schedule", "constant"))
    a, b = load_file(str(out)), load_file(str(reference))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a)


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tiny, images, tmp_path):
    out = tmp_path / "a.safetensors"
    argv = train_argv(tiny, images, out, "--steps", 400, "--save-every", 2)
    run = train_process(argv, tmp_path / "log")
    pid, lock = run.pid, tmp_path / ".a.safetensors.lock"
    wait_for(lambda: train.state_files(out))
    message = one_line_exit(train.main, train_argv(tiny, images, out, "--steps", 1))
    assert message == f"error: --out {out}: another train.py run (PID {pid}) is writing it (lock file {lock})"
    run.kill()  # SIGKILL, no clean-up: the lock file stays, with the dead run's PID
    run.wait()
    assert lock.read_text().strip() == str(pid)
    assert train.main(train_argv(tiny, images, out, "--steps", 1)) == out and not lock.exists()


def test_resume_matches_its_own_out_name_and_sorts_by_step(tmp_path):
    out = tmp_path / "r[1]*?.safetensors"
    for name in ("r1x-step000009.state.pt", "r[1]*?-step999999.state.pt", "r[1]*?-step1000000.state.pt",
                 "r[1]*?-step000002.state.pt", "r[1]*?-step5.state.pt.nonfinite"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in train.state_files(out)] == ["r[1]*?-step000002.state.pt", "r[1]*?-step999999.state.pt",
                                                        "r[1]*?-step1000000.state.pt"]
    assert train._resume_file("latest", out).name == "r[1]*?-step1000000.state.pt"


def test_resume_with_other_settings_warns_naming_each(tiny, images, tmp_path):
    out = tmp_path / "a.safetensors"
    train.main(train_argv(tiny, images, out, "--steps", 2, "--save-every", 1))
    other = tmp_path / "other"
    shutil.copytree(images, other)
    argv = train_argv(tiny, other, out, "--steps", 3, "--lr", "0.01", "--batch", 1,
                      "--resume", tmp_path / "a-step000001.state.pt")
    with pytest.warns(UserWarning) as caught:
        train.main(argv)
    changed = sorted(re.search(r": (--[\w-]+) was", str(w.message))[1] for w in caught if " was " in str(w.message))
    assert changed == ["--batch", "--data", "--lr"]
    assert any("--lr was 0.001, now 0.01; continuing with 0.01" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------ 2. small inputs, unbounded cost

def deflated_zeros(n):
    """A raw deflate stream of n (a multiple of 1 MiB) zero bytes, about n / 1000 bytes: a full flush makes each
    MiB's compressed piece independent of the others, so one piece repeated is the stream."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = z.compress(bytes(1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    return piece * (n >> 20) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # + an empty final block


def write_zip(path, records):
    """records [(name, raw bytes, method (0 stored, 8 deflated), declared size)] -> a zip file (CRCs left 0)."""
    body, central = b"", b""
    for name, data, method, size in records:
        n = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, 0, len(data), size, len(n), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(body)) + n
        body += b"PK\x03\x04" + fields + n + data
    path.write_bytes(body + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(records), len(records),
                                                                 len(central), len(body), 0))


def zip_bomb(src, dst, inflated):
    """A copy of a torch zip checkpoint whose first tensor record is deflated zeros that inflate to `inflated`."""
    with zipfile.ZipFile(src) as z:
        records = [(i.filename, z.read(i), 0, i.file_size) for i in z.infolist()]
    records = [(n, deflated_zeros(inflated), 8, inflated) if n.endswith("/data/0") else (n, d, m, size)
               for n, d, m, size in records]
    write_zip(dst, records)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tiny, tmp_path):
    state = tmp_path / "ok.pt"
    torch.save({"x": torch.zeros(4)}, state)
    bomb = tmp_path / "bomb.pt"
    zip_bomb(state, bomb, 2 << 30)
    assert bomb.stat().st_size < 4 << 20
    with memory_limit(), pytest.raises(CheckpointError) as e:
        read_pickle(bomb)
    assert re.fullmatch(re.escape(str(bomb)) + r": not a readable checkpoint \(ValueError: its zip records declare \d+ "
                        r"bytes "
                        r"in a file of \d+: a zip bomb, not a checkpoint\)", str(e.value)), str(e.value)
    assert read_pickle(state)["x"].shape == (4,)  # torch's own records (stored) pass


def edited(tmp_path, part, edit):
    """weights/tiny (the shipped diffusers folder) as links, with part's config file replaced: its dict updated with
    `edit`, or made by `edit(path)`."""
    folder = tmp_path / "model"
    shutil.copytree(ROOT / "weights" / "tiny", folder, copy_function=os.symlink)
    path = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    cfg = json.loads(path.read_text())
    path.unlink()  # the link, not the shipped file
    if callable(edit):
        edit(path)
    else:
        path.write_text(json.dumps({**cfg, **edit}))
    return folder, path


def fifo(path):
    os.mkfifo(path)


def dev_zero(path):
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("part, edit, message", [
    ("unet", {"layers_per_block": 10 ** 6}, "layers_per_block = 1000000 is outside"),
    ("unet", {"block_out_channels": [64, 10 ** 9]}, "block_out_channels = .* is outside"),
    ("unet", {"cross_attention_dim": float("nan")}, "cross_attention_dim = nan is outside"),
    ("vae", {"layers_per_block": 10 ** 6}, "layers_per_block = 1000000 is outside"),
    ("vae", {"latent_channels": 10 ** 7}, "latent_channels = 10000000 is outside"),
    ("scheduler", {"num_train_timesteps": 3 * 10 ** 9}, "num_train_timesteps = 3000000000 is outside"),
    ("text_encoder", {"num_hidden_layers": 10 ** 6}, "num_hidden_layers = 1000000 is outside"),
    ("text_encoder", {"hidden_size": 10 ** 6}, "hidden_size = 1000000 is outside"),
    ("text_encoder", {"hidden_act": "swish"}, "hidden_act = swish is not one of CLIP's"),
    ("text_encoder", {"hidden_act": ["gelu"]}, r"hidden_act = \['gelu'\] is not one of CLIP's"),
    ("text_encoder", {"num_attention_heads": 7}, "hidden_size 128 is not a multiple of num_attention_heads 7"),
    ("unet", fifo, "unreadable config .*not a regular file"),
    ("unet", dev_zero, "unreadable config .*not a regular file"),
    ("text_encoder", fifo, "unreadable config .*not a regular file"),
    ("vae", lambda p: p.write_bytes(b"{" + b" " * (2 << 20) + b"}"),
     "unreadable config .*more than a config file may have"),
], ids=["unet layers 1e6", "unet channels 1e9", "unet nan", "vae layers 1e6", "vae latents 1e7", "timesteps 3e9",
        "text layers 1e6", "text width 1e6", "text swish", "text act list", "text heads 7", "unet fifo", "unet /dev/zero", "text fifo", "vae 2 MB config"])
def test_config_files_are_bounded(part, edit, message, tmp_path):
    folder, path = edited(tmp_path, part, edit)
    with memory_limit(), deadline(30), pytest.raises(CheckpointError) as e:
        minisd.load(folder)
    assert re.search(re.escape(str(path)) + ": .*" + message, str(e.value)) and "\n" not in str(e.value), str(e.value)


def write(name, text):
    return lambda folder: (folder / name).write_text(text)


@pytest.mark.parametrize("edit, file, message", [
    (write("merges.txt", "#version: 0.2\na zz\n"), "merges.txt", "unreadable tokenizer"),
    (write("merges.txt", "a b c\n"), "merges.txt", "a line that is not two tokens"),
    (write("vocab.json", "[1, 2]"), "vocab.json", r"not a \{token: id\} object"),
    (write("vocab.json", "{"), "", "unreadable tokenizer"),
    (write("tokenizer.json", "{}"), "tokenizer.json", "unreadable tokenizer"),
    (write("tokenizer_config.json", "[]"), "", "is not a JSON object"),
    (write("special_tokens_map.json", '{"eos_token": ["x"]}'), "", "special token .* not a string"),
    (write("special_tokens_map.json", '{"pad_token": "<none>"}'), "", "special tokens not in its vocabulary: <none>"),
    (lambda folder: ((folder / "merges.txt").unlink(), os.mkfifo(folder / "merges.txt")), "merges.txt",
     "not a regular file"),
], ids=["merge out of vocab", "merge of three", "vocab list", "vocab cut", "empty tokenizer.json", "config list",
        "special list", "pad not in vocab", "merges fifo"])
def test_tokenizer_folders_are_checked(tiny, edit, file, message, tmp_path):
    """A broken tokenizer folder is one line naming the folder or the file, whichever file it is."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], folder)
    edit(folder)
    with deadline(30), pytest.raises(CheckpointError) as e:
        minisd.load(tiny["safetensors"], tokenizer=folder)
    where = re.escape(str(folder / file) if file else str(folder))
    assert re.search(where + ": .*" + message, str(e.value)) and "\n" not in str(e.value), str(e.value)


def test_special_files_and_huge_images_in_the_data_folder_are_skipped(tiny, images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    os.mkfifo(data / "x.png")
    (data / "zero.png").symlink_to("/dev/zero")
    wide = data / "wide.png"
    Image.new("L", (60000, 1)).save(wide)  # 316 bytes; resized as it was, 16 x 960000 pixels
    with memory_limit(), deadline(60), pytest.warns(UserWarning) as caught:
        out = train.main(train_argv(tiny, data, tmp_path / "a.safetensors", "--steps", 1))
    skipped = {Path(str(w.message).split(":")[0]).name: str(w.message) for w in caught if "skipped" in str(w.message)}
    assert sorted(skipped) == ["wide.png", "x.png", "zero.png"] and out.is_file()
    assert "aspect ratio beyond 8:1" in skipped["wide.png"]
    assert "not a regular file" in skipped["x.png"] and "not a regular file" in skipped["zero.png"]


def test_a_huge_caption_and_huge_repeat_counts_are_refused(tiny, images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    caption = data / "0.txt"
    with open(caption, "wb") as f:  # 100 MB, sparse: costs no disk
        f.truncate(100 << 20)
    with memory_limit(), deadline(60):
        message = one_line_exit(train.main, train_argv(tiny, data, tmp_path / "a.safetensors", "--steps", 1))
    assert message == f"error: {caption}: {100 << 20} bytes, more than a caption file may have (65536)"
    caption.unlink()
    (data / "1000000000_sks").mkdir()
    shutil.copy(images / "0.png", data / "1000000000_sks" / "0.png")
    with memory_limit(), deadline(60):
        message = one_line_exit(train.main, train_argv(tiny, data, tmp_path / "a.safetensors", "--steps", 1))
    assert message == f"error: {data / '1000000000_sks'}: 1000000000 repeats (the folder's 'N_' prefix); at most 1000"


@pytest.mark.parametrize("script, argv, message", [
    ("sample", ["--height", "8192", "--width", "8192"], "--height 8192 --width 8192 --n 1: needs at least"),
    ("sample", ["--height", "2048", "--width", "2048"], "--height 2048 --width 2048 --n 1: needs at least"),
    ("sample", ["--n", "100000", "--height", "1024", "--width", "1024"], "--n 100000: needs at least"),
    ("train", ["--resolution", "8192"], "--resolution 8192 --batch 2 --rank 8: needs at least"),
    ("train", ["--batch", "100000"], "--batch 100000 --rank 8: needs at least"),
    ("train", ["--rank", str(10 ** 8)], "--rank 100000000: needs at least"),
    ("train", ["--te-rank", str(10 ** 8)], "--rank 8 --te-rank 100000000: needs at least"),
])
def test_sizes_beyond_the_memory_are_refused_before_the_work(script, argv, message, tiny, images, tmp_path):
    """Refused from an estimate, in one line; under an address-space limit of 1 GiB more than the process uses (the
    2048 case asks for more than that and less than most machines have: the limit is what is available)."""
    if script == "sample":
        full = sample_argv(tiny, tmp_path / "x.png", "--device", "cpu") + argv  # the limit bounds the CPU
        main = sample.main
    else:
        full = train_argv(tiny, images, tmp_path / "a.safetensors", "--steps", 1) + argv
        main = train.main
    with memory_limit(), deadline(60):
        assert message in one_line_exit(main, full)
    assert not any(p.suffix in (".png", ".safetensors") for p in tmp_path.iterdir())


def test_n_is_sampled_in_chunks_the_first_as_one_call(tiny, tmp_path):
    """--n 10: two sampler calls (8 + 2); the first 8 images are those of --n 8 (same seed, same batch)."""
    sample.main(sample_argv(tiny, tmp_path / "a.png", "--n", 10))
    sample.main(sample_argv(tiny, tmp_path / "b.png", "--n", 8))
    pixels = lambda p: np.asarray(Image.open(p), dtype=np.int16)  # noqa: E731
    assert sorted(p.name for p in tmp_path.glob("a-*.png")) == [f"a-{i:03d}.png" for i in range(10)]
    assert all(np.abs(pixels(tmp_path / f"a-{i:03d}.png") - pixels(tmp_path / f"b-{i:03d}.png")).max() <= 1
               for i in range(8))
    assert "Seed: 1" in Image.open(tmp_path / "a-009.png").info["parameters"]  # the second call: --seed + 1
    assert Image.open(tmp_path / "a.png").size == (4 * 16, 3 * 16)


# ---------------------------------------------------------------------------- 3. crashes and silent nonsense

@pytest.mark.parametrize("argv, message", [
    (["--eta", "2"], "--eta must be in [0, 1], got 2.0"),
    (["--eta", "-1"], "--eta must be in [0, 1], got -1.0"),
    (["--eta", "nan"], "--eta must be in [0, 1], got nan"),
    (["--guidance", "nan"], "--guidance must be >= 0 (and finite), got nan"),
    (["--guidance", "inf"], "--guidance must be >= 0 (and finite), got inf"),
    (["--lora", "ADAPTER:nan"], "weight nan is not a finite number"),
    (["--lora", "ADAPTER:1:in0=inf"], "block weight IN01=inf is not a finite number"),
    (["--lora", "ADAPTER:1:" + ",".join(["1"] * 16 + ["1e999"])], "block weight OUT11=inf is not a finite number"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--seed", str(2 ** 64)], f"--seed must be a 64-bit number (0 .. 2**64-1), got {2 ** 64}"),
])
def test_sample_flags_are_refused_naming_the_flag(argv, message, tiny, tmp_path):
    bad = tmp_path / "bad.ckpt"  # never read: the flags are refused first
    bad.write_bytes(b"")
    argv = [a.replace("ADAPTER", str(tiny["adapter"])) for a in argv]
    out = one_line_exit(sample.main, ["--ckpt", str(bad), "--out", str(tmp_path / "o.png"), *argv])
    assert message in out and "bad.ckpt" not in out, out


def test_device_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = one_line_exit(sample.main, ["--device", "cuda", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o.png")])
    assert out == "error: --device cuda: CUDA is not available on this machine (use --device cpu)"
    out = one_line_exit(train.main, ["--device", "cuda", "--ckpt", str(tmp_path),
                                     "--out", str(tmp_path / "o.safetensors")])
    assert out == "error: --device cuda: CUDA is not available on this machine (use --device cpu)"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1000"], "--steps must be in 1..999 for this model's 1000-step schedule, got 1000"),
    (["--height", "40", "--width", "64"], "--height and --width must be multiples of 16 for this model (the VAE's 2x "
     "and the U-Net's 8x downsampling), got 40x64"),  # minisd-tiny (the default --ckpt)
])
def test_sample_flags_the_model_decides(argv, message, tmp_path):
    argv = ["--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "o.png"), *argv]
    out = one_line_exit(sample.main, argv)
    assert out == f"error: {message}"


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "in0=inf"], "--blocks in0=inf: dims: the rank of IN01 must be a whole number >= 0, got 'inf'"),
    (["--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),
    (["--te-alpha", "inf"], "--te-alpha must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--noise-offset=-inf"], "--noise-offset must be a finite number >= 0, got -inf"),
    (["--conv-alpha", "nan"], "--conv-alpha must be a finite number > 0, got nan"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--seed", str(2 ** 64)], f"--seed must be in 0 .. 2**64-1, got {2 ** 64}"),
    (["--sample-prompts", "BIN.txt"], "--sample-prompts BIN.txt: not a UTF-8 text file"),
])
def test_train_flags_are_refused_naming_the_flag(argv, message, images, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    (tmp_path / "BIN.txt").write_bytes(bytes(range(256)) * 4)
    argv = [a.replace("BIN.txt", str(tmp_path / "BIN.txt")) for a in argv]
    message = message.replace("BIN.txt", str(tmp_path / "BIN.txt"))
    out = one_line_exit(train.main, ["--ckpt", str(bad), "--data", str(images), "--prompt", "x", "--quiet",
                                      "--out", str(tmp_path / "a.safetensors"), *argv])
    assert message in out and "bad.ckpt" not in out, out


def test_train_resolution_the_model_cannot_halve(images, tmp_path):
    out = one_line_exit(train.main, ["--data", str(images), "--prompt", "x", "--quiet", "--resolution", "40",
                                     "--steps", "1", "--out", str(tmp_path / "a.safetensors")])
    assert out == ("error: --resolution must be a multiple of 16 for this model (the VAE's 2x and the U-Net's 8x "
                   "downsampling), got 40")  # minisd-tiny (the default --ckpt)


def test_seeds_beyond_the_derived_seed_range_train(tiny, images, tmp_path):
    """--seed 2**63: the epoch order's derived seed (seed * 1000003 + epoch) wraps at 2**64 instead of overflowing."""
    out = train.main(train_argv(tiny, images, tmp_path / "a.safetensors", "--steps", 3, "--seed", 2 ** 63))
    assert out.is_file()


@pytest.fixture(scope="module")
def good_state(tiny, images, tmp_path_factory):
    """A state saved after step 1 of a 2-step run, and the argv that resumes from it."""
    folder = tmp_path_factory.mktemp("state")
    argv = train_argv(tiny, images, folder / "a.safetensors", "--steps", 2, "--save-every", 1)
    train.main(argv)
    other = train_argv(tiny, images, folder / "r4" / "a.safetensors", "--steps", 2, "--save-every", 1, "--rank", 4)
    train.main(other)
    return read_pickle(folder / "a-step000001.state.pt"), read_pickle(folder / "r4" / "a-step000001.state.pt"), argv


@pytest.mark.parametrize("name, damage, message", [
    ("optimizer of rank 4", lambda s, r4: {**s, "optimizer": r4["optimizer"]}, "optimizer state of other shapes"),
    ("a list", lambda s, r4: [s], "not a train.py state \\(no step, adapter"),
    ("step a string", lambda s, r4: {**s, "step": "5"}, "not a train.py state \\(step '5'\\)"),
    ("step negative", lambda s, r4: {**s, "step": -3}, "not a train.py state \\(step '-3'\\)"),
    ("bad RNG state", lambda s, r4: {**s, "rng": torch.zeros(3, dtype=torch.uint8)},
     "not a usable --resume state \\(RuntimeError"),
    ("no scaler", lambda s, r4: {k: v for k, v in s.items() if k != "scaler"}, "not a train.py state \\(no scaler\\)"),
    ("history of strings", lambda s, r4: {**s, "history": ["abcd"]}, "history rows are not"),
])
def test_damaged_resume_states_are_one_line_naming_the_file(name, damage, message, good_state, tiny, images, tmp_path):
    state, r4, argv = good_state
    path = tmp_path / "damaged.state.pt"
    torch.save(damage(copy.deepcopy(state), r4), path)
    argv = train_argv(tiny, images, tmp_path / "a.safetensors", "--steps", 2, "--resume", path)
    out = one_line_exit(train.main, argv)
    assert re.search(re.escape(str(path)) + ".*" + message, out), out


# --------------------------------------------------------------------------------------------------- 4. adapters

def write_adapter(path, modules, metadata=None):
    save_file({f"{m}.{k}": v.contiguous() for m, parts in modules.items() for k, v in parts.items()}, str(path),
              metadata=metadata)
    return path


def factors(seed, rank=2, n=32):
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(rank, n, generator=g) * 0.1,
            "lora_up.weight": torch.randn(n, rank, generator=g) * 0.1}


def test_one_module_named_twice_changes_nothing_and_names_the_file(tiny, tmp_path):
    sd = copy.deepcopy(tiny["model"])
    path = write_adapter(tmp_path / "twice.safetensors", {K: factors(0), Q: factors(1), Q_DIFFUSERS: factors(2)})
    types = [type(m) for m in sd.unet.modules()]
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {Q} and {Q_DIFFUSERS} name the same module")):
        lora.load(path, sd.unet, sd.text_encoder)
    assert lora.adapter_names(sd.unet, sd.text_encoder) == [] and [type(m) for m in sd.unet.modules()] == types


def test_a_failure_while_adding_leaves_the_model_unchanged(tiny, tmp_path, monkeypatch):
    """load's promise for any failure after the file was read (here: the second module cannot be added)."""
    sd = copy.deepcopy(tiny["model"])
    path = write_adapter(tmp_path / "x.safetensors", {K: factors(0), Q: factors(1)})
    calls, real = [], lora.formats.add_adapter_at

    def add(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(lora.formats, "add_adapter_at", add)
    types = [type(m) for m in sd.unet.modules()]
    with pytest.raises(RuntimeError, match="out of memory"):
        lora.load(path, sd.unet, sd.text_encoder)
    assert lora.adapter_names(sd.unet, sd.text_encoder) == [] and [type(m) for m in sd.unet.modules()] == types


def test_a_duplicate_factor_is_refused(tiny, tmp_path):
    sd = copy.deepcopy(tiny["model"])
    g = factors(0)
    path = tmp_path / "dup.safetensors"
    save_file({f"{Q_DIFFUSERS}.lora_A.weight": g["lora_down.weight"],
               f"{Q_DIFFUSERS}.lora.down.weight": g["lora_down.weight"] * 2,
               f"{Q_DIFFUSERS}.lora_B.weight": g["lora_up.weight"]}, str(path))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {Q_DIFFUSERS} has two down tensors")):
        lora.load(path, sd.unet, sd.text_encoder)
    assert lora.adapter_names(sd.unet, sd.text_encoder) == []


@pytest.mark.parametrize("name", ["train", "forward", "to", "state_dict", "training", "keys"])
def test_adapter_names_that_are_module_attributes_work(name, tiny, tmp_path):
    sd = copy.deepcopy(tiny["model"])
    path = tmp_path / f"{name}.safetensors"
    shutil.copy(tiny["adapter"], path)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 64)
    with torch.no_grad():
        base = sd.unet(x, t, ctx)
        lora.load(path, sd.unet, sd.text_encoder)
        assert lora.adapter_names(sd.unet, sd.text_encoder) == [name]
        adapted = sd.unet(x, t, ctx)
        lora.set_weight(sd.unet, name, 0.5, text_encoder=sd.text_encoder)
        lora.merge(sd.unet, name, sd.text_encoder)
        lora.unmerge(sd.unet, name, sd.text_encoder)
        lora.set_weight(sd.unet, name, 1.0, text_encoder=sd.text_encoder)
        assert torch.allclose(sd.unet(x, t, ctx), adapted, atol=1e-5)
        lora.save(tmp_path / "again.safetensors", sd.unet, sd.text_encoder, name)
        a, b = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tensors copied, not computed
        assert callable(sd.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.adapters.train)  # still the method
        lora.remove(sd.unet, name, sd.text_encoder)
        assert torch.allclose(sd.unet(x, t, ctx), base, atol=1e-6)
        assert lora.adapter_names(sd.unet, sd.text_encoder) == []


def test_two_adapters_of_one_name_from_two_folders(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(tiny["adapter"], tmp_path / "a" / "style.safetensors")
    write_adapter(tmp_path / "b" / "style.safetensors", {Q: factors(3)})
    sd = copy.deepcopy(tiny["model"])
    files = [sample.parse_lora(f"{tmp_path / 'a' / 'style.safetensors'}"),
             sample.parse_lora(f"{tmp_path / 'b' / 'style.safetensors'}:0.5")]
    assert sample.load_adapters(sd, files, torch.float32) == ["style", "style_2"]
    assert lora.adapter_names(sd.unet, sd.text_encoder) == ["style", "style_2"]
    sample.main(sample_argv(tiny, tmp_path / "x.png", "--lora", tmp_path / "a" / "style.safetensors",
                            "--lora", f"{tmp_path / 'b' / 'style.safetensors'}:0.5"))
    assert (tmp_path / "x.png").is_file()
