"""scratch: where the graph step's time goes; GroupNorm variants; SDPA backends (not committed)."""
import sys, time, json, os
from collections import defaultdict
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import build_unets, time_ms, graphed, matmul_peak_tflops
from minisd import graphs
from minisd.groupnorm import group_norm_nhwc
OUT = os.environ["OUT"]
dev = torch.device("cuda")
res = {}

def gn_cur(x, G, w, b, eps): return group_norm_nhwc(x, G, w, b, eps)
def gn_pt(x, G, w, b, eps): return F.group_norm(x, G, w, b, eps).contiguous(memory_format=torch.channels_last)
def gn_pt_nchw(x, G, w, b, eps): return F.group_norm(x, G, w, b, eps)
def gn_vm_c(x, G, w, b, eps):
    B, C, H, W = x.shape
    x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
    v, m = torch.var_mean(x3, dim=1, correction=0)
    m = m.float().view(B, G, -1)
    e2 = torch.addcmul(v.float().view(B, G, -1), m, m)
    mg, e2g = m.mean(2, keepdim=True), e2.mean(2, keepdim=True)
    rstd = torch.addcmul(e2g, mg, mg, value=-1).add_(eps).rsqrt_()
    a = rstd * w.view(G, -1)
    bb = torch.addcmul(b.view(G, -1), mg, a, value=-1)
    y = torch.addcmul(bb.view(B, 1, C), x3, a.view(B, 1, C), out=torch.empty_like(x3))
    return y.view(B, H, W, C).permute(0, 3, 1, 2)
def gn_vm_g(x, G, w, b, eps):
    B, C, H, W = x.shape
    x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
    v, m = torch.var_mean(x3.view(B, H * W, G, -1), dim=(1, 3), correction=0)  # [B, G]
    rstd = (v.float() + eps).rsqrt_()[:, :, None]
    a = rstd * w.view(G, -1)
    bb = torch.addcmul(b.view(G, -1), m.float()[:, :, None], a, value=-1)
    y = torch.addcmul(bb.view(B, 1, C), x3, a.view(B, 1, C), out=torch.empty_like(x3))
    return y.view(B, H, W, C).permute(0, 3, 1, 2)
def gn_mm(x, G, w, b, eps):  # column sums via bmm against a ones row; squares via an elementwise then bmm
    B, C, H, W = x.shape
    x3 = x.permute(0, 2, 3, 1).view(B, H * W, C)
    u = torch.full((B, 1, H * W), 1.0 / (H * W), dtype=x.dtype, device=x.device)
    m = torch.bmm(u, x3).float().view(B, G, -1)
    e2 = torch.bmm(u, x3 * x3).float().view(B, G, -1)
    mg, e2g = m.mean(2, keepdim=True), e2.mean(2, keepdim=True)
    rstd = torch.addcmul(e2g, mg, mg, value=-1).add_(eps).rsqrt_()
    a = rstd * w.view(G, -1)
    bb = torch.addcmul(b.view(G, -1), mg, a, value=-1)
    y = torch.addcmul(bb.view(B, 1, C), x3, a.view(B, 1, C), out=torch.empty_like(x3))
    return y.view(B, H, W, C).permute(0, 3, 1, 2)

VARIANTS = dict(cur=gn_cur, pt_copies=gn_pt, pt_nchw=gn_pt_nchw, vm_c=gn_vm_c, vm_g=gn_vm_g, mm=gn_mm)
rows = []
for B, C, H in [(2, 320, 64), (2, 640, 64), (2, 960, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8), (8, 320, 64), (8, 640, 32), (8, 1280, 16)]:
    x = torch.randn(B, C, H, H, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last) * 2 + 0.5
    w = (torch.randn(C, device=dev) * 0.1 + 1).half(); bb = (torch.randn(C, device=dev) * 0.1).half()
    ref = F.group_norm(x.float(), 32, w.float(), bb.float(), 1e-5)
    row = dict(shape=f"{B}x{C}x{H}x{H}")
    for name, f in VARIANTS.items():
        xin = x.contiguous() if name == "pt_nchw" else x
        with torch.no_grad():
            y = f(xin, 32, w, bb, 1e-5)
            row[name + "_err"] = float(f"{((y.float() - ref).norm() / ref.norm()).item():.2g}")
            def twenty(f=f, xin=xin):
                for _ in range(20): f(xin, 32, w, bb, 1e-5)
            row[name] = round(time_ms(graphed(twenty, dev), dev, iters=10) * 1e3 / 20, 1)
    rows.append(row); print(row, flush=True)
res["groupnorm"] = rows

_, unet = build_unets(dev, torch.float16, False)
graphs.to_channels_last(unet)
peak = matmul_peak_tflops(dev)
res["peak"] = peak
for B in (1, 4):
    g = torch.Generator(dev).manual_seed(B)
    x = torch.randn(B, 4, 64, 64, generator=g, device=dev).half()
    ctx = torch.randn(2 * B, 77, 768, generator=g, device=dev).half()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for be in (None, "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            import contextlib
            with (sdpa_kernel([getattr(SDPBackend, be)]) if be else contextlib.nullcontext()):
                gs = graphs.GuidedUNetGraph(unet, x, ctx, 7.5)
            ms = time_ms(lambda: gs(x, 501, ctx), dev, iters=20)
            res[f"step_b{B}_{be}"] = ms; print(B, be, ms, flush=True)
            del gs
        except Exception as e:
            print("fail", be, e)
    gs = graphs.GuidedUNetGraph(unet, x, ctx, 7.5)
    from torch.profiler import ProfilerActivity, profile
    gs(x, 501, ctx); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            gs(x, 501, ctx)
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time / 1e3 / 5; per[e.name][1] += 1 / 5
    tot = sum(v[0] for v in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][0])
    lines = [f"total {tot:.3f} ms over {sum(v[1] for v in per.values()):.0f} kernels"]
    lines += [f"{ms:.3f} {n:.0f} {k[:150]}" for k, (ms, n) in top[:70]]
    open(f"{OUT}/profile_b{B}.txt", "w").write("\n".join(lines))
    print("\n".join(lines[:30]), flush=True)
    del gs
json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)
