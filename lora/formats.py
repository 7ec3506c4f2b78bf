"""Adapter files: kohya / A1111 / ComfyUI .safetensors (read and written); diffusers / peft, LyCORIS' own
(`lycoris_` keys) and ComfyUI LoraSave (`diffusion_model.` / `text_encoders.` keys) files (read).

kohya keys, per adapted module: `lora_unet_` + its diffusers path with '.' -> '_' (names from minisd.checkpoint's
one LDM <-> diffusers map), or `lora_te_text_model_` + the text-encoder path:
    <name>.lora_down.weight   [r, in]      or [r, in, kh, kw] for a conv (1x1 convs: [r, in, 1, 1])
    <name>.lora_up.weight     [out, r]     or [out, r, 1, 1]
    <name>.alpha              0-d float32; scale = alpha / r (no alpha: alpha = r)
diffusers / peft: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight` (older: `.lora.down.weight` /
`.lora.up.weight`), `text_encoder.[text_model.]<path>...`; alpha from `<path>.alpha` keys or the file's
`lora_adapter_metadata` (lora_alpha, alpha_pattern, as diffusers' save_lora_weights writes it), else alpha = rank.
LyCORIS (its own wrapper, algo lora / locon): `lycoris_` + the module's path in the model it wrapped, '.' -> '_'
(diffusers names for the U-Net; one model per file), kohya's parts. ComfyUI LoraSave: `diffusion_model.<LDM path>`
and `text_encoders.clip_l.transformer.text_model.<path>`, kohya's parts, usually no alpha (= rank).
A 1x1 conv accepts 2-D factors and a Linear accepts [.., .., 1, 1] ones. Ranks are read per module from the
tensors, so a file may hold any rank pattern.

Refused with a minisd.CheckpointError naming the file: keys matching no module, shapes or ranks that do not fit,
LoHa (hada_*), LoKr (lokr_*), DoRA (dora_scale, magnitude vectors), Tucker LoCon (lora_mid), rsLoRA, ComfyUI's
whole-tensor differences (.diff, .diff_b), and
SD 2.x / SDXL adapters (hinted from their key names and shapes).

Metadata written by `save` (safetensors metadata is str -> str):
    ss_network_module "networks.lora", ss_network_dim / ss_network_alpha (the largest linear rank and its alpha),
    ss_network_args   JSON: kohya's block_dims, block_alphas (25 comma-separated values each, IN00..OUT11), and
                      for LoCon files conv_block_dims, conv_block_alphas, conv_dim / conv_alpha: kohya's create_network
                      given these builds exactly the file's modules (for LORA_TARGETS and LOCON_TARGETS)
    ss_base_model_version "sd_v1", ss_v2 "False"
    minisd_adapter_name, minisd_algo ("lora", or "locon" when k x k convs are adapted), minisd_blocks (the adapted
    blocks, BASE = text encoder), minisd_te_dim / minisd_te_alpha,
    minisd_base_unet_sha256   unet_hash(unet): sha256 of the U-Net's base tensors (merged adapters taken out), in
                              float32, by LDM name: the same whichever layout the base was loaded from, but of the
                              weights as trained on (a base loaded in bf16 hashes unlike the same file in fp32)
    sshs_model_hash / sshs_legacy_hash   as kohya's trainers write them (minisd.hashes.kohya_hashes)
plus the caller's `metadata` (values that are not strings are JSON-encoded); the derived keys above win.
The file gets mode 0644 (safetensors' save_file alone makes it 0600).

diffusers 0.42 (`pipe.load_lora_weights`, tested): our files load there completely (LoCon ResNet convs,
skip_connection, time-embedding projections, samplers and the text encoder included) and give our outputs, as long
as all U-Net modules share one alpha (and all text-encoder modules one). diffusers drops the per-module alphas of
attention modules in kohya files (the alpha names it derives for them match no module) and gives them the file's
most common alpha, so block-wise alphas (including the default alpha = rank with ranks that differ between
blocks) load with wrong scales there. For diffusers users train with one alpha: rank_table(..., alphas=A).
"""
import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from minisd.checkpoint import CheckpointError, file_errors, read_state_dict, rename, unet_prefixes
from minisd.hashes import kohya_hashes
from minisd.save import write_safetensors

