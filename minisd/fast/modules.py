"""Module swaps: subclasses of the core's modules that compute the same with less memory or fewer copies.

speed_up(model) replaces, the way lora.inject wraps layers (the same Parameters and buffers, the same state-dict
keys, the same module names), every module that is exactly one of the core's (stock.stock):
    nn.GroupNorm       -> ChannelsLastGroupNorm: keeps a channels_last CUDA activation channels_last (fast.groupnorm)
    unet.GEGLU         -> LeanGEGLU: its backward keeps only the projection's output (a quarter of the feed-forward's
                          saved activations less), and writes both halves of the gradient into one tensor
    vae.ResnetBlock    -> InPlaceResnetBlock: without autograd (decoding) the SiLUs and the residual add run in place:
                          at the decoder's memory peak (512², 256 channels, fp16) the norm's output and the activation
                          would be two 134 MB tensors per image
Each computes what the module it replaces computes; an edited module (a subclass, a replaced forward) stays as it is.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import unet as U
from .. import vae as V
from .groupnorm import ChannelsLastGroupNorm
from .stock import BLOCKS, stock, unchanged


def _as(cls, m):
    """A cls (a subclass of type(m)) holding m's own submodules, Parameters, buffers and attributes."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in vars(m).items() if not k.startswith("_")})
    for name, child in m.named_children():
        setattr(new, name, child)
    for name, p in m.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in m.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
    return new


class GatedGELU(torch.autograd.Function):
    """h = [a, gate] -> geglu(a, gate) = a * gelu(gate). Saves only h and recomputes gelu(gate) in the backward,
    writing both halves of dh into one tensor: autograd's version would also keep gelu(gate) and concatenate the two
    halves' gradients. The backward is the derivative of minisd.unet's original geglu (stock.unchanged)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return BLOCKS["geglu"](*h.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, g):
        h, = ctx.saved_tensors
        a, gate = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        da, dgate = dh.chunk(2, dim=-1)
        torch.mul(g, F.gelu(gate), out=da)
        torch.ops.aten.gelu_backward.grad_input(g * a, gate, grad_input=dgate)
        return dh


class LeanGEGLU(U.GEGLU):
    def forward(self, x):
        if not unchanged("geglu"):  # another gated GELU: GatedGELU's backward would be wrong for it
            return super().forward(x)
        return GatedGELU.apply(self.proj(x))


class InPlaceResnetBlock(V.ResnetBlock):
    def forward(self, x):
        if torch.is_grad_enabled():
            return super().forward(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))  # conv2's output is ours: one tensor less at the peak


def _faster(m):
    if stock(m, nn.GroupNorm):
        return ChannelsLastGroupNorm.of(m)
    if stock(m, U.GEGLU):
        return _as(LeanGEGLU, m)
    if stock(m, V.ResnetBlock):
        return _as(InPlaceResnetBlock, m)
    return None


def speed_up(model):
    """Swap the modules above into model (in place; returns it), innermost first. Idempotent."""
    for name, child in list(model.named_children()):
        speed_up(child)
        new = _faster(child)
        if new is not None:
            setattr(model, name, new)
    return model
