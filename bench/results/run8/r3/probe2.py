"""scratch: GroupNorm's normalising pass and GEGLU variants, alone and in the graph step (not committed)."""
import sys, json, os, contextlib
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import build_unets, time_ms, graphed
from minisd import graphs, forms
import minisd.groupnorm as gnm
from minisd.unet import GEGLU
OUT = os.environ["OUT"]
dev = torch.device("cuda")
res = {}

def stats(x, G, w, b, eps):
    B, C, H, W = x.shape
    x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
    n = H * W * C // G
    s1 = x3.sum(1, dtype=torch.float32).view(B, G, -1).sum(2)
    s2 = torch.linalg.vector_norm(x3, dim=1, dtype=torch.float32).view(B, G, -1).square().sum(2)
    mean = s1 / n
    var = torch.addcmul(s2, s1, s1, value=-1 / n).clamp_min_(0) / n
    rstd = (var + eps).rsqrt_()
    a = rstd[:, :, None] * w.view(G, -1)
    bb = torch.addcmul(b.view(G, -1), mean[:, :, None], a, value=-1)
    return x3, a.view(B, 1, C), bb.view(B, 1, C), mean, rstd

def out_cur(x, G, w, b, eps):
    x3, a, bb, *_ = stats(x, G, w, b, eps)
    return torch.addcmul(bb, x3, a, out=torch.empty_like(x3))
def out_half(x, G, w, b, eps):
    x3, a, bb, *_ = stats(x, G, w, b, eps)
    return torch.addcmul(bb.to(x.dtype), x3, a.to(x.dtype))
def out_bn(x, G, w, b, eps):  # per sample: eval batch_norm with the group statistics per channel
    B, C, H, W = x.shape
    x3, a, bb, mean, rstd = stats(x, G, w, b, eps)
    m = mean.repeat_interleave(C // G, 1)
    v = (rstd.square().reciprocal() - eps).repeat_interleave(C // G, 1)
    out = torch.empty_like(x)
    for i in range(B):
        torch.batch_norm(x[i:i + 1], w, b, m[i], v[i], False, 0.0, eps, True)  # returns new
    return out
def out_bn2(x, G, w, b, eps):
    B, C, H, W = x.shape
    x3, a, bb, mean, rstd = stats(x, G, w, b, eps)
    ones, zeros = torch.ones(C, device=x.device), torch.zeros(C, device=x.device)
    a1, b1 = a.view(B, C), bb.view(B, C)
    return [F.batch_norm(x[i:i + 1], -b1[i] / a1[i], a1[i].reciprocal().square(), None, None, False, 0.0, 0.0) for i in range(B)]
VAR = dict(cur=out_cur, half=out_half, bn=out_bn)
rows = []
for B, C, H in [(2, 320, 64), (2, 960, 64), (8, 320, 64), (8, 640, 32), (8, 1280, 16), (8, 1920, 32)]:
    x = torch.randn(B, C, H, H, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, device=dev) * 0.1 + 1).half(); bb = (torch.randn(C, device=dev) * 0.1).half()
    ref = F.group_norm(x.float(), 32, w.float(), bb.float(), 1e-5)
    row = dict(shape=f"{B}x{C}x{H}x{H}")
    for name, f in VAR.items():
        with torch.no_grad():
            try:
                if name != "bn":
                    y = f(x, 32, w, bb, 1e-5).view(B, H, H, C).permute(0, 3, 1, 2)
                    row[name + "_err"] = float(f"{((y.float() - ref).norm() / ref.norm()).item():.2g}")
                def twenty(f=f):
                    for _ in range(20): f(x, 32, w, bb, 1e-5)
                row[name] = round(time_ms(graphed(twenty, dev), dev, iters=10) * 1e3 / 20, 1)
            except Exception as e:
                row[name] = str(e)[:80]
    def only_stats():
        for _ in range(20): stats(x, 32, w, bb, 1e-5)
    row["stats_only"] = round(time_ms(graphed(only_stats, dev), dev, iters=10) * 1e3 / 20, 1)
    rows.append(row); print(row, flush=True)
res["gn_out"] = rows

def geglu_two(x, m):
    n = m.proj.out_features // 2
    a = F.linear(x, m.proj.weight[:n], m.proj.bias[:n])
    g = F.linear(x, m.proj.weight[n:], m.proj.bias[n:])
    return a.mul_(F.gelu(g))
rows = []
for B, N, C in [(2, 4096, 320), (8, 4096, 320), (2, 1024, 640), (8, 256, 1280)]:
    m = GEGLU(C, 4 * C).to(dev).half()
    x = torch.randn(B, N, C, device=dev, dtype=torch.float16)
    row = dict(shape=f"{B}x{N}x{C}")
    with torch.no_grad():
        ref = m(x)
        row["two_err"] = float(f"{((geglu_two(x, m).float() - ref.float()).norm() / ref.float().norm()).item():.2g}")
        for name, f in (("cur", lambda: m(x)), ("two", lambda: geglu_two(x, m))):
            def twenty(f=f):
                for _ in range(20): f()
            row[name] = round(time_ms(graphed(twenty, dev), dev, iters=10) * 1e3 / 20, 1)
    rows.append(row); print(row, flush=True)
res["geglu"] = rows

_, unet = build_unets(dev, torch.float16, False)
graphs.to_channels_last(unet)
own_gn = gnm.GroupNormNHWC.forward
def half_forward(ctx, x, groups, weight, bias, eps):
    B, C, H, W = x.shape
    x3, a, bb, mean, rstd = stats(x, groups, weight, bias, eps)
    ctx.save_for_backward(x, weight, mean, rstd, a)
    y = torch.addcmul(bb.to(x.dtype), x3, a.to(x.dtype))
    return y.view(B, H, W, C).permute(0, 3, 1, 2)
for B in (1, 4):
    g = torch.Generator(dev).manual_seed(B)
    x = torch.randn(B, 4, 64, 64, generator=g, device=dev).half()
    ctx = torch.randn(2 * B, 77, 768, generator=g, device=dev).half()
    geglus = [m for m in unet.modules() if isinstance(m, GEGLU)]
    for name in ("base", "gn_half", "geglu_two", "both"):
        gnm.GroupNormNHWC.forward = staticmethod(half_forward) if name in ("gn_half", "both") else own_gn
        extra = {m: (lambda x, m=m: geglu_two(x, m)) for m in geglus} if name in ("geglu_two", "both") else {}
        with forms.applied(extra):
            gs = graphs.GuidedUNetGraph(unet, x, ctx, 7.5)
        ms = time_ms(lambda: gs(x, 501, ctx), dev, iters=20, reps=5)
        eps = gs(x, 501, ctx).float().clone()
        if name == "base":
            base = eps
        res[f"step_b{B}_{name}"] = [ms, ((eps - base).norm() / base.norm()).item()]
        print(B, name, res[f"step_b{B}_{name}"], flush=True)
        del gs
    gnm.GroupNormNHWC.forward = own_gn
json.dump(res, open(f"{OUT}/probe2.json", "w"), indent=1)
