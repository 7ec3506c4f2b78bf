"""Fused low-rank forward/backward for a frozen base layer plus n adapters, in plain PyTorch.

Linear, with A_i = down [r_i, in], B_i = up [out, r_i], g_i = the adapter's gain (lora.layers: scale * weights), and all
adapters stacked: A = [A_1; ...; A_n] [R, in], gB = [g_1 B_1, ..., g_n B_n] [out, R]:

    y = x W^T + b + sum_i g_i (x A_i^T) B_i^T  =  x W'^T + b,    W' = W + gB A   (folded: one small addmm)

forward:  W' = W + gB A                    [out, in], as many elements as the one copy autocast makes of W anyway
          y  = x W'^T + b                  the base layer's own GEMM, nothing more over [N, out]
          z  = x A^T                       [N, R], saved with x and W as given
backward: W' recomputed                    (cheaper than keeping a copy of every adapted weight alive)
          gx = gy W'                       one GEMM, as for the base layer alone
          gz = gy gB                       [N, R]
          gA = gz^T x,  gB_i = g_i gy^T z_i     one GEMM each for all adapters, split by rank
          no gradient for W and b: the base is frozen (callers use the plain path when it is not).
So beyond the frozen layer's own two GEMMs: one rank-R product per pass and three in the backward, each reading
one [N, in] or [N, out] activation once; the plain composition adds more launches and two extra passes over the
[N, out] output in each direction (scale, add).

With fewer rows than W has columns (see _fold) forming W' costs more than it saves, and the adapters are added
unfolded: y = (x W^T + b) + z gB^T (one addmm), gx = (gy W) + gz A (in place). Without autograd (sampling with
unmerged adapters) only the forward's GEMM(s) run.

Conv2d is the same with W' = W + gB A over the flattened k x k kernels, the layer's conv (stride/padding/dilation)
for y and z, its transposed conv for gx, and 1x1 convs (matmuls over channels) for the up projection.

Precision: W' is rounded once to the compute dtype, as a merged weight is; in bf16 that is the same relative
error as the plain path's rounding of y0 + u. The factors' gradients never go through W'.
Everything is computed in x's dtype: the layers cast x to the autocast dtype (or leave it) and W, b and the factors
are converted here, so these functions never depend on the autocast state, which may differ between forward and
backward. Gradients come back in each factor's own dtype (float32 masters stay float32).
"""
import torch
import torch.nn.functional as F


def _factors(downs, ups, gains, dtype):
    """A = [A_1; ...] [R, in(*kh*kw)] and gB = [g_1 B_1, ...] [out, R], in dtype (small copies; with one adapter
    no concatenation, and no multiply at gain 1: in an eager loop every kernel launch counts)."""
    ups = [u.flatten(1) if g == 1 else u.flatten(1) * g for u, g in zip(ups, gains)]
    down = downs[0].flatten(1) if len(downs) == 1 else torch.cat([d.flatten(1) for d in downs])
    up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
    return down.to(dtype), up.to(dtype)


def _folded(weight, down, up, dtype):
    """W + gB A in dtype, shaped (and laid out) like W: one addmm, rounded once."""
    if weight.dim() == 4 and not weight.is_contiguous():  # a channels_last kernel: fold over [out, kh, kw, in]
        w = weight.permute(0, 2, 3, 1)
        down = down.view(-1, *weight.shape[1:]).permute(0, 2, 3, 1).reshape(down.shape[0], -1)
        return torch.addmm(w.reshape(w.shape[0], -1).to(dtype), up, down).view(w.shape).permute(0, 3, 1, 2)
    return torch.addmm(weight.flatten(1).to(dtype), up, down).view(weight.shape)


def _fold(rows, weight):
    """Fold the adapters into W when the activation has at least as many rows (tokens, or output pixels for a
    conv) as W has columns: then W' costs less than the extra passes over the activations it saves. With fewer
    rows (the text encoder's 77 tokens into a 768-wide layer, small maps at batch 1) the forward adds z gB^T to the
    base output and the backward adds gz A to gy W instead."""
    return rows >= weight.numel() // weight.shape[0]


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _linear(x2, weight, bias, down, up, keep_z):
    """x2 [N, in] -> (y [N, out], z = x2 A^T [N, R] or None, folded?): y folded, or the base output plus z gB^T.
    z is computed when kept for the backward or needed unfolded."""
    dt, fold = x2.dtype, _fold(x2.shape[0], weight)
    z = x2 @ down.t() if keep_z or not fold else None
    if fold:
        return F.linear(x2, _folded(weight, down, up, dt), _cast(bias, dt)), z, fold
    return torch.addmm(F.linear(x2, weight.to(dt), _cast(bias, dt)), z, up.t()), z, fold