from .blocks import UNET_BLOCKS, block_of
from .network import adapted_layers, adapter_names, add_adapter_at, base_state_dict, remove, set_weight

KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
KOHYA_STYLE = ("lora_unet_", "lora_te", "lycoris_", "diffusion_model.", "text_encoders.")  # names with kohya's parts
DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                   "lora.up.weight": "up", "alpha": "alpha"}
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
               "lora_mid": "LoCon with Tucker decomposition (lora_mid)"}
# Every value of a LoRA file fits float16 (the dtype kohya and diffusers usually save in); a larger one (a flipped
# exponent bit can make 1e38) would overflow the layer's output: refused as damage.
FP16_MAX = torch.finfo(torch.float16).max  # 65504
SDXL_MARKS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "label_emb", "add_embedding", "lora_unet_input_blocks",
              "lora_unet_output_blocks", "clip_g.")
DIFF_SUFFIXES = (".diff", ".diff_b")  # ComfyUI's whole-tensor differences (LoraSave's bias_diff / full_diff)


def _te_path(path):
    return "text_model." + path.removeprefix("text_model.")


def module_index(unet, text_encoder=None):
    """{file module name: (part, path)} for every Linear / Conv2d, part 'unet' or 'te'. The names of each module:
        kohya      lora_unet_<diffusers path, '.' -> '_'>     lora_te_text_model_<path, '.' -> '_'>
        LyCORIS    lycoris_<diffusers path, '.' -> '_'>       lycoris_[text_model_]<path, '.' -> '_'>
        ComfyUI    diffusion_model.<LDM path>                 text_encoders.clip_l.transformer.text_model.<path>
        diffusers  unet.<diffusers path>                      text_encoder.[text_model.]<path>
    (LyCORIS' own wrapper names a module by its path in the model it wraps, one model per file.)"""
    pairs, index = unet_prefixes(unet.cfg), {}
    for path, m in unet.named_modules():
        dif = rename(path, pairs, to_diffusers=True) if isinstance(m, (nn.Linear, nn.Conv2d)) else None
        if dif:
            for name in ("lora_unet_" + dif.replace(".", "_"), "lycoris_" + dif.replace(".", "_"), "unet." + dif,
                         "diffusion_model." + path):
                index[name] = ("unet", path)
    for path, m in (text_encoder.named_modules() if text_encoder is not None else ()):
        if isinstance(m, nn.Linear):
            bare = path.removeprefix("text_model.")
            for name in ("lora_te_" + _te_path(path).replace(".", "_"), "text_encoder." + _te_path(path),
                         "text_encoder." + bare, "lycoris_" + _te_path(path).replace(".", "_"),
                         "lycoris_" + bare.replace(".", "_"), "text_encoders.clip_l.transformer." + _te_path(path)):
                index[name] = ("te", path)
    return index


def _hint(keys, shapes=()):
    if any(m in k for k in keys for m in SDXL_MARKS):
        return " (this looks like an SDXL adapter; minisd is SD 1.x)"
    # layers 12-23: an SD 2.x text encoder
    deep_text = r"encoder_layers_(1[2-9]|2[0-3])_|encoder\.layers\.(1[2-9]|2[0-3])\."
    if any(re.search(deep_text, k) for k in keys) or 1024 in shapes:
        return " (this looks like an SD 2.x adapter; minisd is SD 1.x)"
    return ""


