"""Hostile and corrupt files, bad images, prompts and flags, interrupted and diverging training runs.

Everything runs on the tiny model of tests/tinyfiles.py (a 1.4 MB checkpoint), single-threaded. The figures of
docs/reliability.md come from here and from tests/test_fuzz.py:

    python -m pytest tests/test_reliability.py tests/test_fuzz.py
    MINISD_KILLS=24 python -m pytest tests/test_reliability.py -k sigkill -s     # more kills (default 4)
"""
import copy
import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
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
from minisd.checkpoint import read_pickle, read_state_dict
from minisd.text import encode_prompts
from minisd.tokenizer import load_tokenizer
from tinyfiles import images, one_line_exit, tiny, train_argv, train_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("MINISD_KILLS", 4))
TE = "cond_stage_model.transformer.text_model."  # the released layout save_single_file writes
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


# ------------------------------------------------------------------------------------------------ 1. files

class Evil:
    """A pickle that runs `fn(arg)` when loaded by a plain unpickler."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def evil_payloads(marker):
    return [Evil(os.system, f"touch {marker}"), Evil(eval, f"open({str(marker)!r}, 'w')"),
            Evil(exec, f"open({str(marker)!r}, 'w')"), Evil(subprocess.call, ["touch", str(marker)])]


def write_evil(path, payload, plain):
    obj = {"state_dict": {"x": payload}} if path.suffix == ".ckpt" else {TO_Q + ".lora_down.weight": payload}
    if plain:  # a bare pickle, not torch's zip format (protocol 2: torch's unpickler refuses later ones at once)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("plain", [False, True], ids=["zip", "plain"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickles_that_run_code_are_refused_without_running(suffix, plain, tiny, tmp_path):
    marker = tmp_path / "pwned"
    sd = copy.deepcopy(tiny["model"])
    for i, payload in enumerate(evil_payloads(marker)):
        path = tmp_path / f"evil{i}{suffix}"
        write_evil(path, payload, plain)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": refused to unpickle [\w.]+: the file tries to load code"):
            if suffix == ".ckpt":
                minisd.load(path, tokenizer=tiny["tokenizer"])
            else:
                lora.load(path, sd.unet, sd.text_encoder)
        assert not marker.exists()
    assert lora.adapter_names(sd.unet, sd.text_encoder) == []


def test_a_hostile_resume_state_is_refused(tiny, images, tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / "run-step000001.state.pt"
    torch.save({"step": 1, "adapter": {}, "x": evil_payloads(marker)[0]}, state)
    message = one_line_exit(train.main, train_argv(tiny, images, tmp_path / "run.safetensors", "--steps", 2, "--resume", state))
    assert f"{state}: refused to unpickle" in message and not marker.exists()


def relabel(edit):
    """A writer: a copy of the safetensors file with its header edited (the tensor bytes left as they are)."""
    def write(src, dst):
        data = src.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header, body = json.loads(data[8:8 + n]), data[8 + n:]
        entry = next(v for k, v in header.items() if re.search(edit[0], k))
        entry[edit[1]] = edit[2](entry[edit[1]], len(body)) if callable(edit[2]) else edit[2]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        dst.write_bytes(len(h).to_bytes(8, "little") + h + body)
    return write


def retensor(edit):
    """A writer: the tensors of the file, edited, saved again."""
    def write(src, dst):
        sd = load_file(str(src))
        edit(sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst))
    return write


def put(key, value):
    return retensor(lambda sd: sd.__setitem__(key, value(sd[key]) if callable(value) else value))


def raw(data):
    return lambda src, dst: dst.write_bytes(data(src.read_bytes()) if callable(data) else data)


def repickle(pickled):
    """A writer: a copy of a torch zip checkpoint with other bytes as its pickle (data.pkl)."""
    def write(src, dst):
        with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
            for info in z.infolist():
                out.writestr(info.filename, pickled if info.filename.endswith("data.pkl") else z.read(info))
    return write


def half(data):
    return data[:len(data) // 2]


UNET_OUT, UNET_IN, PROJ_IN = (f"model.diffusion_model.{k}.weight" for k in ("out.2", "input_blocks.0.0", "input_blocks.1.1.proj_in"))
TOKENS, VAE_IN = TE + "embeddings.token_embedding.weight", "first_stage_model.encoder.conv_in.weight"
UNREADABLE_ST, UNREADABLE, UNUSABLE = "not a readable safetensors file", "not a readable checkpoint", r"not a usable SD 1.x checkpoint \("

# (name, source, writer(src, dst), expected message); the source is the tiny model's .safetensors or .ckpt
CHECKPOINTS = [
    ("empty .safetensors", "safetensors", raw(b""), UNREADABLE_ST),
    ("empty .ckpt", "ckpt", raw(b""), UNREADABLE),
    ("truncated .safetensors", "safetensors", raw(half), UNREADABLE_ST),
    ("truncated .ckpt", "ckpt", raw(half), UNREADABLE),
    ("random bytes .ckpt", "ckpt", raw(random.Random(0).randbytes(5000)), UNREADABLE),
    ("header length 2**40", "safetensors", raw(lambda d: (2 ** 40).to_bytes(8, "little") + d[8:]), UNREADABLE_ST),
    ("offsets beyond the file", "safetensors", relabel((UNET_OUT, "data_offsets", lambda o, n: [o[0], n + 4096])), UNREADABLE_ST),
    ("offsets of another size", "safetensors", relabel((UNET_OUT, "data_offsets", lambda o, n: [o[0], o[1] - 2])), UNREADABLE_ST),
    ("shape that lies", "safetensors", relabel((UNET_OUT, "shape", [4, 32, 3, 4])), UNREADABLE_ST),
    ("int16 U-Net tensor", "safetensors", relabel((UNET_OUT, "dtype", "I16")), "U-Net has non-float tensors"),
    ("int16 text tensor", "safetensors", relabel(("final_layer_norm.weight", "dtype", "I16")), "text encoder has non-float tensors"),
    ("wrong shape", "safetensors", put("first_stage_model.quant_conv.bias", torch.zeros(3)), "shape mismatch"),
    ("missing key", "safetensors", retensor(lambda sd: sd.pop("model.diffusion_model.out.2.bias")), r"missing \(1\): out.2.bias"),
    ("SDXL keys", "safetensors", put("conditioner.embedders.0.transformer.x", torch.zeros(1)), "SDXL / SD 2.x"),
    ("SD 2.x OpenCLIP keys", "safetensors", put("cond_stage_model.model.positional_embedding", torch.zeros(1)), "SDXL / SD 2.x"),
    ("SD 2.x linear proj_in", "safetensors", put(PROJ_IN, lambda t: t[:, :, 0, 0]), "an SD 2.x U-Net"),
    ("zero U-Net channels", "safetensors", put(UNET_IN, torch.zeros(0, 4, 3, 3)), UNUSABLE + "ZeroDivisionError"),
    ("0-d tensor", "safetensors", put(TOKENS, torch.tensor(1.0)), UNUSABLE + "ValueError"),
    ("bad layer name", "safetensors", put("model.diffusion_model.input_blocks.x.weight", torch.zeros(1)), UNUSABLE + "ValueError"),
    ("VAE channels not divisible by 32", "safetensors", put(VAE_IN, lambda t: t.reshape(1, -1, 3, 3)), "VAE widths .* not positive multiples of its 32 norm groups"),
    # a few kB that describe a huge model must not make one: a 6400-wide text encoder, 10**6 layers or blocks
    ("text width 6400", "safetensors", put(TOKENS, lambda t: t.reshape(1, -1)), "text encoder does not fit: shape mismatch"),
    ("text layer 1000000", "safetensors", put(TE + "encoder.layers.1000000.layer_norm1.bias", torch.zeros(64)), "text encoder does not fit"),
    ("VAE block 1000000", "safetensors", put("first_stage_model.encoder.down.0.block.1000000.norm1.bias", torch.zeros(32)), "VAE does not fit"),
    ("a list, not a dict", "ckpt", lambda s, d: torch.save([torch.zeros(1)], d), "expected a dict of tensors"),
    ("non-string keys", "ckpt", lambda s, d: torch.save({"state_dict": {1: torch.zeros(1)}}, d), "expected a dict of tensors"),
    ("corrupt pickle opcodes", "ckpt", repickle(b"\x80\x02\xfe"), UNREADABLE),
]


@pytest.mark.parametrize("name, source, write, message", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_corrupt_checkpoints_give_one_clear_line(name, source, write, message, tiny, tmp_path):
    path = tmp_path / f"bad.{source}"
    write(tiny[source], path)
    rss = _maxrss_mb()
    t0 = time.time()
    with pytest.raises(CheckpointError) as e:
        minisd.load(path, tokenizer=tiny["tokenizer"])
    assert re.search(re.escape(str(path)) + ": .*" + message, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert time.time() - t0 < 20 and _maxrss_mb() - rss < 300  # nothing big was built or allocated


def _maxrss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def factors(rank, n_in, n_out, alpha=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(rank)
    out = {"lora_down.weight": (torch.randn(rank, n_in, generator=g) * 0.1).to(dtype),
           "lora_up.weight": (torch.randn(n_out, rank, generator=g) * 0.1).to(dtype)}
    return out if alpha is None else {**out, "alpha": torch.tensor(alpha)}


def adapter_file(modules, metadata=None):
    def write(src, dst):
        save_file({f"{m}.{k}": v.contiguous() for m, parts in modules.items() for k, v in parts.items()}, str(dst), metadata=metadata)
    return write


def peft_file(metadata):
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return lambda src, dst: save_file({q + ".lora_A.weight": torch.randn(2, 32), q + ".lora_B.weight": torch.randn(32, 2)}, str(dst),
                                      metadata={"lora_adapter_metadata": metadata})


Q = TO_Q  # the tiny U-Net's first to_q: 32 -> 32
NAN, INF = float("nan"), float("inf")

# (name, writer(src, dst), expected message, or None: the file loads); the source is the tiny model's adapter
ADAPTERS = [
    ("empty", raw(b""), UNREADABLE_ST),
    ("truncated", raw(half), UNREADABLE_ST),
    ("random bytes", raw(random.Random(1).randbytes(3000)), UNREADABLE_ST),
    ("header length 2**64-1", raw(lambda d: (2 ** 64 - 1).to_bytes(8, "little") + d[8:]), UNREADABLE_ST),
    ("offsets beyond the file", relabel(("lora_up", "data_offsets", lambda o, n: [o[0], n + 64])), UNREADABLE_ST),
    ("bool dtype, other size", relabel(("lora_down", "dtype", "BOOL")), UNREADABLE_ST),
    ("int factors", adapter_file({Q: factors(2, 32, 32, dtype=torch.int32)}), "expected floating point and rank >= 1"),
    ("NaN factor", adapter_file({Q: {**factors(2, 32, 32), "lora_up.weight": torch.full((32, 2), NAN)}}), "NaN or infinite"),
    ("inf factor", adapter_file({Q: {**factors(2, 32, 32), "lora_down.weight": torch.full((2, 32), INF)}}), "NaN or infinite"),
    ("factor 1e38 (a flipped exponent bit)", adapter_file({Q: {**factors(2, 32, 32), "lora_up.weight": torch.full((32, 2), 1e38)}}),
     "a factor value of 1e\\+38, beyond float16's range"),
    ("alpha 1e38", adapter_file({Q: factors(2, 32, 32, alpha=1e38)}), "alpha is 1e\\+38"),
    ("rank 0", adapter_file({Q: factors(0, 32, 32)}), "rank 0"),
    ("NaN alpha", adapter_file({Q: factors(2, 32, 32, alpha=NAN)}), "alpha is nan"),
    ("two alphas", adapter_file({Q: {**factors(2, 32, 32), "alpha": torch.ones(2)}}), "alpha has 2 values"),
    ("0-d factor", adapter_file({Q: {**factors(2, 32, 32), "lora_down.weight": torch.tensor(1.0)}}), r"not a usable LoRA file \(IndexError"),
    ("wrong shape", adapter_file({Q: factors(2, 32, 48)}), "do not fit"),
    ("missing lora_up", adapter_file({Q: {"lora_down.weight": torch.zeros(2, 32)}}), "lacks its lora_up"),
    ("SD 2.x adapter", adapter_file({Q.replace("attn1_to_q", "attn2_to_k"): factors(2, 1024, 32)}), "SD 2.x adapter"),
    ("SDXL adapter", adapter_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1": factors(2, 1280, 5120)}), "SDXL adapter"),
    ("SDXL U-Net names", adapter_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": factors(2, 64, 64)}), "SDXL adapter"),
    ("LoHa", adapter_file({Q: {"hada_w1_a": torch.ones(2, 2)}}), "LoHa adapters are not supported"),
    ("metadata not JSON", peft_file("{oops"), "lora_adapter_metadata is not JSON"),
    ("hostile alpha_pattern regex", peft_file(json.dumps({"unet.lora_alpha": 2, "unet.alpha_pattern": {"(.*)*(.*)*(.*)*(.*)*(.*)*!": 1}})),
     None),
    ("a list in a .pt", lambda s, d: torch.save([torch.zeros(1)], d.with_suffix(".pt")), "expected a dict of tensors"),
]


@pytest.mark.parametrize("name, write, message", ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_corrupt_adapters_give_one_clear_line(name, write, message, tiny, tmp_path):
    sd = copy.deepcopy(tiny["model"])
    path = tmp_path / "bad.safetensors"
    write(tiny["adapter"], path)
    path = path if path.exists() else path.with_suffix(".pt")
    t0 = time.time()
    if message is None:  # loads, and in well under a second
        lora.load(path, sd.unet, sd.text_encoder, name="ok")
        lora.remove(sd.unet, "ok", sd.text_encoder)
        assert time.time() - t0 < 10
        return
    with pytest.raises(CheckpointError) as e:
        lora.load(path, sd.unet, sd.text_encoder)
    assert re.search(re.escape(str(path)) + ": .*" + message, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert lora.adapter_names(sd.unet, sd.text_encoder) == []  # nothing changed


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tiny, images, tmp_path):
    bad = tmp_path / "bad.safetensors"
    raw(half)(tiny["safetensors"], bad)
    common = ["--tokenizer", str(tiny["tokenizer"]), "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png")]
    assert f"{bad}: not a readable safetensors file" in one_line_exit(sample.main, ["--ckpt", str(bad), *common])
    with pytest.raises(CheckpointError):
        sample.main(["--ckpt", str(bad), *common, "--debug"])
    message = one_line_exit(sample.main, ["--ckpt", str(tiny["safetensors"]), "--lora", str(bad), *common])
    assert f"{bad}: not a readable safetensors file" in message
    argv = train_argv(tiny, images, tmp_path / "a.safetensors", "--steps", 1)
    argv[1] = str(bad)
    assert f"{bad}: not a readable safetensors file" in one_line_exit(train.main, argv)
    with pytest.raises(CheckpointError):
        train.main(argv + ["--debug"])


def test_blocks_without_target_layers_are_a_clear_error(tiny, images, tmp_path):
    # the tiny U-Net has two levels: in3 (LDM input_blocks 10-11) does not exist, so LoRA has nothing to adapt there
    argv = train_argv(tiny, images, tmp_path / "a.safetensors", "--steps", 1, "--blocks", "in3")
    assert "--blocks in3: nothing to train, no lora target layer" in one_line_exit(train.main, argv)
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(bad), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert lines[-1].startswith(f"error: {bad}: not a readable checkpoint"), run.stderr


# ----------------------------------------------------------------------------------------------- 3. images

def png_header_only(path, width, height):
    """A PNG that claims width x height pixels (a decompression bomb as far as the header goes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def rgb(x):
    """(3, S, S) in [-1, 1] -> mean (r, g, b) in 0..255."""
    return tuple(((x.mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist())


def palette_image(transparent):
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, the rest red
    im.paste(0, (0, 0, 20, 10))  # top half index 0
    if transparent:
        im.info["transparency"] = 0
    return im


@pytest.mark.parametrize("name, make, suffix, expected", [
    ("L", lambda: Image.new("L", (20, 20), 100), ".png", (100, 100, 100)),
    ("1", lambda: Image.new("1", (20, 20), 1), ".png", (255, 255, 255)),
    ("RGBA transparent", lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 0)), ".png", (255, 255, 255)),
    ("RGBA opaque", lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 255)), ".png", (255, 0, 0)),
    ("LA", lambda: Image.new("LA", (20, 20), (50, 255)), ".png", (50, 50, 50)),
    ("CMYK", lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
    ("I;16 mid-gray", lambda: Image.fromarray(np.full((20, 20), 32896, np.uint16)), ".png", (128, 128, 128)),
    ("P", lambda: palette_image(False), ".png", (128, 128, 0)),
    ("P transparent", lambda: palette_image(True), ".png", (255, 128, 128)),
    ("RGB webp", lambda: Image.new("RGB", (20, 20), (0, 0, 255)), ".webp", (0, 0, 255)),
])
def test_image_modes_load_as_rgb(name, make, suffix, expected, tmp_path):
    path = tmp_path / f"im{suffix}"
    make().save(path)
    x = train.load_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert all(abs(a - b) <= 12 for a, b in zip(rgb(x), expected)), (rgb(x), expected)


