"""One LoRA Linear layer at SD 1.4 shapes: lora's fused functions vs the plain composition vs peft's LoRA Linear.

    python bench/layers.py --out out/bench/layers.json
    python bench/layers.py --tiny --out /tmp/l.json                 # CPU smoke test (shapes / 16)

train: bf16 autocast, frozen bf16 base, one rank-16 adapter in float32, forward + backward (grads of x and factors).
infer: fp16, no autograd, two rank-16 adapters unmerged; also the merged layer (a plain nn.Linear, the floor) and
       the two packed forms that minisd.graphs captures (pack=weight: a private merged copy; pack=factors: stacked
       downs and scaled ups prepared once, two extra kernels).
Each case is captured in a CUDA graph and its replays are timed (launch gaps mostly gone), median of 3 x 50.
"""
import argparse
import contextlib

import torch
import torch.nn as nn

import common
from common import Recorder, environment, log, table, time_ms

from lora.layers import LoRALinear
from minisd.graphs import _packed_adapters

# (name, tokens, in, out): CFG batch 2 at 64x64 latents (level 0: 4096 tokens per image, level 2: 256)
SHAPES = [("L0 attn1.to_q", 8192, 320, 320), ("L0 ff.net.0.proj", 8192, 320, 2560), ("L0 ff.net.2", 8192, 1280, 320),
          ("L0 attn2.to_k", 154, 768, 320), ("L2 attn1.to_q", 512, 1280, 1280)]


def ours(inf, outf, n, dtype, adapter_dtype, fused, dev, gen):
    layer = LoRALinear(nn.Linear(inf, outf, device=dev, dtype=dtype).requires_grad_(False))
    for name in "ab"[:n]:
        a = layer.add_adapter(name, 16, dtype=adapter_dtype)
        with torch.no_grad():
            a.up.normal_(0, 0.02, generator=gen)
    layer.fused = fused
    return layer


def peft_layer(inf, outf, n, dtype, adapter_dtype, dev, gen):
    from peft import LoraConfig, inject_adapter_in_model
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(inf, outf, device=dev, dtype=dtype).requires_grad_(False))
    for name in "ab"[:n]:
        model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["proj"]), model, adapter_name=name)
    model.proj.set_adapter(list("ab"[:n]))
    for pname, q in model.named_parameters():
        if "lora_" in pname:
            q.data = q.data.to(adapter_dtype)
            if "lora_B" in pname:
                with torch.no_grad():
                    q.normal_(0, 0.02, generator=gen)
    return model


def graphed(fn, dev):
    """A callable replaying fn from a CUDA graph (eager on the CPU)."""
    if dev.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    common.QUICK = args.tiny
    rec = Recorder(args.out, {"bench": "layers", "args": vars(args), "env": environment(dev)})
    gen = torch.Generator(dev).manual_seed(0)
    for shape, N, inf, outf in SHAPES:
        N = max(8, N // 16) if args.tiny else N
        # train: fwd + bwd, one adapter
        x = torch.randn(N, inf, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        gy = torch.randn(N, outf, device=dev, dtype=torch.bfloat16, generator=gen)
        cases = {"fused": ours(inf, outf, 1, torch.bfloat16, torch.float32, True, dev, gen),
                 "plain": ours(inf, outf, 1, torch.bfloat16, torch.float32, False, dev, gen),
                 "peft": peft_layer(inf, outf, 1, torch.bfloat16, torch.float32, dev, gen)}
        for impl, layer in cases.items():
            try:
                params = [q for q in layer.parameters() if q.requires_grad]

                def fwd_bwd():
                    with torch.autocast(dev.type, torch.bfloat16, cache_enabled=False):
                        y = layer(x)
                    return torch.autograd.grad(y, [x, *params], gy)
                ms = time_ms(graphed(fwd_bwd, dev), dev, iters=50)
                rec.add(mode="train", shape=shape, tokens=N, impl=impl, us=round(ms * 1e3, 1))
            except Exception as e:
                rec.error(f"train {impl} {shape}", e)
        # infer: two adapters, fp16, no autograd
        x = torch.randn(N, inf, device=dev, dtype=torch.float16, generator=gen)
        dt = torch.float16
        cases = {"merged": nn.Linear(inf, outf, device=dev, dtype=dt),
                 "fused": ours(inf, outf, 2, dt, dt, True, dev, gen), "plain": ours(inf, outf, 2, dt, dt, False, dev, gen),
                 "pack=weight": ours(inf, outf, 2, dt, dt, True, dev, gen),
                 "pack=factors": ours(inf, outf, 2, dt, dt, True, dev, gen), "peft": peft_layer(inf, outf, 2, dt, dt, dev, gen)}
        for impl, layer in cases.items():
            try:
                packing = _packed_adapters(layer, {}, impl[5:]) if impl.startswith("pack=") else contextlib.nullcontext()
                with torch.no_grad(), packing:
                    fn = graphed(lambda: layer(x), dev)
                with torch.no_grad():
                    ms = time_ms(fn, dev, iters=50)
                rec.add(mode="infer", shape=shape, tokens=N, impl=impl, us=round(ms * 1e3, 1))
            except Exception as e:
                rec.error(f"infer {impl} {shape}", e)
    log(table(rec.rows, ["mode", "shape", "tokens", "impl", "us"]))


if __name__ == "__main__":
    main()
