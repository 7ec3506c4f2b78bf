"""GroupNorm that keeps a channels_last activation channels_last (on CUDA).

PyTorch's CUDA group_norm makes an NCHW copy of a channels_last input and returns NCHW, and the next conv (with
channels_last weights) copies it back: two full copies per norm, ~15 % of a guided SD 1.4 step on an H100
(bench/kernels.py). For a channels_last CUDA input, GroupNorm.forward computes the same in the input's layout:

    per (sample, group): float32 sums of x and x^2 over the [B, H*W, G, C/G] view (no copy)
    mean, var = E[x^2] - mean^2, rstd = 1 / sqrt(var + eps)                              [B, G]
    y = a x + b,  a = rstd * gamma,  b = beta - mean * a                                  one pass: float32 math,
                                                                                          stored in x's dtype
backward (gamma and beta frozen, as in LoRA training):
    dx = a g + c1 x + c2,  c1 = -rstd^2 mean_n(gamma g xhat),  c2 = -rstd mean_n(gamma g) - c1 mean
    from float32 per-channel sums of g and g*x.

E[x^2] - mean^2 loses digits when |mean| >> std within a group (PyTorch's kernel uses Welford's update): with
float32 sums the relative error of var is ~1e-7 * mean^2 / var, far below half precision's own rounding for
the activations of SD. Anything else (CPU, NCHW, a trainable gamma/beta) runs F.group_norm.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _per_channel(t, channels):
    """[B, G] -> [B, C, 1, 1], each group's value repeated over its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)[:, :, None, None]


class GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        B, C, H, W = x.shape
        xv = x.permute(0, 2, 3, 1).view(B, H * W, groups, C // groups)  # channels_last memory: a view
        n = xv[0, :, 0].numel()
        mean = xv.sum((1, 3), dtype=torch.float32) / n  # [B, G]
        var = torch.linalg.vector_norm(xv, dim=(1, 3), dtype=torch.float32).square() / n - mean.square()
        rstd = (var.clamp_min(0) + eps).rsqrt()
        a = _per_channel(rstd, C) * weight.float()[:, None, None]  # [B, C, 1, 1]
        b = bias.float()[:, None, None] - _per_channel(mean, C) * a
        ctx.save_for_backward(x, weight, mean, rstd, a)
        return torch.addcmul(b, x, a, out=torch.empty_like(x))  # float32 math, one rounding to x's dtype

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd, a = ctx.saved_tensors
        B, C, H, W = x.shape
        G = mean.shape[1]
        n = H * W * (C // G)
        g = g.contiguous(memory_format=torch.channels_last)
        gv, xv = g.permute(0, 2, 3, 1).view(B, H * W, C), x.permute(0, 2, 3, 1).view(B, H * W, C)
        gamma = weight.float().view(1, G, C // G)
        db = gv.sum(1, dtype=torch.float32).view(B, G, -1)  # [B, G, C/G]
        ds = (gv * xv).sum(1, dtype=torch.float32).view(B, G, -1)
        mean_u = (gamma * db).sum(2) / n  # mean over the group of gamma * g          [B, G]
        mean_ux = rstd * (gamma * (ds - mean[:, :, None] * db)).sum(2) / n  # ... of gamma * g * xhat
        c1 = -rstd.square() * mean_ux
        c2 = -rstd * mean_u - c1 * mean
        gx = torch.addcmul(_per_channel(c2, C), x, _per_channel(c1, C), out=torch.empty_like(x))
        return gx.addcmul_(g, a), None, None, None, None


def group_norm_nhwc(x, groups, weight, bias, eps):
    """F.group_norm for a channels_last x with frozen weight and bias, computed in x's layout."""
    return GroupNormNHWC.apply(x, groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and names) that takes the channels_last path above on CUDA."""

    def forward(self, x):
        frozen = not (self.weight.requires_grad or self.bias.requires_grad) or not torch.is_grad_enabled()
        if (x.is_cuda and self.affine and frozen and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