def _peft_alphas(metadata, path):
    """{part: (lora_alpha or None, alpha_pattern)} from diffusers' lora_adapter_metadata JSON, if any."""
    try:
        meta = json.loads((metadata or {}).get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not JSON") from None
    out = {}
    for part, prefix in (("unet", "unet."), ("te", "text_encoder.")):
        for flag, algo in (("use_rslora", "rsLoRA"), ("use_dora", "DoRA")):
            if meta.get(prefix + flag):
                raise CheckpointError(f"{path}: {algo} adapters are not supported (lora_adapter_metadata)")
        out[part] = (meta.get(prefix + "lora_alpha"), meta.get(prefix + "alpha_pattern") or {})
    return out


def _fit(module, down, up):
    """The factors shaped as the layer needs them, or None if they do not fit."""
    conv = isinstance(module, nn.Conv2d)
    if conv and module.kernel_size == (1, 1) and down.ndim == 2:
        down = down[:, :, None, None]
    if conv and up.ndim == 2:
        up = up[:, :, None, None]
    if not conv and down.ndim == 4 and down.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    r = down.shape[0]
    want = (((r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)) if conv
            else ((r, module.in_features), (module.out_features, r)))
    return (down, up) if (tuple(down.shape), tuple(up.shape)) == want else None


def read_adapter_file(path, unet, text_encoder=None):
    """A kohya or diffusers/peft LoRA file -> [(part, module path, down, up, alpha)], checked against the models.
    Whatever is wrong with the file ends in one CheckpointError naming it."""
    with file_errors(path, "not a usable LoRA file"):
        return _read_adapter_file(path, unet, text_encoder)


def _read_adapter_file(path, unet, text_encoder):
    sd = read_state_dict(path)
    metadata = {}
    if Path(path).suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    groups, kohya = _factor_groups(path, sd)
    index = module_index(unet, text_encoder)
    unknown = [n for n in groups if n not in index]
    if unknown:
        te_names = ("lora_te_", "text_encoder.", "text_encoders.", "lycoris_encoder_", "lycoris_text_model_")
        te_keys = text_encoder is None and any(n.startswith(te_names) for n in unknown)
        raise CheckpointError(f"{path}: " + ("the file adapts the text encoder; pass text_encoder=" if te_keys else
                              f"{len(unknown)} adapters match no module: {', '.join(unknown[:4])}{_hint(unknown)}"))
    peft = {} if kohya else _peft_alphas(metadata, path)
    entries, seen = [], {}
    for mod_name, g in groups.items():
        part, mpath = index[mod_name]
        if seen.setdefault((part, mpath), mod_name) != mod_name:  # a kohya and a diffusers name of one module
            raise CheckpointError(f"{path}: {seen[part, mpath]} and {mod_name} name the same module")
        module = (unet if part == "unet" else text_encoder).get_submodule(mpath)
        down, up = _checked_factors(path, mod_name, g, module)
        alpha = _alpha(path, mod_name, g, peft.get(part, (None, {})), kohya, rank=down.shape[0])
        entries.append((part, mpath, down, up, alpha))
    return entries


def _factor_groups(path, sd):
    """{module name: {"down": t, "up": t, "alpha": t}} of a file's tensors, and whether it names them kohya's way;
    formats minisd does not read are refused by name."""
    for key in sd:
        for mark, algo in UNSUPPORTED.items():
            if mark in key:
                raise CheckpointError(f"{path}: {algo} adapters are not supported, only LoRA / LoCon ({key})")
        if key.endswith(DIFF_SUFFIXES):
            raise CheckpointError(f"{path}: whole-tensor differences ({key}) are not supported, only LoRA / LoCon "
                                  f"factors (ComfyUI: save with lora_type standard and bias_diff off)")
    kohya = any(k.startswith(KOHYA_STYLE) for k in sd)
    parts_of = KOHYA_PARTS if kohya else DIFFUSERS_PARTS
    groups, odd = {}, []  # keys of no known kind in `odd`
    for key, t in sd.items():
        suffix = next((s for s in parts_of if key.endswith("." + s)), None)
        if suffix is None:
            odd.append(key)
            continue
        group = groups.setdefault(key[:-len(suffix) - 1], {})
        if parts_of[suffix] in group:  # lora_A and lora.down of one module: which one is meant?
            raise CheckpointError(f"{path}: {key[:-len(suffix) - 1]} has two {parts_of[suffix]} tensors")
        group[parts_of[suffix]] = t
    if odd or not groups:
        raise CheckpointError(f"{path}: not a LoRA file: keys that are no LoRA factor or alpha ({len(odd)}): "
                              f"{', '.join(odd[:4]) or 'no keys'}{_hint(odd)}")
    return groups, kohya


def _checked_factors(path, mod_name, g, module):
    """(down, up) of one module, shaped for it (_fit), floating point, of rank >= 1, finite and within fp16's range."""
    if "down" not in g or "up" not in g:
        raise CheckpointError(f"{path}: {mod_name} lacks its {'lora_up' if 'down' in g else 'lora_down'} tensor")
    fitted = _fit(module, g["down"], g["up"])
    if fitted is None:
        shapes = [s for t in (g["down"], g["up"]) for s in t.shape]
        raise CheckpointError(f"{path}: {mod_name}: down {tuple(g['down'].shape)} / up {tuple(g['up'].shape)} "
                              f"do not fit {module}{_hint([mod_name], shapes)}")
    rank = fitted[0].shape[0]
    if not all(t.is_floating_point() for t in fitted) or rank == 0:
        raise CheckpointError(f"{path}: {mod_name}: factors of {fitted[0].dtype} / {fitted[1].dtype} and rank {rank}; "
                              f"expected floating point and rank >= 1")
    largest = torch.stack([t.float().abs().max() for t in fitted]).max().item()  # NaN if any value is
    if not math.isfinite(largest):
        raise CheckpointError(f"{path}: {mod_name}: the factors hold NaN or infinite values")
    if largest > FP16_MAX:
        raise CheckpointError(f"{path}: {mod_name}: a factor value of {largest:.3g}, beyond float16's range: "
                              "a damaged file")
    return fitted


def _alpha(path, mod_name, g, peft_part, kohya, rank):
    """The module's alpha: its own tensor, else peft's config (alpha_pattern, then lora_alpha), else the rank."""
    if "alpha" in g:
        if g["alpha"].numel() != 1:
            raise CheckpointError(f"{path}: {mod_name}.alpha has {g['alpha'].numel()} values, expected one")
        alpha = g["alpha"].item()
    else:
        # peft: alpha_pattern keys match a path's end; compared as text, since a regex from a file can hang
        default, patterns = peft_part
        name = mod_name.split(".", 1)[1] if not kohya else mod_name
        alpha = next((a for p, a in patterns.items() if name == p or name.endswith("." + p)), default) or rank
    if not math.isfinite(float(alpha)):
        raise CheckpointError(f"{path}: {mod_name}: alpha is {alpha}")
    if abs(float(alpha)) > FP16_MAX:
        raise CheckpointError(f"{path}: {mod_name}: alpha is {float(alpha):.3g}, beyond float16's range: "
                              "a damaged file")
    return float(alpha)


def name_of(path):
    """The adapter name `load` gives a file by default: its stem, every character an adapter name cannot hold
    (anything but letters, digits, '_' and '-') replaced by '_' (style_in0+out3.safetensors -> style_in0_out3)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def load(path, unet, text_encoder=None, name=None, weight=1.0, block_weights=None, dtype=torch.float32):
    """Load an adapter file (kohya/A1111/ComfyUI, LyCORIS, diffusers or peft) as adapter `name` (default: the
    file's stem), with a global weight and per-block weights (anything lora.parse_block_weights takes; None = all
    1). Nothing is changed if the file does not fit. Returns the adapted paths, prefixed 'unet.' / 'text_encoder.'."""
    name = name or name_of(path)
    if name in adapter_names(unet, text_encoder):
        raise ValueError(f"{path}: an adapter {name!r} exists already; remove it first or choose another name")
    entries = read_adapter_file(path, unet, text_encoder)
    try:
        for part, mpath, down, up, alpha in entries:
            add_adapter_at(unet if part == "unet" else text_encoder, mpath, name, (down, up), alpha, dtype)
        set_weight(unet, name, weight, block_weights, text_encoder=text_encoder)
    except BaseException:  # the promise above: what was added goes again; the error itself is passed on as it is
        if name in adapter_names(unet, text_encoder):
            remove(unet, name, text_encoder)
        raise
    return [("unet." if part == "unet" else "text_encoder.") + mpath for part, mpath, *_ in entries]


def adapter_state_dict(unet, name, text_encoder=None):
    """Adapter `name` as kohya tensors {key: tensor} (its weights, set by set_weight, are inference settings and
    not saved)."""
    pairs, out = unet_prefixes(unet.cfg), {}
    for part, model in (("unet", unet), ("te", text_encoder)):
        for path, layer in adapted_layers(model, name=name) if model is not None else ():
            a = layer.adapters[name]
            key = ("lora_unet_" + rename(path, pairs).replace(".", "_") if part == "unet"
                   else "lora_te_" + _te_path(path).replace(".", "_"))
            out[key + ".lora_down.weight"] = a.down.detach().contiguous()
            out[key + ".lora_up.weight"] = a.up.detach().contiguous()
            out[key + ".alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    return out


def unet_hash(unet):
    """sha256 (hex) over the U-Net's base tensors: names sorted, each name, shape and float32 bytes. The array goes
    to sha256 as a buffer, not .tobytes(): no second copy (SD 1.4 on a 2-core CPU: 3.3 s instead of 5.3-7.3 s)."""
    h = hashlib.sha256()
    for k, v in sorted(base_state_dict(unet).items()):
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(v.detach().float().cpu().contiguous().numpy())
    return h.hexdigest()


def kohya_metadata(unet, name, text_encoder=None, base_hash=None):
    """The derived metadata of adapter `name` (see the module docstring): ranks and alphas as adapted, per block
    (the largest where a block's modules differ). base_hash: unet_hash(unet) if the caller has it already (a sha256
    over all base weights: seconds for SD 1.4), else it is computed."""
    dims = {kind: [(0, 0.0)] * 25 for kind in ("block", "conv_block")}  # (rank, alpha) per kohya block
    te, blocks = (0, 0.0), set()
    for path, layer in adapted_layers(unet, text_encoder, name):
        a, block = layer.adapters[name], block_of(path)
        blocks.add(block)
        if block == "BASE":
            te = max(te, (a.rank, a.alpha))
        elif block in UNET_BLOCKS:
            table = dims["conv_block" if getattr(layer, "kernel_size", (1, 1)) != (1, 1) else "block"]
            i = UNET_BLOCKS.index(block)
            table[i] = max(table[i], (a.rank, a.alpha))
    # kohya's create_network adapts, per block i: the attention block's Linear / 1x1 layers if block_dims[i] > 0;
    # and only if conv_block_dims is given at all, also the ResBlocks' and samplers' (Linear / 1x1 at block_dims[i],
    # k x k at conv_block_dims[i]). So a file with no k x k conv gets no conv_block_dims, and the text encoder's
    # rank (kohya's network_dim) stands in for ss_network_dim when the U-Net has no linear adapters.
    (dim, alpha), (conv_dim, conv_alpha) = max(dims["block"]), max(dims["conv_block"])
    kinds = ("block", "conv_block") if conv_dim else ("block",)
    args = {f"{kind}_{what}": ",".join(f"{pair[j]:g}" for pair in dims[kind])
            for kind in kinds for j, what in ((0, "dims"), (1, "alphas"))}
    if conv_dim:
        args.update(conv_dim=str(conv_dim), conv_alpha=f"{conv_alpha:g}")
    dim, alpha = (dim, alpha) if dim else te
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps(args), "ss_base_model_version": "sd_v1", "ss_v2": "False",
            "minisd_adapter_name": name, "minisd_algo": "locon" if conv_dim else "lora",
            "minisd_blocks": ",".join(b for b in ("BASE",) + UNET_BLOCKS if b in blocks),
            "minisd_te_dim": str(te[0]), "minisd_te_alpha": f"{te[1]:g}",
            "minisd_base_unet_sha256": base_hash or unet_hash(unet)}


def save(path, unet, text_encoder=None, name=None, metadata=None):
    """Write adapter `name` (default: the only adapter) as a kohya .safetensors file with metadata. A caller that
    saves often (checkpoints) may pass the base U-Net's hash as metadata["minisd_base_unet_sha256"] (unet_hash of
    this U-Net; the base does not change while an adapter trains) so that it is not computed again."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files are written as .safetensors")
    names = adapter_names(unet, text_encoder)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"name the adapter to save; adapters: {', '.join(names) or 'none'}")
        name = names[0]
    if name not in names:
        raise KeyError(f"no adapter {name!r}; adapters: {', '.join(names) or 'none'}")
    tensors = {k: v.cpu() for k, v in adapter_state_dict(unet, name, text_encoder).items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(kohya_metadata(unet, name, text_encoder, meta.get("minisd_base_unet_sha256")))
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    write_safetensors(tensors, path, meta)
