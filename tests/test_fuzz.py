"""Bounded fuzzing of the file loaders: random bytes and mutations of valid small files (a kohya adapter, an LDM
checkpoint as .safetensors and as a lightning .ckpt). Every input must load or end in minisd.CheckpointError with
one line naming the file: no other exception type, no hang, no runaway memory.

    python -m pytest tests/test_fuzz.py -s                          # -s: print the counts
    MINISD_FUZZ_CASES=2000 MINISD_FUZZ_SEED=1 python -m pytest ...  # cases per target (default 100), another seed
"""
import io
import json
import os
import re
import resource
import signal
import zipfile
from collections import Counter

import numpy as np
import pytest
import safetensors.torch
import torch

import lora
import minisd
from minisd import CheckpointError
from minisd.checkpoint import read_pickle
from sdfixtures import save_lightning_ckpt
from tinyfiles import tiny  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = int(os.environ.get("MINISD_FUZZ_CASES", 100))
SEED = int(os.environ.get("MINISD_FUZZ_SEED", 0))
CASE_SECONDS = 20  # one load of these files takes well under a second; more than this is a hang
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX"]


# ------------------------------------------------------------------------------------------------- mutations

def _flip(data, rng):
    data = bytearray(data)
    for pos in rng.integers(0, len(data), rng.integers(1, 9)):
        data[pos] = rng.integers(0, 256)
    return bytes(data)


def _truncate(data, rng):
    return data[:rng.integers(0, len(data))]


def _insert(data, rng):
    pos = rng.integers(0, len(data) + 1)
    return data[:pos] + rng.bytes(int(rng.integers(1, 65))) + data[pos:]


def _delete(data, rng):
    pos = rng.integers(0, len(data))
    return data[:pos] + data[pos + rng.integers(1, 257):]


def _repeat(data, rng):
    pos, n = rng.integers(0, len(data)), rng.integers(1, 257)
    return data[:pos] + data[pos:pos + n] * 2 + data[pos + n:]


def _random(data, rng):
    return rng.bytes(int(rng.integers(0, 4096)))


BYTE_MUTATIONS = [_flip, _truncate, _insert, _delete, _repeat, _random]


def _near_start(mutation, span):
    """The same mutation on the first `span` bytes only (the header or the pickle, where the structure is)."""
    def mutate(data, rng):
        n = min(len(data), span)
        return mutation(data[:n], rng) + data[n:]
    mutate.__name__ = mutation.__name__ + "_head"
    return mutate


def split_safetensors(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body):
    h = json.dumps(header, sort_keys=True).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + body


def _renumber(key, rng):
    """A number in the key replaced by another one (sometimes absurdly large)."""
    numbers = list(re.finditer(r"\d+", key))
    if not numbers:
        return key + "_1"
    m = numbers[rng.integers(0, len(numbers))]
    new = str([0, 1, 2, 3, 7, 12, 24, 99, 10 ** 6, 10 ** 12][rng.integers(0, 10)])
    return key[:m.start()] + new + key[m.end():]


def _header(data, rng):
    """A structure-aware edit of the safetensors header: dtype, shape, offsets, names, metadata, length field."""
    header, body = split_safetensors(data)
    keys = [k for k in header if k != "__metadata__"]
    key = keys[rng.integers(0, len(keys))]
    entry = header[key]
    what = rng.integers(0, 10)
    if what == 0:
        entry["dtype"] = str(rng.choice(DTYPES))
    elif what == 1:  # same bytes, another element size: a consistent header with the wrong dtype
        size = {"F16": 2, "BF16": 2, "F32": 4}.get(entry["dtype"], 2)
        entry["dtype"] = str(rng.choice({2: ["I16", "BF16", "F16", "U16"], 4: ["I32", "F32"]}[size]))
    elif what == 2:  # same number of elements, another shape
        n = int(np.prod(entry["shape"]))
        entry["shape"] = [[n], [1, n], [n, 1, 1, 1], [], list(reversed(entry["shape"]))][rng.integers(0, 5)]
        if entry["shape"] == [] and n != 1:
            entry["shape"] = [n]
    elif what == 3:
        entry["shape"] = [int(s) for s in rng.integers(0, 70, rng.integers(0, 5))]
    elif what == 4:
        entry["data_offsets"] = [int(v) for v in sorted(rng.integers(0, len(body) + 16, 2))]
    elif what == 5:  # two tensors swap their bytes
        other = header[keys[rng.integers(0, len(keys))]]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif what == 6:
        header[_renumber(key, rng)] = header.pop(key)
    elif what == 7:
        del header[key]
    elif what == 8:
        junk = [{"lora_adapter_metadata": "{not json"}, {"lora_adapter_metadata": json.dumps({"unet.use_dora": True})},
                {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "x"})}, {"a": "b"}]
        header["__metadata__"] = junk[rng.integers(0, len(junk))]
    else:  # the length field lies
        n = int.from_bytes(data[:8], "little")
        lies = [0, 1, n - 8, n + 8, len(data), 2 ** 40, 2 ** 64 - 1]
        lie = lies[rng.integers(0, len(lies))]
        return lie.to_bytes(8, "little") + data[8:]
    return join_safetensors(header, body)