def test_16_bit_gray_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    x = train.load_image(tmp_path / "ramp.png", 32)[0]
    assert x[:, 0].mean() < -0.95 and x[:, -1].mean() > 0.95 and abs(x.mean()) < 0.05  # not clipped to white


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)  # stored: left half red, right half blue
    a[:, 32:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation 6: turn 90 degrees clockwise to view, so the left edge goes on top
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    x = train.load_image(tmp_path / "photo.jpg", 32)
    top, bottom = rgb(x[:, :8]), rgb(x[:, -8:])
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


def test_small_and_very_large_images(tmp_path):
    Image.new("RGB", (5, 7), (10, 200, 30)).save(tmp_path / "small.png")
    x = train.load_image(tmp_path / "small.png", 64)  # upscaled
    assert x.shape == (3, 64, 64) and max(abs(a - b) for a, b in zip(rgb(x), (10, 200, 30))) <= 1
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:, :, 1] = 255
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=80)
    t0 = time.time()
    x = train.load_image(tmp_path / "big.jpg", 64)
    assert x.shape == (3, 64, 64) and rgb(x)[1] > 250 and time.time() - t0 < 10


def bad_images(folder):
    """Files with image names that are no usable images; returns their names."""
    png_header_only(folder / "bomb.png", 30000, 30000)
    (folder / "noise.png").write_bytes(random.Random(2).randbytes(2000))
    (folder / "empty.webp").write_bytes(b"")
    full = folder / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (folder / "truncated.jpg").write_bytes(full.read_bytes()[:1500])
    full.unlink()
    (folder / "folder.png").mkdir()
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    return ["bomb.png", "noise.png", "empty.webp", "truncated.jpg", "folder.png", "gone.jpg"]


