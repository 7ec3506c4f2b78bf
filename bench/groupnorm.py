"""GroupNorm on a channels_last activation, in plain PyTorch: which formulation is cheapest
(docs/performance.md#channels_last-and-groupnorm).

    python bench/groupnorm.py --out out/bench/groupnorm.json
    python bench/groupnorm.py --smoke --out /tmp/g.json       # the test suite's CPU smoke test: one small shape

fp16 forward at the shapes of a guided SD 1.4 step (batch 2 = one image with CFG) and of batch 8; each timed as 20
calls captured in one CUDA graph (so the replay's own launch cost is spread), with the relative error against a
float32 F.group_norm. Columns:
  pytorch_nchw   F.group_norm on an NCHW tensor: PyTorch's kernel without layout copies (the floor, not an option
                 for a channels_last network)
  pytorch_cl     F.group_norm on the channels_last tensor (PyTorch copies it to NCHW) + the copy back
  minisd         minisd.fast.groupnorm: float32 column sums of x and x^2, then one addcmul
  two_stage      the same sums reduced over W, then over H
  var_mean       one torch.var_mean over (H*W, C/G) of the [B, H*W, G, C/G] view
  bn_per_sample  PyTorch's channels_last batch-norm kernels, one sample at a time: torch.batch_norm_stats (channel
                 means and variances, Welford), combined into the groups', then torch.batch_norm in eval mode with
                 each channel given its group's mean and variance
  silu           F.silu on the same tensor: one elementwise pass, for scale
"""
import torch
import torch.nn.functional as F

import common
from common import graphed, log, table, time_ms
from minisd.fast.groupnorm import group_norm_nhwc

SHAPES = [(2, 320, 64), (2, 640, 64), (2, 960, 64), (2, 640, 32), (2, 1280, 32), (2, 1280, 16), (2, 2560, 16),
          (2, 1280, 8), (2, 2560, 8), (8, 320, 64), (8, 640, 32)]


def affine(s1, s2, n, G, w, b, eps):
    """a, b of y = a x + b per (sample, channel) from the per-group sums of x and x^2, as minisd.fast.groupnorm."""
    B = s1.shape[0]
    mean = s1 / n
    var = torch.addcmul(s2, s1, s1, value=-1 / n).clamp_min_(0) / n
    a = (var + eps).rsqrt_()[:, :, None] * w.view(G, -1)
    return a.view(B, 1, -1), torch.addcmul(b.view(G, -1), mean[:, :, None], a, value=-1).view(B, 1, -1)


def two_stage(x, G, w, b, eps):
    B, C, H, W = x.shape
    x4 = x.permute(0, 2, 3, 1)  # [B, H, W, C], no copy
    s1 = x4.sum(2, dtype=torch.float32).sum(1).view(B, G, -1).sum(2)
    s2 = torch.linalg.vector_norm(x4, dim=2, dtype=torch.float32).square().sum(1).view(B, G, -1).sum(2)
    a, c = affine(s1, s2, H * W * C // G, G, w, b, eps)
    x3 = x4.reshape(B, H * W, C)
    return torch.addcmul(c, x3, a, out=torch.empty_like(x3)).view(B, H, W, C).permute(0, 3, 1, 2)


def var_mean(x, G, w, b, eps):
    B, C, H, W = x.shape
    x4 = x.permute(0, 2, 3, 1).view(B, H * W, G, C // G)
    var, mean = torch.var_mean(x4, dim=(1, 3), correction=0)  # [B, G], in x's dtype
    a = torch.rsqrt(var.float() + eps)[:, :, None] * w.view(G, -1)
    c = torch.addcmul(b.view(G, -1), mean.float()[:, :, None], a, value=-1)
    x3 = x4.view(B, H * W, C)
    return torch.addcmul(c.view(B, 1, C), x3, a.view(B, 1, C), out=torch.empty_like(x3)).view(B, H, W, C).permute(0, 3, 1, 2)


def bn_per_sample(x, G, w, b, eps):
    B, C, H, W = x.shape
    stats = [torch.batch_norm_stats(x[i:i + 1], eps) for i in range(B)]  # float32 channel mean, 1/sqrt(var + eps)
    mean_c = torch.stack([m for m, _ in stats]).view(B, G, -1)
    var_c = torch.stack([s for _, s in stats]).view(B, G, -1).pow(-2) - eps
    mean_g = mean_c.mean(2, keepdim=True)
    var_g = (var_c + (mean_c - mean_g).square()).mean(2, keepdim=True)  # the groups' variance from their channels'
    rm, rv = (v.expand(B, G, C // G).reshape(B, C) for v in (mean_g, var_g))
    y = torch.empty_like(x)
    for i in range(B):
        y[i:i + 1] = torch.batch_norm(x[i:i + 1], w, b, rm[i], rv[i], False, 0.0, eps, True)
    return y


def per_call_us(fn, dev, n=20):
    """fn's time per call: n calls captured in one graph, replayed (off CUDA: one call)."""
    n = n if dev.type == "cuda" else 1
    return time_ms(graphed(fn, dev, repeat=n), dev, iters=20) * 1e3 / n


def main(argv=None):
    args = common.parser(__doc__).parse_args(argv)
    dev, rec = common.start("groupnorm", args)
    if dev.type != "cuda" and not args.smoke:
        raise SystemExit("bench/groupnorm.py times CUDA kernels: run it on a GPU (or --smoke: a CPU smoke test)")
    for B, C, H in [(1, 64, 8)] if args.smoke else SHAPES:
        w, b = (torch.randn(C, device=dev) * 0.1 + 1).half(), (torch.randn(C, device=dev) * 0.1).half()
        x = (torch.randn(B, C, H, H, device=dev) * 2 + 0.5).half().to(memory_format=torch.channels_last)
        xn = x.contiguous()
        ref = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)
        impls = dict(pytorch_nchw=lambda: F.group_norm(xn, 32, w, b, 1e-5),
                     pytorch_cl=lambda: F.group_norm(x, 32, w, b, 1e-5).contiguous(memory_format=torch.channels_last),
                     minisd=lambda: group_norm_nhwc(x, 32, w, b, 1e-5), two_stage=lambda: two_stage(x, 32, w, b, 1e-5),
                     var_mean=lambda: var_mean(x, 32, w, b, 1e-5), bn_per_sample=lambda: bn_per_sample(x, 32, w, b, 1e-5))
        if dev.type != "cuda":
            del impls["bn_per_sample"]  # torch.batch_norm_stats is CUDA's
        row = dict(shape=f"{B}x{C}x{H}x{H}")
        with torch.no_grad():
            for name, fn in impls.items():
                row[name + "_err"] = float(f"{((fn().float() - ref).norm() / ref.norm()).item():.2g}")
                row[name] = round(per_call_us(fn, dev), 1)
            row["silu"] = round(per_call_us(lambda: F.silu(x), dev), 1)
        rec.add(**row)
    log(table(rec.rows, ["shape", "pytorch_nchw", "pytorch_cl", "minisd", "two_stage", "var_mean", "bn_per_sample", "silu",
                          "minisd_err", "bn_per_sample_err"]))


if __name__ == "__main__":
    main()