def _pickle(data, rng):
    """A byte mutation of the pickle (data.pkl) inside the .ckpt zip, the zip rewritten with valid CRCs."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            blob = src.read(info)
            if info.filename.endswith("data.pkl"):
                blob = BYTE_MUTATIONS[rng.integers(0, 5)](blob, rng)
            elif info.filename.endswith(tuple(f"data/{i}" for i in range(3))) and rng.random() < 0.5:
                blob = blob[:rng.integers(0, len(blob))]  # a storage record shorter than its tensors
            dst.writestr(info.filename, blob)
    return out.getvalue()


CONFIG_KEYS = re.compile(r"(input_blocks\.0\.0\.weight|\bout\.2\.weight|proj_in\.weight|attn2\.to_k\.weight|conv_in\.weight|"
                         r"conv_out\.weight|post_quant_conv\.weight|block\.0\.conv1\.weight|_embedding\.weight|fc1\.weight|alpha)$")
FOREIGN = ["conditioner.embedders.0.model.x", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
           "model.diffusion_model.label_emb.0.0.weight", "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight", "unet.x.hada_w1_a"]


def _edit(sd, rng):
    """One semantic edit of a {name: tensor} dict: shape, dtype, values, names, missing, extra or foreign keys."""
    keys = sorted(sd)  # safetensors returns them in no fixed order
    config = [k for k in keys if CONFIG_KEYS.search(k)]  # the tensors whose shapes the loaders read
    pool = config if config and rng.random() < 0.5 else keys
    key = pool[rng.integers(0, len(pool))]
    t = sd[key]
    what = rng.integers(0, 10)
    if what == 0:  # same numel, another shape
        n = t.numel()
        sd[key] = [t.reshape(n), t.reshape(1, n), t.reshape(n, 1, 1, 1), t[None], t.reshape(()) if n == 1 else t.flip(0)][rng.integers(0, 5)]
    elif what == 1:
        sd[key] = t[:0] if t.ndim else t.reshape(1)[:0]
    elif what == 2:
        sd[key] = t[:1] if t.ndim else t.reshape(1, 1)
    elif what == 3:
        dtypes = [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64, torch.bfloat16, torch.float8_e4m3fn]
        sd[key] = t.to(dtypes[rng.integers(0, len(dtypes))])
    elif what == 4 and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[rng.integers(0, t.numel())] = [float("nan"), float("inf"), -float("inf"), 6e4][rng.integers(0, 4)]
        sd[key] = t
    elif what == 5:
        sd[_renumber(key, rng)] = sd.pop(key)
    elif what == 6:  # a copy under another index, the original kept (a huge index must not build a huge model)
        sd[_renumber(key, rng)] = t.clone()
    elif what == 7:
        del sd[key]
    elif what == 8:
        sd[key] = torch.tensor(float(rng.normal()))
    else:
        sd[FOREIGN[rng.integers(0, len(FOREIGN))]] = torch.zeros(4, 4)
    return {k: v.contiguous() for k, v in sd.items()}


def _tensors(data, rng):
    """_edit on the file's tensors, written back in the same format (the ckpt as a lightning checkpoint)."""
    if data[:2] == b"PK":
        sd = read_pickle(io.BytesIO(data))["state_dict"]
        out = io.BytesIO()
        save_lightning_ckpt(_edit(sd, rng), out)
        return out.getvalue()
    header, _ = split_safetensors(data)
    return safetensors.torch.save(_edit(safetensors.torch.load(data), rng), metadata=header.get("__metadata__"))


