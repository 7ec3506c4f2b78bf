"""One adapted layer at SD 1.4 shapes: lora's fused functions vs the plain composition vs peft's LoRA layer.

    python bench/layers.py --out out/bench/layers.json
    python bench/layers.py --tiny --ranks 4 --out /tmp/l.json        # CPU smoke test (shapes / 16)
    python bench/layers.py --smoke --out /tmp/l.json                  # the test suite's: one Linear, one conv, no peft

train: bf16 autocast, frozen bf16 base, one adapter in float32 (ranks 4, 16, 64), forward + backward (grads of x
       and of the factors). Linear layers of attention and feed-forward, and the 3x3 convs of each level (LoCon;
       peft's Conv2d LoRA is the same k x k down / 1x1 up pair). `none` is the frozen layer alone (grad of x only).
infer: fp16, no autograd, two rank-16 adapters unmerged; also the merged layer (the floor) and the two packed
       forms that minisd.fast.graphs captures (pack=weight: a private merged copy; pack=factors: stacked downs and
       scaled ups prepared once, two extra kernels). Linear layers only.
Each case is captured in a CUDA graph and its replays are timed (launch gaps mostly gone), median of 3 x 50.
"""

import torch
import torch.nn as nn

import common
from common import graphed, log, table, time_ms

from lora.layers import wrap
from minisd.fast.forms import applied, packed_adapters

# (name, input shape, layer): CFG batch 2 at 64x64 latents (level 0: 4096 tokens per image, level 2: 256)
SHAPES = [("L0 attn1.to_q", (8192, 320), lambda: nn.Linear(320, 320)),
          ("L0 ff.net.0.proj", (8192, 320), lambda: nn.Linear(320, 2560)),
          ("L0 ff.net.2", (8192, 1280), lambda: nn.Linear(1280, 320)),
          ("L0 attn2.to_k", (154, 768), lambda: nn.Linear(768, 320)),
          ("L1 ff.net.0.proj", (2048, 640), lambda: nn.Linear(640, 5120)),
          ("L2 attn1.to_q", (512, 1280), lambda: nn.Linear(1280, 1280)),
          ("L2 ff.net.2", (512, 5120), lambda: nn.Linear(5120, 1280)),
          ("L0 conv 3x3", (2, 320, 64, 64), lambda: nn.Conv2d(320, 320, 3, padding=1)),
          ("L1 conv 3x3", (2, 640, 32, 32), lambda: nn.Conv2d(640, 640, 3, padding=1)),
          ("L2 conv 3x3", (2, 1280, 16, 16), lambda: nn.Conv2d(1280, 1280, 3, padding=1)),
          ("L3 conv 3x3", (2, 1280, 8, 8), lambda: nn.Conv2d(1280, 1280, 3, padding=1)),
          ("L0 downsample", (2, 320, 64, 64), lambda: nn.Conv2d(320, 320, 3, stride=2, padding=1))]


def ours(make, n, rank, dtype, adapter_dtype, fused, dev, gen):
    layer = wrap(make().to(dev, dtype).requires_grad_(False))
    if layer.weight.dim() == 4:
        layer.to(memory_format=torch.channels_last)
    for name in "ab"[:n]:
        a = layer.add_adapter(name, rank, dtype=adapter_dtype)
        with torch.no_grad():
            a.up.normal_(0, 0.02, generator=gen)
    layer.fused = fused
    return layer


def peft_layer(make, n, rank, dtype, adapter_dtype, dev, gen):
    from peft import LoraConfig, inject_adapter_in_model
    model = nn.Sequential()
    model.add_module("proj", make().to(dev, dtype).requires_grad_(False))
    if model.proj.weight.dim() == 4:
        model.to(memory_format=torch.channels_last)
    for name in "ab"[:n]:
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]), model, adapter_name=name)
    model.proj.set_adapter(list("ab"[:n]))
    for pname, q in model.named_parameters():
        if "lora_" in pname:
            q.data = q.data.to(adapter_dtype)
            if "lora_B" in pname:
                with torch.no_grad():
                    q.normal_(0, 0.02, generator=gen)
    return model


