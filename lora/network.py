"""Adding named adapters to a U-Net (and text encoder) block by block, and switching them at inference.

Targets (module paths are minisd's LDM names):
    attn     transformer_blocks.0.attn1/attn2 .to_q .to_k .to_v .to_out.0     \
    ff       ff.net.0.proj, ff.net.2                                           >  LORA_TARGETS (kohya's LoRA-LierLa),
    proj     SpatialTransformer proj_in, proj_out (1x1 convs in SD 1.x)       /   192 U-Net modules in SD 1.x
    resnet   ResBlock in_layers.2, out_layers.3 (3x3), skip_connection (1x1), emb_layers.1 (time embedding)
    sampler  Downsample .op, Upsample .conv (3x3)   LOCON_TARGETS = LORA_TARGETS + resnet + sampler (LoRA-C3Lier)
    text encoder: every layer's self_attn q/k/v/out_proj and mlp fc1/fc2 (72 modules in SD 1.x), block BASE.
Linear layers and 1x1 convs take the table's linear rank, k x k convs its conv rank (as kohya does).

Several adapters live side by side (say "identity" on all blocks and "style" on in0 + out3); each has a global
weight and per-block weights (`set_weight`), can be disabled, merged, removed. The functions take the U-Net
first and the text encoder as the keyword `text_encoder` (None: U-Net only).
"""
import re

import torch

from .blocks import block_of, parse_block_weights
from .layers import NAME, is_adapted, wrap
from .ranks import RankTable, rank_table

TARGETS = {
    "attn": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "ff": r"\.ff\.net\.(0\.proj|2)$",
    "proj": r"\.(proj_in|proj_out)$",
    "resnet": r"\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1)$",
    "sampler": r"^(input_blocks\.\d+\.0\.op|output_blocks\.\d+\.\d+\.conv)$",
}
LORA_TARGETS = ("attn", "ff", "proj")  # kohya's LoRA-LierLa
LOCON_TARGETS = LORA_TARGETS + ("resnet", "sampler")  # kohya's LoRA-C3Lier
ALGOS = {"lora": LORA_TARGETS, "locon": LOCON_TARGETS}  # train.py --algo -> inject's targets
TEXT_TARGET = r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"


def _models(unet, text_encoder):
    return [m for m in (unet, text_encoder) if m is not None]


def adapted_layers(unet, text_encoder=None, name=None):
    """[(path, layer)] of the adapted layers (having adapter `name`, if given); text-encoder paths keep their own
    names, which block_of maps to BASE."""
    return [(path, m) for model in _models(unet, text_encoder) for path, m in model.named_modules()
            if is_adapted(m) and (name is None or name in m.adapters)]


def adapter_names(unet, text_encoder=None):
    """The sorted names of the adapters present."""
    return sorted({n for _, layer in adapted_layers(unet, text_encoder) for n in layer.adapters})


def _layers_with(unet, text_encoder, name):
    layers = adapted_layers(unet, text_encoder, name)
    if not layers:
        raise KeyError(f"no adapter {name!r}; adapters: {', '.join(adapter_names(unet, text_encoder)) or 'none'}")
    return layers


