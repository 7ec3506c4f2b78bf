"""Reading checkpoint files safely, and the one diffusers <-> LDM name map.

Files: `.safetensors` (no code can run), or pickles (`.ckpt`, `.bin`, `.pt`) read with torch's
weights-only unpickler. The released sd-v1-4.ckpt also pickles a pytorch_lightning ModelCheckpoint
class and numpy scalars in its `callbacks`; those few names resolve to harmless stand-ins, and any
other global in the pickle is refused before it is called.
"""
import _codecs
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .files import check_zip


class CheckpointError(ValueError):
    """A checkpoint or adapter file that cannot be used; the message names the file and the problem."""


class _LightningStub:  # stands in for pytorch_lightning classes pickled in old .ckpt files
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_np_scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
SAFE_GLOBALS = [
    (_LightningStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    _codecs.encode,
    *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
]


def read_state_dict(path, device="cpu", dtype=None, skip=()):
    """Load a flat {name: tensor} dict from a .safetensors or pickle file onto `device`, floating-point tensors in
    `dtype` (None: as stored), leaving out the keys that start with a prefix in `skip`. A safetensors file is read
    tensor by tensor on the CPU, converted there, then moved: an fp32 file loaded as fp16 never holds more than one
    fp32 tensor at a time, and half the bytes cross to the GPU (one H200, SD 1.4's fp32 U-Net file to CUDA fp16:
    0.38-0.44 s, against 0.73-0.83 s read to CUDA first and converted there)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: cast(f.get_tensor(k)).to(device) for k in f.keys() if not k.startswith(skip)}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    obj = read_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # lightning .ckpt
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a dict of tensors (or one under 'state_dict')")
    return {k: cast(v).to(device) for k, v in obj.items() if not k.startswith(skip)}


def read_pickle(path):
    """torch.load with the weights-only unpickler (and the stand-ins above), on the CPU; errors name the file. A
    zip whose records declare more bytes than the file holds is refused before anything is inflated."""
    try:
        if zipfile.is_zipfile(path):
            check_zip(path)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e)) or re.findall(r"global ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused to unpickle {found[0]}: the file tries to load code, "
                                  "not only tensors") from None
        # the unpickler's reason, not torch's advice to load the file unsafely
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = type(e).__name__ + (": " + detail[0][:300] if detail else "")
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@contextmanager
def file_errors(path, what):
    """Whatever else goes wrong while making sense of the file `path` becomes one CheckpointError naming it: a
    corrupt or hostile file reaches code paths no check foresaw (the cause stays attached, for --debug)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: {what} ({type(e).__name__}: {_first_line(e)})") from e


def load_strict(module, sd, path, what):
    """load_state_dict that names the missing, unexpected and mis-shaped keys and the file."""
    check_fits(module.state_dict(), sd, path, what)
    module.load_state_dict(sd, strict=True, assign=True)


def check_fits(expected, sd, path, what):
    """A CheckpointError naming the file and its missing, unexpected, mis-shaped or non-float tensors, if any."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for name, keys in found if keys]
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit: " + "; ".join(problems))
    dtypes = {v.dtype for v in sd.values()}
    if not all(d.is_floating_point for d in dtypes):
        raise CheckpointError(f"{path}: {what} has non-float tensors ({', '.join(sorted(map(str, dtypes)))})")


# ---------------------------------------------------------------------------------------------
# The diffusers <-> LDM name map. Both directions come from one list of (LDM, diffusers) prefixes.

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_prefixes(cfg):
    """[(ldm_prefix, diffusers_prefix, inner renames)] for a U-Net of SD 1.x structure."""
    n, L = cfg.num_res_blocks, len(cfg.channel_mult)
    pairs = [("time_embed.0", "time_embedding.linear_1", {}), ("time_embed.2", "time_embedding.linear_2", {}),
             ("input_blocks.0.0", "conv_in", {}), ("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {}),
             ("middle_block.0", "mid_block.resnets.0", UNET_RESNET), ("middle_block.1", "mid_block.attentions.0", {}),
             ("middle_block.2", "mid_block.resnets.1", UNET_RESNET)]
    for i in range(L):  # down: level i is down_blocks.i; input_blocks 1 + i(n+1) + j
        for j in range(n):
            b = 1 + i * (n + 1) + j
            pairs.append((f"input_blocks.{b}.0", f"down_blocks.{i}.resnets.{j}", UNET_RESNET))
            if i in cfg.attention_levels:
                pairs.append((f"input_blocks.{b}.1", f"down_blocks.{i}.attentions.{j}", {}))
        if i < L - 1:
            pairs.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", {}))
    for i in range(L):  # up: up_blocks.i is level L-1-i; output_blocks i(n+1) + j
        level = L - 1 - i
        for j in range(n + 1):
            b = i * (n + 1) + j
            pairs.append((f"output_blocks.{b}.0", f"up_blocks.{i}.resnets.{j}", UNET_RESNET))
            if level in cfg.attention_levels:
                pairs.append((f"output_blocks.{b}.1", f"up_blocks.{i}.attentions.{j}", {}))
        if level != 0:
            k = 2 if level in cfg.attention_levels else 1
            pairs.append((f"output_blocks.{i * (n + 1) + n}.{k}.conv", f"up_blocks.{i}.upsamplers.0.conv", {}))
    return pairs


def vae_prefixes(cfg):
    L = len(cfg.ch_mult)
    pairs = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTN)]
    for i in range(L):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET))
        if i < L - 1:
            pairs.append((f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", {}))
        for j in range(cfg.num_res_blocks + 1):  # the decoder's up.i is indexed by resolution: up_blocks.i = up.{L-1-i}
            pairs.append((f"decoder.up.{L - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET))
        if i < L - 1:
            pairs.append((f"decoder.up.{L - 1 - i}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", {}))
    return pairs


def rename(name, pairs, to_diffusers=True):
    """Map one parameter key or module path between LDM and diffusers names; None if it matches no prefix."""
    for ldm, dif, inner in pairs:
        src, dst = (ldm, dif) if to_diffusers else (dif, ldm)
        if name == src or name.startswith(src + "."):
            rest = name[len(src) + 1:]
            for a, b in inner.items():
                a, b = (a, b) if to_diffusers else (b, a)
                if rest == a or rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return dst + ("." + rest if rest else "")
    return None


def unet_from_diffusers(sd, cfg, path):
    return _convert(sd, unet_prefixes(cfg), path, "U-Net")


def vae_from_diffusers(sd, cfg, path):
    old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14 names
    pattern = r"attentions\.0\.(query|key|value|proj_attn)\."
    sd = {re.sub(pattern, lambda m: f"attentions.0.{old[m[1]]}.", k): v for k, v in sd.items()}
    sd = _convert(sd, vae_prefixes(cfg), path, "VAE")
    # diffusers stores the mid-block attention projections as Linear (C, C); LDM as 1x1 convs (C, C, 1, 1)
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
            for k, v in sd.items()}


def _convert(sd, pairs, path, what):
    out, unknown = {}, []
    for k, v in sd.items():
        new = rename(k, pairs, to_diffusers=False)
        (unknown.append(k) if new is None else out.__setitem__(new, v))
    if unknown:
        raise CheckpointError(f"{path}: {what} keys with no LDM name ({len(unknown)}): {', '.join(unknown[:4])}")
    return out
