"""Layers with named low-rank adapters: LoRALinear (nn.Linear) and LoConConv2d (nn.Conv2d).

    y = base(x) + sum_i gain_i * up_i(down_i(x)),    gain_i = scale_i * global_weight_i * block_weight_i,
                                                     scale_i = alpha_i / rank_i

scale is LoRA's own alpha / rank; the weights are the user's: global_weight is A1111's <lora:name:weight>,
block_weight the weight of the layer's block (lora-block-weight); gain is the factor the math uses.

LoRALinear: down [r, in], up [out, r]. LoConConv2d: down = a k x k conv [r, in, kh, kw] with the layer's stride,
padding and dilation, up = a 1x1 conv [out, r, 1, 1]; 1x1 convs (SD 1.x's proj_in/proj_out, skip_connection) use it
too, which is exactly how kohya stores them. Init like kohya/peft: down kaiming-uniform (a = sqrt(5)), up zero,
so a fresh adapter changes nothing. The gain scales the adapter's output (= its up weight), never both.

State dict: a wrapped layer *is* an nn.Linear / nn.Conv2d holding the base `weight`/`bias` Parameters (the same
objects, frozen or not as they were), so the model's base keys are unchanged. Adapter tensors are extra keys
`<layer>.adapters.<name>.down` / `.up`; load base weights before injecting (minisd.load does), or with
`lora.network.load_base_weights`, which accepts a base state dict and tolerates exactly these keys.

The capture interface (capture_weight, stacked_factors, capture_factors, capture_signature) is what minisd.fast's
CUDA graphs read of an adapter layer: the weight that computes what the layer computes now (optionally without some
adapters), the active adapters' stacked factors, one adapter's factors, and a value that changes with them; the
merge math stays here.

forward uses the fused autograd functions (lora.fused) when some adapter is active and the base is frozen;
`layer.fused = False` selects the plain composition (the reference, and the path when the base is trainable).
Merging adds gain * up @ down into the base weight; the first merge keeps a copy of the unmerged weight and
unmerging restores from it (then re-adds the adapters still merged), so merge/unmerge cycles never drift.
A disabled adapter adds nothing, merged or not; `configure` re-merges a merged adapter whose switches change.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import _factors, compute_dtype, locon_conv2d, lora_linear

NAME = re.compile(r"[A-Za-z0-9_-]+")


class AdapterDict(nn.ModuleDict):
    """The adapters of a layer, by name. A name that is also a ModuleDict attribute ('train', 'to', 'forward',
    'state_dict', ...) cannot be a ModuleDict key: it is stored under '~name' (its state-dict key too), and every
    method takes and gives the user's name."""
    RESERVED = frozenset(dir(nn.ModuleDict()))

    def _key(self, name):
        return "~" + name if name in self.RESERVED else name

    def __getitem__(self, name):
        return super().__getitem__(self._key(name))

    def __setitem__(self, name, module):
        super().__setitem__(self._key(name), module)

    def __delitem__(self, name):
        super().__delitem__(self._key(name))

    def __contains__(self, name):
        return super().__contains__(self._key(name))

    def __iter__(self):
        return (k.removeprefix("~") for k in super().__iter__())

    def keys(self):
        return list(self)

    def items(self):
        return [(k.removeprefix("~"), v) for k, v in super().items()]


class Adapter(nn.Module):
    """One named adapter of one layer: its two factors, alpha, and its inference switches."""

    def __init__(self, down, up, alpha):
        super().__init__()
        self.down, self.up = nn.Parameter(down), nn.Parameter(up)
        self.alpha = float(alpha)
        self.global_weight = 1.0  # the adapter's weight (A1111's <lora:name:weight>)
        self.block_weight = 1.0  # the weight of this layer's block (lora-block-weight); not `weight`: not a Parameter
        self.enabled = True
        self.merged = False

    @property
    def rank(self):
        return self.down.shape[0]

    @property
    def scale(self):
        return self.alpha / self.rank

    @property
    def gain(self):
        """The factor of up @ down: scale * global_weight * block_weight."""
        return self.scale * self.global_weight * self.block_weight

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha:g}, global_weight={self.global_weight:g}, "
                f"block_weight={self.block_weight:g}, enabled={self.enabled}, merged={self.merged}")