def target_paths(unet, table, targets=LORA_TARGETS):
    """[(path, rank, alpha)] that `inject` would adapt in the U-Net for this table and these targets."""
    table = table if isinstance(table, RankTable) else rank_table(table)
    unknown = [targets] if isinstance(targets, str) else [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; valid: a tuple of {', '.join(TARGETS)}")
    pattern = re.compile("|".join(f"(?:{TARGETS[t]})" for t in targets))
    plan = []
    for path, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.search(path):
            conv = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
            rank, alpha = table.lookup(block_of(path), conv)
            if rank:
                plan.append((path, rank, alpha))
    return plan


def _replace(model, path):
    """Wrap the layer at `path` in place (once) and return the wrapped layer."""
    layer = model.get_submodule(path)
    wrapped = wrap(layer)
    if wrapped is not layer:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return wrapped


def inject(unet, name, table, targets=LORA_TARGETS, text_encoder=None, te_rank=0, te_alpha=None,
           dtype=torch.float32, generator=None):
    """Add a fresh adapter `name` (up = 0: the model's output is unchanged) to the U-Net modules of `targets` whose
    block has a nonzero rank in `table` (a RankTable or anything `rank_table` takes, e.g. 8 or "in0=8,out3=16"),
    and, with te_rank > 0, to the text encoder's attention and MLP linears. Returns the adapted paths, prefixed
    'unet.' / 'text_encoder.'. The new parameters are `dtype` (float32 by default, whatever the base's dtype)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-'")
    if name in adapter_names(unet, text_encoder):
        raise ValueError(f"an adapter {name!r} exists already; remove it first")
    plan = [(unet, "unet.", p, r, a) for p, r, a in target_paths(unet, table, targets)]
    if text_encoder is not None and te_rank:
        plan += [(text_encoder, "text_encoder.", p, te_rank, te_rank if te_alpha is None else te_alpha)
                 for p, m in text_encoder.named_modules()
                 if isinstance(m, torch.nn.Linear) and re.search(TEXT_TARGET, p)]
    for model, _, path, rank, alpha in plan:
        _replace(model, path).add_adapter(name, rank, alpha, dtype=dtype, generator=generator)
    return [prefix + path for _, prefix, path, _, _ in plan]


def add_adapter_at(model, path, name, factors, alpha, dtype=torch.float32):
    """Add adapter `name` with a file's (down, up) factors to one module (used by the file loaders)."""
    return _replace(model, path).add_adapter(name, factors[0].shape[0], alpha, dtype=dtype, factors=factors)


def remove(unet, name, text_encoder=None):
    """Remove adapter `name` (unmerging it first); layers left without adapters become plain layers again."""
    _layers_with(unet, text_encoder, name)  # KeyError if there is none
    for model in _models(unet, text_encoder):
        for path, layer in adapted_layers(model, name=name):
            layer.remove_adapter(name)
            if not layer.adapters:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer.unwrap())


def set_weight(unet, name, weight=None, block_weights=None, text_encoder=None):
    """Set adapter `name`'s global weight and/or its per-block weights (anything parse_block_weights takes:
    "OUTD", 17/26 values, "in0=1,out3=0.5", a dict; blocks not mentioned get 0). None leaves a setting as it is.
    Modules outside the 26 blocks (time_embed, out: only in foreign files) keep block weight 1."""
    per_block = None if block_weights is None else parse_block_weights(block_weights)
    for path, layer in _layers_with(unet, text_encoder, name):
        layer.configure(name, weight, None if per_block is None else per_block.get(block_of(path), 1.0))


def enable(unet, name, on=True, text_encoder=None):
    """Switch adapter `name` on or off (merged or not)."""
    for _, layer in _layers_with(unet, text_encoder, name):
        layer.configure(name, enabled=on)


def merge(unet, name=None, text_encoder=None):
    """Add adapter `name` (None: every adapter) into the base weights; a merged adapter costs nothing at inference."""
    for _, layer in adapted_layers(unet, text_encoder) if name is None else _layers_with(unet, text_encoder, name):
        for n in ([name] if name else list(layer.adapters)):
            layer.merge(n)


def unmerge(unet, name=None, text_encoder=None):
    """Take adapter `name` (None: every adapter) out of the base weights again, exactly (see lora.layers)."""
    for _, layer in adapted_layers(unet, text_encoder) if name is None else _layers_with(unet, text_encoder, name):
        for n in ([name] if name else list(layer.adapters)):
            layer.unmerge(n)


def use_fused(unet, on=True, text_encoder=None):
    """Select the fused autograd path (default) or the plain composition in every adapted layer."""
    for _, layer in adapted_layers(unet, text_encoder):
        layer.fused = on


def trainable_parameters(unet, name, text_encoder=None):
    """Adapter `name`'s down and up Parameters, marked requires_grad=True (nothing else is touched: minisd.load
    freezes the base; other adapters keep their flags)."""
    params = [p for _, layer in _layers_with(unet, text_encoder, name) for p in layer.adapters[name].parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def base_state_dict(model):
    """The model's state dict without adapter tensors and with merged adapters taken out (the original weights)."""
    sd = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    for path, layer in adapted_layers(model):
        sd[f"{path}.weight" if path else "weight"] = layer.base_weight().detach()
    return sd


def load_base_weights(model, state_dict):
    """load_state_dict for base weights into an adapted model: every base key must be given, no other key, and
    only adapter keys may be missing. Refused while adapters are merged."""
    if any(layer.merge_order for _, layer in adapted_layers(model)):
        raise ValueError("unmerge the adapters before loading base weights")
    expected = set(base_state_dict(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"base weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state_dict, strict=False)