def train_rows(rec, args, dev, gen, shape, in_shape, out_shape, make):
    """forward + backward of one adapter (bf16 autocast, fp32 factors), replayed from a graph, per rank."""
    fmt = torch.channels_last if len(in_shape) == 4 else torch.contiguous_format
    x = torch.randn(in_shape, device=dev, dtype=torch.bfloat16, generator=gen).to(memory_format=fmt).requires_grad_(True)
    gy = torch.randn(out_shape, device=dev, dtype=torch.bfloat16, generator=gen).to(memory_format=fmt)
    for rank in [4] if args.smoke else map(int, args.ranks.split(",")):
        cases = {"none": ours(make, 0, rank, torch.bfloat16, torch.float32, True, dev, gen),
                 "fused": ours(make, 1, rank, torch.bfloat16, torch.float32, True, dev, gen),
                 "plain": ours(make, 1, rank, torch.bfloat16, torch.float32, False, dev, gen),
                 "peft": None if args.smoke else peft_layer(make, 1, rank, torch.bfloat16, torch.float32, dev, gen)}
        for impl, layer in cases.items():
            if layer is None:
                continue
            try:
                params = [q for q in layer.parameters() if q.requires_grad]

                def fwd_bwd():
                    with torch.autocast(dev.type, torch.bfloat16, cache_enabled=False):
                        y = layer(x)
                    return torch.autograd.grad(y, [x, *params], gy)
                ms = time_ms(graphed(fwd_bwd, dev), dev, iters=50)
                rec.add(mode="train", shape=shape, rank=rank, impl=impl, us=round(ms * 1e3, 1))
            except Exception as e:
                rec.error(f"train {impl} {shape} r{rank}", e)


def infer_rows(rec, args, dev, gen, shape, in_shape, make):
    """Two rank-16 adapters, fp16, no autograd: merged, fused, plain, each packing, peft."""
    x = torch.randn(in_shape, device=dev, dtype=torch.float16, generator=gen)
    dt = torch.float16
    cases = {"merged": make().to(dev, dt), "fused": ours(make, 2, 16, dt, dt, True, dev, gen),
             "plain": ours(make, 2, 16, dt, dt, False, dev, gen), "pack=weight": ours(make, 2, 16, dt, dt, True, dev, gen),
             "pack=factors": ours(make, 2, 16, dt, dt, True, dev, gen),
             "peft": None if args.smoke else peft_layer(make, 2, 16, dt, dt, dev, gen)}
    for impl, layer in cases.items():
        if layer is None:
            continue
        try:
            packing = applied(packed_adapters(layer, {}, impl[5:]) if impl.startswith("pack=") else {})
            with torch.no_grad(), packing:
                fn = graphed(lambda: layer(x), dev)
            with torch.no_grad():
                ms = time_ms(fn, dev, iters=50)
            rec.add(mode="infer", shape=shape, rank=16, impl=impl, us=round(ms * 1e3, 1))
        except Exception as e:
            rec.error(f"infer {impl} {shape}", e)


def wide_rows(rows):
    """One row per (mode, shape, rank): the implementations side by side."""
    wide = {}
    for r in rows:
        key = {k: r[k] for k in ("mode", "shape", "rank")}
        wide.setdefault(tuple(key.values()), key)[r["impl"]] = r["us"]
    for w in wide.values():
        if w["mode"] == "train" and all(k in w for k in ("fused", "plain", "peft")):
            w["fused_fastest"] = w["fused"] <= min(w["plain"], w["peft"])
    return list(wide.values())


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--ranks", default="4,16,64")
    args = p.parse_args(argv)
    dev, rec = common.start("layers", args)
    gen = torch.Generator(dev).manual_seed(0)
    for shape, in_shape, make in [SHAPES[0], SHAPES[7]] if args.smoke else SHAPES:
        if args.tiny:
            in_shape = (max(8, in_shape[0] // 16), *in_shape[1:]) if len(in_shape) == 2 else (1, *in_shape[1:3], 8)
        out_shape = make().to("meta")(torch.empty(in_shape, device="meta")).shape
        train_rows(rec, args, dev, gen, shape, in_shape, out_shape, make)
        if len(in_shape) != 4:  # convolutions: training only
            infer_rows(rec, args, dev, gen, shape, in_shape, make)
    rec.meta["wide"] = wide_rows(rec.rows)
    rec.save()
    log(table(rec.meta["wide"], ["mode", "shape", "rank", "none", "merged", "fused", "plain", "peft", "pack=weight",
                                 "pack=factors", "fused_fastest"]))


if __name__ == "__main__":
    main()
