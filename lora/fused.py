"""Fused low-rank forward/backward for a frozen base layer plus n adapters, in plain PyTorch.

Linear, with A_i = down [r_i, in], B_i = up [out, r_i], g_i = the adapter's gain (alpha/r * multipliers):

    y = x W^T + b + sum_i g_i (x A_i^T) B_i^T

forward:  h = x [W; A_1; ...; A_n]^T + [b; 0]    one GEMM gives the base output and every z_i = x A_i^T
          y = h[:, :out] + z [g_1 B_1, ..., g_n B_n]^T     one addmm for all up projections (gains folded into B)
saved:    x (alive anyway for the previous layer), W (frozen, no copy) and z [N, sum r] (small)
backward: gz = gy [g B]                      [N, R]
          gA = gz^T x                        one GEMM for all downs, split by rank
          gB_i = g_i gy^T z_i                one GEMM for all ups, split by rank
          gx = gy W + gz [A]                 mm + in-place addmm
          no gradient for W and b: the base is frozen (callers use the plain path when it is not).

Conv2d is the same with a k x k conv for [W; A] (the layer's stride/padding/dilation, concatenated along the
output channels) and a 1x1 conv (a matmul over channels) for the ups.

All tensors must share one dtype: the layers cast to the autocast dtype (or x's dtype) before calling, so these
functions never depend on the autocast state, which may differ between forward and backward.
"""
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight


def _scaled_ups(ups, gains):
    return torch.cat([u * g for u, g in zip(ups, gains)], dim=1)  # [out, R(, 1, 1)]


def _padded_bias(bias, extra):
    return None if bias is None else torch.cat([bias, bias.new_zeros(extra)])


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gains, *factors):
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        out = weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, torch.cat([weight, *downs]), _padded_bias(bias, sum(d.shape[0] for d in downs)))
        z = h[:, out:].contiguous()  # a copy, so that the [N, out] part of h is not kept alive
        y = torch.addmm(h[:, :out], z, _scaled_ups(ups, gains).t())
        ctx.save_for_backward(x, weight, z, *factors)
        ctx.gains = gains
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, gy):
        x, weight, z, *factors = ctx.saved_tensors
        gains, need = ctx.gains, ctx.needs_input_grad
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        ranks = [d.shape[0] for d in downs]
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, weight.shape[0])
        gz = gy2 @ _scaled_ups(ups, gains)  # [N, R]
        gx = torch.mm(gy2, weight).addmm_(gz, torch.cat(downs)).view(x.shape) if need[0] else None
        gdowns = (gz.t() @ x2).split(ranks) if any(need[4:4 + n]) else (None,) * n
        gups = ((gy2.t() @ z).split(ranks, dim=1) if any(need[4 + n:]) else (None,) * n)
        gups = [None if g is None else g * s for g, s in zip(gups, gains)]
        return (gx, None, None, None, *gdowns, *gups)


class LoConConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, gains, *factors):
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        out = weight.shape[0]
        h = F.conv2d(x, torch.cat([weight, *downs]), _padded_bias(bias, sum(d.shape[0] for d in downs)), *conv)
        z = h[:, out:].contiguous()  # [N, R, H', W']
        y = h[:, :out] + F.conv2d(z, _scaled_ups(ups, gains))
        ctx.save_for_backward(x, weight, z, *factors)
        ctx.gains, ctx.conv = gains, conv
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, z, *factors = ctx.saved_tensors
        gains, conv, need = ctx.gains, ctx.conv, ctx.needs_input_grad
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        ranks = [d.shape[0] for d in downs]
        up = _scaled_ups(ups, gains)  # [out, R, 1, 1]
        gz = F.conv2d(gy, up.transpose(0, 1))  # the 1x1 up conv's input gradient, [N, R, H', W']
        gx = None
        if need[0]:  # one transposed conv through [W; A] with [gy, gz]
            gx = conv2d_input(x.shape, torch.cat([weight, *downs]), torch.cat([gy, gz], dim=1), *conv)
        gdowns = (None,) * n
        if any(need[5:5 + n]):
            gdowns = conv2d_weight(x, (sum(ranks), *downs[0].shape[1:]), gz, *conv).split(ranks)
        gups = (None,) * n
        if any(need[5 + n:]):
            gups = [g * s for g, s in zip(conv2d_weight(z, up.shape, gy).split(ranks, dim=1), gains)]
        return (gx, None, None, None, None, *gdowns, *gups)


def lora_linear(x, weight, bias, downs, ups, gains):
    """x [..., in] -> [..., out] through the fused function (all tensors of one dtype)."""
    return LoRALinearFunction.apply(x, weight, bias, tuple(gains), *downs, *ups)


def locon_conv2d(x, weight, bias, downs, ups, gains, stride, padding, dilation):
    """x [N, in, H, W] -> [N, out, H', W'] through the fused function (all tensors of one dtype, groups=1)."""
    return LoConConv2dFunction.apply(x, weight, bias, (stride, padding, dilation), tuple(gains), *downs, *ups)


def compute_dtype(x):
    """The dtype a layer computes in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