class _Adapted:
    """What LoRALinear and LoConConv2d share: the adapters, their switches, merge/unmerge."""

    def _setup(self, base):
        self.weight, self.bias = base.weight, base.bias
        self.train(base.training)
        self.adapters = AdapterDict()
        self.fused = True
        self.register_buffer("unmerged_weight", None, persistent=False)  # the base weight while anything is merged
        self.merge_order = []

    def add_adapter(self, name, rank, alpha=None, dtype=torch.float32, generator=None, factors=None):
        """A new adapter; alpha None -> rank (scale 1). factors: its (down, up) (a file's), copied in; None: a fresh
        one, down kaiming-uniform and up zero. Copying draws no random numbers, so a file loads while another
        thread captures a CUDA graph (a draw from the CUDA generator outside that capture is an error then)."""
        if not NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-'")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter {name!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        down_shape, up_shape = self.factor_shapes(rank)
        device = self.weight.device
        if factors is not None:  # into tensors of this layer's factor shapes, device and dtype
            down, up = (torch.empty(shape, device=device, dtype=dtype).copy_(f)
                        for shape, f in zip((down_shape, up_shape), factors))
        else:
            # drawn where the generator lives (a CPU generator: the same initial adapter on a CPU and on a GPU)
            down = torch.empty(down_shape, device=generator.device if generator is not None else device, dtype=dtype)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            down = down.to(device)
            up = torch.zeros(up_shape, device=device, dtype=dtype)
        self.adapters[name] = Adapter(down, up, rank if alpha is None else alpha)
        return self.adapters[name]

    def remove_adapter(self, name):
        self.unmerge(name)
        del self.adapters[name]

    def configure(self, name, weight=None, block_weight=None, enabled=None):
        """Change an adapter's switches (None: keep); a merged adapter is merged again with the new ones."""
        a = self.adapters[name]
        merged = a.merged
        self.unmerge(name)
        a.global_weight = a.global_weight if weight is None else float(weight)
        a.block_weight = a.block_weight if block_weight is None else float(block_weight)
        a.enabled = a.enabled if enabled is None else bool(enabled)
        if merged:
            self.merge(name)

    def delta_weight(self, name):
        """gain * up @ down (zero if disabled), shaped like the base weight, computed in float32."""
        return self._delta(self.adapters[name])

    def _delta(self, a):
        delta = a.up.detach().float().flatten(1) @ a.down.detach().float().flatten(1)
        return (delta * (a.gain if a.enabled else 0.0)).view(self.weight.shape)

    @torch.no_grad()
    def merge(self, name):
        a = self.adapters[name]
        if a.merged:
            return
        if self.unmerged_weight is None:
            self.unmerged_weight = self.weight.detach().clone()
        self.weight.add_(self.delta_weight(name).to(self.weight))
        a.merged = True
        self.merge_order.append(name)

    @torch.no_grad()
    def unmerge(self, name):
        a = self.adapters[name]
        if not a.merged:
            return
        a.merged = False
        self.merge_order.remove(name)
        self.weight.copy_(self.unmerged_weight)  # exact: no subtraction, no drift
        for other in self.merge_order:
            self.weight.add_(self.delta_weight(other).to(self.weight))
        if not self.merge_order:
            self.unmerged_weight = None

    def base_weight(self):
        """The base weight without merged adapters."""
        return self.weight if self.unmerged_weight is None else self.unmerged_weight

    def active(self, skip=()):
        """The adapters that run unmerged (enabled, gain not 0), less those named in skip."""
        return [a for n, a in self.adapters.items() if a.enabled and not a.merged and a.gain != 0 and n not in skip]

    # -- the capture interface: what a CUDA-graph capture (minisd.fast) reads, so that it needs no lora internals

    @torch.no_grad()
    def capture_weight(self, skip=()):
        """The weight that computes what this layer computes now, with its own bias and conv settings: the weight
        itself (merged adapters are in it) when no adapter is active, else a new tensor, the weight plus every active
        adapter's delta_weight summed in float32 and rounded once to the weight's dtype. skip: adapter names left
        out (a capture that gates them per step: capture_factors)."""
        active = self.active(skip)
        if not active:
            return self.weight
        w = self.weight.detach().float()
        for a in active:
            w = w + self._delta(a)
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def stacked_factors(self):
        """(A, gB) of the active adapters, as the fused functions stack them: the downs [R, in (* kh * kw)] and the
        ups times their gains [out, R], in the weight's dtype; None when no adapter is active."""
        active = self.active()
        if not active:
            return None
        return _factors([a.down for a in active], [a.up for a in active], [a.gain for a in active], self.weight.dtype)

    @torch.no_grad()
    def capture_factors(self, name):
        """(down, gain * up) of adapter `name`, shaped as its own factors, in the weight's dtype, if it is active
        here; else None. With W' = capture_weight(skip=[name]), plain_forward(x, W', bias, [down], [gain * up], [1])
        computes what the layer computes now; a gate g in place of the 1 scales the adapter's share."""
        a = self.adapters[name] if name in self.adapters else None
        if a is None or a not in self.active():
            return None
        return a.down.detach().to(self.weight.dtype), (a.up.detach().float() * a.gain).to(self.weight.dtype)

    def capture_signature(self):
        """A hashable value that changes whenever capture_weight() or stacked_factors() would (which adapters are
        active, their gains, their factors replaced or changed in place) or the forward path (`fused`) does."""
        return self.fused, tuple((id(a), a.gain, a.down.data_ptr(), a.down._version, a.up.data_ptr(), a.up._version)
                                 for a in self.active())

    def forward(self, x):
        active = self.active()
        if not active:
            return super().forward(x)
        x = x.to(compute_dtype(x))
        downs, ups, gains = [a.down for a in active], [a.up for a in active], [a.gain for a in active]
        frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if self.fused and frozen:
            return self.fused_forward(x, self.weight, self.bias, downs, ups, gains)
        cast = lambda t: None if t is None else t.to(x.dtype)  # what autocast does, also without autocast
        return self.plain_forward(x, cast(self.weight), cast(self.bias), [*map(cast, downs)], [*map(cast, ups)], gains)