def mutations(kind):
    head = 70_000 if kind == "ckpt" else 20_000
    return (BYTE_MUTATIONS + [_near_start(m, head) for m in BYTE_MUTATIONS[:5]]
            + [_header if kind == "safetensors" else _pickle] * 4 + [_tensors] * 6)


# ------------------------------------------------------------------------------------------------- the runs

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def fuzz(target, valid, suffix, load, tmp_path):
    """Run CASES mutated inputs through `load`; return the failures as (mutation, exception line)."""
    rng = np.random.default_rng([SEED, sum(map(ord, target))])
    data = valid.read_bytes()
    if suffix == ".safetensors":  # the writer orders the metadata differently in every process: fix one order
        data = join_safetensors(*split_safetensors(data))
    kinds = mutations("safetensors" if suffix == ".safetensors" else "ckpt")
    counts, failures = Counter(), []
    previous = signal.signal(signal.SIGALRM, _alarm)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for case in range(CASES):
            mutate = kinds[rng.integers(0, len(kinds))]
            try:
                blob = mutate(data, rng)
            except (ValueError, KeyError, IndexError, zipfile.BadZipFile, json.JSONDecodeError):
                blob = _flip(data, rng)  # a mutation that needs a parseable file, on an input it broke
            path = tmp_path / f"case{case:05d}{suffix}"
            path.write_bytes(blob)
            signal.alarm(CASE_SECONDS)
            try:
                counts[load(path) or "loaded"] += 1
            except CheckpointError as e:
                one_line = str(path) in str(e) and "\n" not in str(e)
                counts["clean error" if one_line else "unclear error"] += 1
                if not one_line:
                    failures.append((mutate.__name__, f"CheckpointError without the file or on several lines: {e!r}"[:300]))
            except Hang:
                counts["hang"] += 1
                failures.append((mutate.__name__, f"no answer within {CASE_SECONDS} s"))
            except Exception as e:
                counts["other exception"] += 1
                failures.append((mutate.__name__, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"))
            finally:
                signal.alarm(0)
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"\nfuzz {target}: {CASES} cases, seed {SEED}: {dict(counts)}; peak memory grew {grown_mb:.0f} MB")
    assert grown_mb < 1000, f"{target}: loading fuzzed files raised the peak memory by {grown_mb:.0f} MB"
    return failures


def report(failures):
    return "\n".join(f"{m}: {e}" for m, e in sorted(Counter(failures).keys())[:30])


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_fuzz_checkpoint_loading(kind, tiny, tmp_path):
    def load(path):
        minisd.load(path, tokenizer=tiny["tokenizer"])
    failures = fuzz(f"checkpoint .{kind}", tiny[kind], "." + kind, load, tmp_path)
    assert not failures, report(failures)


def test_fuzz_adapter_loading(tiny, tmp_path):
    sd = tiny["model"]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 77, 64, generator=g)

    def load(path):
        try:
            lora.load(path, sd.unet, sd.text_encoder, name="fuzz")
        except CheckpointError:
            assert lora.adapter_names(sd.unet, sd.text_encoder) == []  # nothing changed
            raise
        try:  # a file that loads is usable: the adapted model runs to finite outputs (NaN, inf and values beyond
            with torch.no_grad():  # float16's range, such as a flipped exponent bit's 1e38, are refused)
                assert sd.unet(x, t, ctx).isfinite().all(), "a loaded adapter overflows the outputs"
        finally:
            lora.remove(sd.unet, "fuzz", sd.text_encoder)
    failures = fuzz("adapter .safetensors", tiny["adapter"], ".safetensors", load, tmp_path)
    assert not failures, report(failures)
