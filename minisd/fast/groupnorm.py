"""GroupNorm that keeps a channels_last activation channels_last (on CUDA).

PyTorch's CUDA group_norm makes an NCHW copy of a channels_last input and returns NCHW, and the next conv (with
channels_last weights) copies it back: two full copies per norm (their share of a step:
docs/performance.md#channels_last-and-groupnorm). For a channels_last CUDA input, GroupNorm.forward computes the
same in the input's layout:

    per (sample, group): float32 sums of x and x^2 (column sums of the [B, H*W, C] view, no copy)
    mean, var = E[x^2] - mean^2, rstd = 1 / sqrt(var + eps)                              [B, G]
    y = a x + b,  a = rstd * gamma,  b = beta - mean * a                                  one pass: float32 math
                                                                                          (a, b float16 for float16 x)
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


class GroupNormNHWC(torch.autograd.Function):
    """x [B, C, H, W] channels_last = [B, H*W, C] in memory: every reduction below runs down the columns of that
    matrix (coalesced, no copy), and the per-group sums come from the per-channel ones ([B, C] -> [B, G])."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        B, C, H, W = x.shape
        x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
        n = H * W * C // groups
        # a, b (and the math of y = a x + b) in float16 for float16 x: one dtype makes a faster kernel
        # (docs/performance.md#channels_last-and-groupnorm), and the error is PyTorch's own kernel's (3e-4 against
        # float32); bfloat16 (8-bit mantissa) and float32 keep float32 a, b
        ab = torch.float16 if x.dtype == torch.float16 else torch.float32
        sums = x3.new_empty(2, B, C, dtype=torch.float32)  # per channel: sums of x and of x^2 (few, small kernels)
        torch.sum(x3, 1, dtype=torch.float32, out=sums[0])
        torch.linalg.vector_norm(x3, dim=1, dtype=torch.float32, out=sums[1])
        sums[1].square_()
        mean, ex2 = sums.view(2, B, groups, -1).sum(3).div_(n)  # [B, G] each
        rstd = torch.addcmul(ex2, mean, mean, value=-1).clamp_min_(0).add_(eps).rsqrt_()  # E[x^2] - mean^2
        a = torch.mul(rstd[:, :, None], weight.view(groups, -1), out=x3.new_empty(B, groups, C // groups, dtype=ab))
        # beta - mean a
        b = torch.addcmul(bias.view(groups, -1), mean[:, :, None], a, value=-1, out=torch.empty_like(a))
        ctx.save_for_backward(x, weight, mean, rstd, a)
        y = torch.addcmul(b.view(B, 1, C), x3, a.view(B, 1, C), out=torch.empty_like(x3))
        return y.view(B, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd, a = ctx.saved_tensors
        B, C, H, W = x.shape
        G = mean.shape[1]
        n = H * W * C // G
        g3 = g.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(B, H * W, C)
        x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
        gamma = weight.float().view(1, G, -1)
        db = g3.sum(1, dtype=torch.float32).view(B, G, -1)  # per channel: sum of g, sum of g * x
        ds = (g3 * x3).sum(1, dtype=torch.float32).view(B, G, -1)
        mean_u = (gamma * db).sum(2) / n  # group means of u = gamma * g and of u * xhat       [B, G]
        mean_ux = rstd * (gamma * (ds - mean[:, :, None] * db)).sum(2) / n
        c1 = -rstd.square() * mean_ux
        c2 = -rstd * mean_u - c1 * mean
        c1, c2 = (c.repeat_interleave(C // G, 1)[:, None] for c in (c1, c2))  # [B, 1, C]
        gx = torch.addcmul(c2, x3, c1, out=torch.empty_like(x3)).addcmul_(g3, a.view(B, 1, C))
        return gx.view(B, H, W, C).permute(0, 3, 1, 2), None, None, None, None


def group_norm_nhwc(x, groups, weight, bias, eps):
    """F.group_norm for a channels_last x with frozen weight and bias, computed in x's layout."""
    return GroupNormNHWC.apply(x, groups, weight, bias, eps)


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and names; minisd.fast.speed_up swaps it in) that takes the channels_last
    path above on CUDA, for activations large enough that the two copies cost more than its extra small kernels
    (the thresholds come from docs/performance.md#channels_last-and-groupnorm)."""

    @classmethod
    def of(cls, norm):
        """The same norm (its own weight and bias Parameters, eps, train/eval) as a ChannelsLastGroupNorm."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        new.weight, new.bias = norm.weight, norm.bias
        return new.train(norm.training)

    def forward(self, x):
        grad = torch.is_grad_enabled() and x.requires_grad
        frozen = not (grad and (self.weight.requires_grad or self.bias.requires_grad))
        if (x.is_cuda and self.affine and frozen and x.dim() == 4 and x.numel() >= (2 ** 23 if grad else 2 ** 21)
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