class LoRALinear(_Adapted, nn.Linear):
    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self._setup(base)

    def factor_shapes(self, rank):
        return (rank, self.in_features), (self.out_features, rank)

    def fused_forward(self, x, w, b, downs, ups, gains):
        return lora_linear(x, w, b, downs, ups, gains)

    def plain_forward(self, x, w, b, downs, ups, gains):
        y = F.linear(x, w, b)
        for d, u, g in zip(downs, ups, gains):
            y = y + g * F.linear(F.linear(x, d), u)
        return y

    def unwrap(self):
        """A plain nn.Linear holding the same base Parameters (the adapters must be unmerged)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


class LoConConv2d(_Adapted, nn.Conv2d):
    def __init__(self, base: nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError("LoCon supports convs with groups=1, zero padding given as numbers")
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, bias=base.bias is not None, device="meta")
        self._setup(base)

    def factor_shapes(self, rank):
        return (rank, self.in_channels, *self.kernel_size), (self.out_channels, rank, 1, 1)

    def fused_forward(self, x, w, b, downs, ups, gains):
        return locon_conv2d(x, w, b, downs, ups, gains, self.stride, self.padding, self.dilation)

    def plain_forward(self, x, w, b, downs, ups, gains):
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        for d, u, g in zip(downs, ups, gains):
            y = y + g * F.conv2d(F.conv2d(x, d, None, self.stride, self.padding, self.dilation), u)
        return y

    def unwrap(self):
        """A plain nn.Conv2d holding the same base Parameters (the adapters must be unmerged)."""
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


def wrap(module):
    """nn.Linear -> LoRALinear, nn.Conv2d -> LoConConv2d; an already wrapped layer is returned as it is."""
    if isinstance(module, _Adapted):
        return module
    if isinstance(module, nn.Linear):
        return LoRALinear(module)
    if isinstance(module, nn.Conv2d):
        return LoConConv2d(module)
    raise TypeError(f"cannot adapt a {type(module).__name__}; only nn.Linear and nn.Conv2d")


def is_adapted(module):
    return isinstance(module, _Adapted)