def test_unreadable_images_are_skipped_with_a_warning_naming_them(tmp_path):
    for name in bad_images(tmp_path):
        with pytest.warns(UserWarning, match=re.escape(str(tmp_path / name)) + ": skipped"):
            assert train.load_image(tmp_path / name, 16) is None


def test_a_run_does_not_die_because_of_bad_images(tiny, images, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in list(images.glob("*.png"))[:2]:
        (data / p.name).write_bytes(p.read_bytes())
    bad = bad_images(data)
    with pytest.warns(UserWarning) as caught:
        out = train.main(train_argv(tiny, data, tmp_path / "a.safetensors", "--steps", 2))
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == len(bad) and all(any(name in s for s in skipped) for name in bad)
    assert out.is_file()


# ------------------------------------------------------------------------------------ 4. prompts and flags

def test_long_prompts_are_truncated_with_a_warning(tiny):
    sd = tiny["model"]  # a character tokenizer: one token per character, plus start and end
    with pytest.warns(UserWarning, match="prompt longer than 77 tokens, the last 25 dropped: 'aaaa"):
        ctx = encode_prompts(sd.tokenizer, sd.text_encoder, ["short", "a" * 100])
    assert ctx.shape == (2, 77, 64)
    with pytest.warns(UserWarning, match="dropped") as caught:
        encode_prompts(sd.tokenizer, sd.text_encoder, ["ok"] * 3 + ["é" * 200])
    assert len(caught) == 1


def test_empty_and_non_ascii_prompts(tiny):
    sd = tiny["model"]
    tok = load_tokenizer(ROOT / "weights" / "tiny" / "tokenizer")
    assert tok.padded(["", "café 東京 🚀 ñ"]).shape == (2, 77)
    # sample() reads prompts of any length in 75-token chunks (minisd.text.encode_weighted_prompts)
    images = sd.sample(["", "café 東京 🚀 ñ", "x" * 200], negative_prompt="ü", steps=1, height=16, width=16,
                       progress=False)
    assert images.shape == (3, 3, 16, 16) and images.isfinite().all()
    assert sd.sample("", steps=1, guidance=0.5, height=16, width=16, progress=False).shape == (1, 3, 16, 16)  # no CFG


@pytest.mark.parametrize("kw, message", [
    (dict(steps=0), "steps must be in 1.."), (dict(steps=-2), "steps must be in 1.."),
    (dict(height=15), "multiples of 2"),
    (dict(width=-16), "positive multiples"), (dict(guidance=-1.0), "guidance must be >= 0"),
])
def test_sample_refuses_bad_arguments(kw, message, tiny):
    with pytest.raises(ValueError, match=message):
        tiny["model"].sample("a", **{"steps": 1, "height": 16, "width": 16, "progress": False, **kw})


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--steps", "-1"], "--steps must be positive"),
    (["--n", "0"], "--n must be positive"),
    (["--height", "12"], "multiples of 8"),
    (["--width", "-8"], "multiples of 8"),
    (["--guidance", "-0.5"], "--guidance must be >= 0"),
    (["--lora", "ADAPTER:1:in9"], "unknown block-weight name 'in9'"),
    (["--lora", "ADAPTER:1:1,0,1"], "17 values"),
    (["--lora", "ADAPTER:x"], "weight 'x' is not a number"),
    (["--out", "FILE/x.png"], "FILE"),
    (["--out", "DIR.png"], "--out"),
])
def test_sample_flags_fail_before_the_model_is_read(argv, message, tiny, tmp_path):
    bad = tmp_path / "bad.ckpt"  # the model is never read: its error would show otherwise
    bad.write_bytes(b"")
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR.png").mkdir()
    argv = [a.replace("ADAPTER", str(tiny["adapter"])).replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR"))
            for a in argv]
    message_out = one_line_exit(sample.main, ["--ckpt", str(bad), "--out", str(tmp_path / "o.png"), *argv])
    assert message in message_out and "bad.ckpt" not in message_out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--batch", "-1"], "--batch must be positive"),
    (["--rank", "0"], "--rank must be positive"),
    (["--resolution", "12"], "--resolution must be a positive multiple of 8"),
    (["--resolution", "-16"], "--resolution must be a positive multiple of 8"),
    (["--blocks", "in9"], "--blocks in9: unknown dims block name 'in9'"),
    (["--blocks", "1,2,3"], "--blocks 1,2,3: "),
    (["--out", "FILE/x.safetensors"], "FILE"),
    (["--out", "DIR.safetensors"], "is a folder"),
    (["--resume"], "no a-step*.state.pt"),
])
def test_train_flags_fail_before_the_model_is_read(argv, message, images, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR.safetensors").mkdir()
    argv = [a.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR")) for a in argv]
    message_out = one_line_exit(train.main, ["--ckpt", str(bad), "--data", str(images), "--prompt", "x", "--quiet",
                                             "--out", str(tmp_path / "a.safetensors"), *argv])
    assert message in message_out and "bad.ckpt" not in message_out


# ------------------------------------------------------------------------------------ 5. interrupted runs

def loads(path):
    """Whether a checkpoint file reads completely."""
    try:
        if path.name.endswith(".state.pt"):
            state = read_pickle(path)
            return all(k in state for k in ("step", "optimizer", "scaler", "rng", "history", "adapter"))
        return bool(read_state_dict(path))
    except CheckpointError:
        return False


def checkpoints(folder):
    return sorted(p for p in folder.glob("run-step*") if p.name.endswith((".state.pt", ".safetensors")))


def test_the_base_hash_is_computed_once_and_is_right_in_every_file(tiny, images, tmp_path, monkeypatch):
    """--save-every 1: every checkpoint adapter and the final one carry minisd_base_unet_sha256 = unet_hash of the
    base model, computed once (it is a pass over every base weight) and cached: a second run on the same base file
    computes nothing, a base file that changed is hashed again."""
    from safetensors import safe_open
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = lora.formats.unet_hash
    monkeypatch.setattr(lora.formats, "unet_hash", lambda unet: calls.append(1) or real(unet))
    out = tmp_path / "run.safetensors"
    train.main(train_argv(tiny, images, out, "--steps", 3, "--save-every", 1))
    base = real(minisd.load(tiny["safetensors"], tokenizer=tiny["tokenizer"]).unet)
    files = [out] + sorted(tmp_path.glob("run-step*.safetensors"))
    assert len(files) == 3 and len(calls) == 1
    train.main(train_argv(tiny, images, tmp_path / "again.safetensors", "--steps", 1))
    files.append(tmp_path / "again.safetensors")
    assert len(calls) == 1
    for f in files:
        with safe_open(str(f), "pt") as h:
            assert h.metadata()["minisd_base_unet_sha256"] == base, f.name
    changed = tmp_path / "changed.safetensors"  # the same base with one weight changed: a new file, a new hash
    weights = load_file(str(tiny["safetensors"]))
    first = sorted(k for k in weights if k.startswith("model.diffusion_model."))[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(changed))
    argv = train_argv(tiny, images, tmp_path / "other.safetensors", "--steps", 1)
    train.main([*argv, "--ckpt", str(changed)])
    with safe_open(str(tmp_path / "other.safetensors"), "pt") as h:
        assert len(calls) == 2 and h.metadata()["minisd_base_unet_sha256"] not in (base, None)


def test_sigkill_while_saving_loses_no_checkpoint_and_resume_continues(tiny, images, tmp_path, capsys):
    """A training run with --save-every 1 is killed (SIGKILL) KILLS times, every other time the moment a checkpoint
    file is being written, else at a random moment 1-3 checkpoints in, and restarted with --resume: every checkpoint
    written before a kill is still there and loads, and the run ends exactly as an uninterrupted one."""
    steps = 10 + 5 * KILLS
    out = tmp_path / "run.safetensors"
    argv = train_argv(tiny, images, out, "--steps", steps, "--save-every", 1, "--lr", "1e-2", "--rank", 16)
    rng = random.Random(0)
    kills = mid_write = lost = 0
    good = set()  # checkpoints seen complete
    while kills < KILLS:
        n_before = len(train.state_files(out))
        run = train_process(argv + (["--resume"] if n_before else []), tmp_path / "log")
        deadline, wait_for = time.time() + 60, n_before + (1 if kills % 2 else rng.randint(1, 3))
        while len(train.state_files(out)) < wait_for and time.time() < deadline:  # checkpoints of its own
            time.sleep(0.002)
        tmp_before = {n for n in os.listdir(tmp_path) if n.startswith(".tmp")}
        if kills % 2:  # aimed: the moment a temporary checkpoint file appears
            while not {n for n in os.listdir(tmp_path) if n.startswith(".tmp")} - tmp_before and time.time() < deadline:
                pass
        else:
            time.sleep(rng.uniform(0, 0.05))
        run.kill()
        assert run.wait() == -signal.SIGKILL, "the run ended before it was killed: raise the step count"
        kills += 1
        mid_write += bool({n for n in os.listdir(tmp_path) if n.startswith(".tmp")} - tmp_before)  # left half-written
        present = {p: loads(p) for p in checkpoints(tmp_path)}
        lost += len(good - {p for p, ok in present.items() if ok})
        assert all(present.values()), [p.name for p, ok in present.items() if not ok]
        good |= set(present)
    newest = train.state_files(out)[-1]
    train.main(argv + ["--resume"])  # no value: the newest state beside --out
    assert f"resumed from {newest} at step" in capsys.readouterr().out
    assert lost == 0 and all(loads(p) for p in checkpoints(tmp_path))
    history = np.loadtxt(out.with_name("run-loss.csv"), delimiter=",", skiprows=1)
    assert history[:, 0].tolist() == list(range(1, steps + 1))
    reference = train.main(train_argv(tiny, images, tmp_path / "ref" / "ref.safetensors", "--steps", steps, "--lr", "1e-2",
                                      "--rank", 16))
    a, b = load_file(str(out)), load_file(str(reference))
    assert a.keys() == b.keys()  # as if never interrupted (bit for bit where the same kernels run; 1e-6 allows others)
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)
    print(f"\nsigkill: {kills} kills, {mid_write} of them while a checkpoint file was being written; "
          f"{len(good)} checkpoints seen, {lost} lost; {steps} steps")


def test_checkpoints_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Power loss (not testable here): atomic_save fsyncs the temporary file, then renames it, then fsyncs the
    folder, so the name never points at data still in the page cache."""
    import stat
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.stat(a).st_ino))
        real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "a.safetensors"
    train.atomic_save(lambda p: p.write_bytes(b"weights"), path)
    ino = path.stat().st_ino
    assert events == [("file", ino), ("replace", ino), ("dir", tmp_path.stat().st_ino)]
    assert path.read_bytes() == b"weights" and os.listdir(tmp_path) == ["a.safetensors"]


# ----------------------------------------------------------------------------------------------- 6. numerics

def test_non_finite_loss_stops_and_names_a_good_checkpoint(tiny, images, tmp_path):
    """A huge learning rate makes the loss NaN at step 2: the run stops with one line naming the last checkpoint
    whose weights gave a finite loss; the one saved from the weights that gave NaN is set aside, so --resume
    (no value) does not pick it."""
    out = tmp_path / "a.safetensors"
    argv = train_argv(tiny, images, out, "--steps", 10, "--save-every", 1, "--lr", "1e3", "--weight-decay", 0)
    message = one_line_exit(train.main, argv)
    m = re.fullmatch(r"error: loss is nan at step (\d+): stopping \(.*\); the last good checkpoint is (\S+)", message)
    assert m, message
    step, good = int(m[1]), Path(m[2])
    assert step >= 2 and good.name == f"a-step{step - 1:06d}.state.pt" and good.is_file()
    assert train.state_files(out)[-1] == good  # what --resume picks
    assert out.with_name(f"a-step{step:06d}.state.pt.nonfinite").is_file()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.with_name(f"a-step{step:06d}.safetensors.nonfinite").read_bytes())
    assert finite_outputs(good.with_name(good.name.replace(".state.pt", ".safetensors")), tiny["model"])
    assert not finite_outputs(bad, tiny["model"])


def finite_outputs(adapter, sd):
    """Whether the adapter loads and the adapted U-Net gives finite outputs."""
    sd = copy.deepcopy(sd)
    try:
        lora.load(adapter, sd.unet, sd.text_encoder)
    except CheckpointError:
        return False
    with torch.no_grad():
        return bool(sd.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 64)).isfinite().all())


@pytest.mark.parametrize("choice, device, bf16_native, expected", [
    ("auto", "cpu", False, "no"),
    ("auto", "cuda", True, "bf16"),  # Ampere and newer
    ("auto", "cuda", False, "fp16"),  # Turing / Volta: bf16 only emulated
    ("fp16", "cuda", True, "fp16"),
    ("bf16", "cpu", False, "bf16"),
])
def test_mixed_precision_choice(choice, device, bf16_native, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_native or including_emulation)
    assert train.mixed_precision(choice, torch.device(device)) == expected
