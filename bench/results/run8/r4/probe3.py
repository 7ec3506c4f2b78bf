"""scratch: the step with the new forms; where VAE decode's time goes (not committed)."""
import sys, json, os
from collections import defaultdict
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import build_pipelines, time_ms, graphed
from minisd import graphs, forms
from minisd.vae import Upsample as VAEUpsample
OUT = os.environ["OUT"]
dev = torch.device("cuda")
res = {}
pipe, sd = build_pipelines(dev, torch.float16, False)
del pipe
unet = sd.unet
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
for B in (1, 4):
    g = torch.Generator(dev).manual_seed(B)
    x = torch.randn(B, 4, 64, 64, generator=g, device=dev).half()
    ctx = torch.randn(2 * B, 77, 768, generator=g, device=dev).half()
    with torch.no_grad():
        e_u, e_c = unet(torch.cat([x, x]), torch.tensor(501, device=dev), ctx).chunk(2)
        ref = e_u + 7.5 * (e_c - e_u)
    graphs.to_channels_last(unet)
    for name, fs in (("all", graphs.FORMS), ("no_geglu", tuple(f for f in graphs.FORMS if f != "geglu")), ("none", ())):
        gs = graphs.GuidedUNetGraph(unet, x, ctx, 7.5, forms=fs)
        ms = time_ms(lambda: gs(x, 501, ctx), dev, iters=20, reps=5)
        res[f"step_b{B}_{name}"] = [round(ms, 3), rel(gs(x, 501, ctx), ref)]
        print(B, name, res[f"step_b{B}_{name}"], flush=True)
        del gs
    unet.to(memory_format=torch.contiguous_format)

def profile(fn, n=3):
    from torch.profiler import ProfilerActivity, profile as prof
    fn(); torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time / 1e3 / n; per[e.name][1] += 1 / n
    tot = sum(v[0] for v in per.values())
    return [f"total {tot:.3f} ms"] + [f"{ms:.3f} {c:.0f} {k[:140]}" for k, (ms, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:40]]

vae = sd.vae
graphs.to_channels_last(vae)
ups = [m for m in vae.modules() if isinstance(m, VAEUpsample)]
wb = {m: forms._phase_weights(m.conv) for m in ups}
for n in (1, 2):
    z = torch.randn(n, 4, 64, 64, device=dev).half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = vae.decode(z)
        res[f"vae_{n}"] = time_ms(lambda: vae.decode(z), dev, iters=5)
        res[f"vae_{n}_graph"] = time_ms(graphed(lambda: vae.decode(z), dev), dev, iters=5)
        sub = {m: (lambda x, m=m: forms._upsample_conv(x, *wb[m])) for m in ups}
        with forms.applied(sub):
            res[f"vae_{n}_subpixel_err"] = rel(vae.decode(z), ref)
            res[f"vae_{n}_subpixel"] = time_ms(lambda: vae.decode(z), dev, iters=5)
        print(n, {k: v for k, v in res.items() if k.startswith(f"vae_{n}")}, flush=True)
        lines = profile(lambda: vae.decode(z))
        open(f"{OUT}/vae_profile_{n}.txt", "w").write("\n".join(lines)); print("\n".join(lines[:25]))
json.dump(res, open(f"{OUT}/probe3.json", "w"), indent=1)
