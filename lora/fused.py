"""Fused low-rank forward/backward for a frozen base layer plus n adapters, in plain PyTorch.

Linear, with A_i = down [r_i, in], B_i = up [out, r_i], g_i = the adapter's gain (alpha/r * multipliers):

    y = x W^T + b + sum_i g_i (x A_i^T) B_i^T

forward:  h = x [W; A_1; ...; A_n]^T + [b; 0]    one GEMM gives the base output and every z_i = x A_i^T
          y = h[:, :out] + z [g_1 B_1, ..., g_n B_n]^T     one addmm for all up projections (gains folded into B)
saved:    x (alive anyway for the previous layer), W as given (no copy) and z [N, sum r] (small)
backward: gz = gy [g B]                      [N, R]
          gA = gz^T x                        one GEMM for all downs, split by rank
          gB_i = g_i gy^T z_i                one GEMM for all ups, split by rank
          gx = gy W + gz [A]                 mm + in-place addmm
          no gradient for W and b: the base is frozen (callers use the plain path when it is not).

Conv2d is the same with a k x k conv for [W; A] (the layer's stride/padding/dilation, concatenated along the
output channels) and a 1x1 conv (a matmul over channels) for the ups; its backward runs one transposed conv of
[gy, gz] through [W; A] for gx.

Cost: stacking [W; A] copies W once per forward (and in the conv backward). Under autocast that is the copy
autocast makes anyway; with base and activations already in one dtype it is an extra pass over W that the plain
path does not make (small next to the GEMM for SD-sized activations). On an H200 at SD-1.4 layer sizes (bf16
autocast, 2 adapters) single layers are launch-bound (~1-2 ms forward+backward either way) and fused and plain
were within about 20 % of each other, either way round; a whole-U-Net benchmark decides.

Everything is computed in x's dtype: the layers cast x to the autocast dtype (or leave it), and W, b and the
factors are converted inside ([W; A] stacked and converted in one copy, as autocast would make one copy of W), so
these functions never depend on the autocast state, which may differ between forward and backward. Gradients come
back in each factor's own dtype (float32 masters stay float32).
"""
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight


def _stack(parts, dtype):
    """torch.cat(parts) converted to dtype in one pass: one copy of the base weight per call, as autocast makes."""
    if all(p.dtype == dtype for p in parts):
        return torch.cat(parts)
    out = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype)
    i = 0
    for p in parts:
        out[i:i + p.shape[0]].copy_(p)
        i += p.shape[0]
    return out


def _scaled_ups(ups, gains, dtype):
    return torch.cat([u * g for u, g in zip(ups, gains)], dim=1).to(dtype)  # [out, R(, 1, 1)], small


def _padded_bias(bias, extra, dtype):
    return None if bias is None else torch.cat([bias.to(dtype), bias.new_zeros(extra, dtype=dtype)])


def _grads_like(grads, tensors):
    return [g.to(t.dtype) for g, t in zip(grads, tensors)]


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gains, *factors):
        n, dt = len(gains), x.dtype
        downs, ups = factors[:n], factors[n:]
        out = weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, _stack([weight, *downs], dt), _padded_bias(bias, sum(d.shape[0] for d in downs), dt))
        z = h[:, out:].contiguous()  # a copy, so that the [N, out] part of h is not kept alive
        y = torch.addmm(h[:, :out], z, _scaled_ups(ups, gains, dt).t())
        ctx.save_for_backward(x, weight, z, *factors)  # the weight as given: no low-precision copy is kept
        ctx.gains = gains
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, gy):
        x, weight, z, *factors = ctx.saved_tensors
        gains, need, dt = ctx.gains, ctx.needs_input_grad, x.dtype
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        ranks = [d.shape[0] for d in downs]
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, weight.shape[0]).to(dt)
        gz = gy2 @ _scaled_ups(ups, gains, dt)  # [N, R]
        gx = None
        if need[0]:  # gy W + gz [A]: mm, then addmm in place (no copy of gy, none of W when it is in dtype already)
            gx = torch.mm(gy2, weight.to(dt)).addmm_(gz, _stack(downs, dt)).view(x.shape)
        gdowns = _grads_like((gz.t() @ x2).split(ranks), downs) if any(need[4:4 + n]) else (None,) * n
        gups = (None,) * n
        if any(need[4 + n:]):
            gups = _grads_like([g * s for g, s in zip((gy2.t() @ z).split(ranks, dim=1), gains)], ups)
        return (gx, None, None, None, *gdowns, *gups)


class LoConConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, gains, *factors):
        n, dt = len(gains), x.dtype
        downs, ups = factors[:n], factors[n:]
        out = weight.shape[0]
        h = F.conv2d(x, _stack([weight, *downs], dt), _padded_bias(bias, sum(d.shape[0] for d in downs), dt), *conv)
        z = h[:, out:].contiguous()  # [N, R, H', W']
        y = h[:, :out] + F.conv2d(z, _scaled_ups(ups, gains, dt))
        ctx.save_for_backward(x, weight, z, *factors)
        ctx.gains, ctx.conv = gains, conv
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, z, *factors = ctx.saved_tensors
        gains, conv, need, dt = ctx.gains, ctx.conv, ctx.needs_input_grad, x.dtype
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        ranks = [d.shape[0] for d in downs]
        gy = gy.to(dt)
        up = _scaled_ups(ups, gains, dt)  # [out, R, 1, 1]
        gz = F.conv2d(gy, up.transpose(0, 1))  # the 1x1 up conv's input gradient, [N, R, H', W']
        gx = None
        if need[0]:  # one transposed conv through [W; A] with [gy, gz]
            gx = conv2d_input(x.shape, _stack([weight, *downs], dt), torch.cat([gy, gz], dim=1), *conv)
        gdowns = (None,) * n
        if any(need[5:5 + n]):
            gdowns = _grads_like(conv2d_weight(x, (sum(ranks), *downs[0].shape[1:]), gz, *conv).split(ranks), downs)
        gups = (None,) * n
        if any(need[5 + n:]):
            gups = _grads_like([g * s for g, s in zip(conv2d_weight(z, up.shape, gy).split(ranks, dim=1), gains)], ups)
        return (gx, None, None, None, None, *gdowns, *gups)


def lora_linear(x, weight, bias, downs, ups, gains):
    """x [..., in] -> [..., out] through the fused function, computed in x's dtype (the other tensors may be
    of any float dtype, e.g. float32 masters under autocast; their gradients come back in their own dtype)."""
    return LoRALinearFunction.apply(x, weight, bias, tuple(gains), *downs, *ups)


def locon_conv2d(x, weight, bias, downs, ups, gains, stride, padding, dilation):
    """x [N, in, H, W] -> [N, out, H', W'] through the fused function (groups=1), computed in x's dtype."""
    return LoConConv2dFunction.apply(x, weight, bias, (stride, padding, dilation), tuple(gains), *downs, *ups)


def compute_dtype(x):
    """The dtype a layer computes in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