def _conv(x, weight, bias, down, up, conv, keep_z):
    """The conv analogue of _linear: (y, z = conv(x, A) [N, R, H', W'] or None, folded?)."""
    dt, (stride, padding, dilation) = x.dtype, conv
    pixels = x.shape[0]
    for i in (0, 1):  # output height and width
        pixels *= (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
    fold = _fold(pixels, weight)
    z = F.conv2d(x, down.view(-1, *weight.shape[1:]), None, *conv) if keep_z or not fold else None
    if fold:
        return F.conv2d(x, _folded(weight, down, up, dt), _cast(bias, dt), *conv), z, fold
    y = F.conv2d(x, weight.to(dt), _cast(bias, dt), *conv)
    if not (y.is_contiguous(memory_format=torch.channels_last) and z.is_contiguous(memory_format=torch.channels_last)):
        return y + F.conv2d(z, up[:, :, None, None]), z, fold
    rows = lambda t: t.permute(0, 2, 3, 1).view(-1, t.shape[1])  # channels_last [N, C, H, W] = [N*H*W, C]: a view
    rows(y).addmm_(rows(z), up.t())  # the 1x1 up conv and the sum in one GEMM
    return y, z, fold


def _grads_like(grads, tensors):
    return [g.to(t.dtype) for g, t in zip(grads, tensors)]


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gains, *factors):
        n, dt = len(gains), x.dtype
        down, up = _factors(factors[:n], factors[n:], gains, dt)
        y, z, ctx.fold = _linear(x.reshape(-1, x.shape[-1]), weight, bias, down, up, keep_z=True)
        ctx.save_for_backward(x, weight, z, *factors)  # the weight as given: no low-precision copy is kept
        ctx.gains = gains
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, weight, z, *factors = ctx.saved_tensors
        gains, need, dt = ctx.gains, ctx.needs_input_grad, x.dtype
        n = len(gains)
        downs, ups = factors[:n], factors[n:]
        ranks = [d.shape[0] for d in downs]
        down, up = _factors(downs, ups, gains, dt)
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, weight.shape[0]).to(dt)
        gz = gy2 @ up  # [N, R]
        gx = None
        if need[0]:
            gx = gy2 @ _folded(weight, down, up, dt) if ctx.fold else (gy2 @ weight.to(dt)).addmm_(gz, down)
            gx = gx.view(x.shape)
        gdowns = _grads_like(gz.t().mm(x2).split(ranks), downs) if any(need[4:4 + n]) else (None,) * n
        gups = (None,) * n
        if any(need[4 + n:]):
            gups = _grads_like([g * s for g, s in zip((gy2.t() @ z).split(ranks, dim=1), gains)], ups)
        return (gx, None, None, None, *gdowns, *gups)


class LoConConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, gains, *factors):
        n, dt = len(gains), x.dtype
        down, up = _factors(factors[:n], factors[n:], gains, dt)
        y, z, ctx.fold = _conv(x, weight, bias, down, up, conv, keep_z=True)
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
        down, up = _factors(downs, ups, gains, dt)
        gy = gy.to(dt)
        down = down.view(-1, *weight.shape[1:])  # [R, in, kh, kw]
        gz = F.conv2d(gy, up.t()[:, :, None, None])  # the 1x1 up conv's input gradient, [N, R, H', W']
        gx = None
        if need[0]:
            w = _folded(weight, down.flatten(1), up, dt) if ctx.fold else weight.to(dt)
            gx = _conv_grad(gy, x, w, conv, input=True)
            if not ctx.fold:
                gx += _conv_grad(gz, x, down, conv, input=True)
        gdowns = (None,) * n
        if any(need[5:5 + n]):
            gdowns = _grads_like(_conv_grad(gz, x, down, conv).split(ranks), downs)
        gups = (None,) * n
        if any(need[5 + n:]):
            gup = _conv_grad(gy, z, up[:, :, None, None], ((1, 1), (0, 0), (1, 1)))
            gups = _grads_like([g * s for g, s in zip(gup.split(ranks, dim=1), gains)], ups)
        return (gx, None, None, None, None, *gdowns, *gups)


def _conv_grad(gy, x, w, conv, input=False):
    """The input gradient (input=True) or the weight gradient of conv2d(x, w, *conv), from aten's convolution
    backward with the real x and w, so that cuDNN sees their layouts (channels_last stays channels_last)."""
    stride, padding, dilation = conv
    gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, (0, 0), 1,
                                                   (input, not input, False))
    return gx if input else gw


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lora_linear(x, weight, bias, downs, ups, gains):
    """x [..., in] -> [..., out] through the fused function, computed in x's dtype (the other tensors may be
    of any float dtype, e.g. float32 masters under autocast; their gradients come back in their own dtype).
    Without autograd it is the folded weight's one GEMM."""
    if not _wants_grad(x, *downs, *ups):
        y, _, _ = _linear(x.reshape(-1, x.shape[-1]), weight, bias, *_factors(downs, ups, gains, x.dtype), keep_z=False)
        return y.view(*x.shape[:-1], weight.shape[0])
    return LoRALinearFunction.apply(x, weight, bias, tuple(gains), *downs, *ups)


def locon_conv2d(x, weight, bias, downs, ups, gains, stride, padding, dilation):
    """x [N, in, H, W] -> [N, out, H', W'] through the fused function (groups=1), computed in x's dtype."""
    if not _wants_grad(x, *downs, *ups):
        down, up = _factors(downs, ups, gains, x.dtype)
        return _conv(x, weight, bias, down, up, (stride, padding, dilation), keep_z=False)[0]
    return LoConConv2dFunction.apply(x, weight, bias, (stride, padding, dilation), tuple(gains), *downs, *ups)


def compute_dtype(x):
    """The dtype a layer computes in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
