"""What rank-16 adapters add to the whole U-Net: forward + backward of the frozen SD 1.4 U-Net, with and without.

    python bench/overhead.py --out out/bench/overhead.json
    python bench/overhead.py --tiny --batches 1 --out /tmp/o.json        # small config, a CPU smoke test
    python bench/overhead.py --smoke --out /tmp/o.json                   # the test suite's: minisd only, batch 1

The model work of one LoRA training step (train.py's setting without the optimizer): bf16 base, bf16 autocast,
random latents, timesteps and text embeddings, loss = mean((eps - noise)^2). With adapters the backward runs to
their factors (float32 masters, rank 16 on to_q/k/v/out.0 + ff.net.0.proj/ff.net.2: the same 160 layers in both
stacks); without, it runs to the latents, so both rows make the same backward pass through the frozen network.
  minisd            minisd.UNet, adapters disabled
  minisd+fused      lora's fused autograd functions (the default)
  minisd+plain      lora.network.use_fused(unet, False): the plain composition
  diffusers         UNet2DConditionModel
  diffusers+peft    with peft's LoraConfig(r=16) on the same layers
  .../bf16          the same without autocast: the bf16 base runs as it is (autocast would run every GroupNorm and
                    LayerNorm in float32, with a cast on each side)
Each is timed eager and replayed from a CUDA graph (`graph` rows: launch latency removed, so the GPU cost shows);
overhead = time / the same stack's time without adapters - 1. minisd runs channels_last (as its graph paths do).
"""
import time

import torch

import common
from common import PEFT_TARGETS, build_unets, free, graphed, log, peak_gb, reset_peak, table, time_ms

import lora


class Stacks:
    """Both U-Nets in bf16 with rank-`rank` adapters on the same layers (peft's only with the peer), non-zero ups
    and float32 masters on both sides."""

    def __init__(self, args, dev):
        self.dev = dev
        self.ref, self.ours = build_unets(dev, torch.bfloat16, args.tiny)
        self.ours.to(memory_format=torch.channels_last)
        lora.inject(self.ours, "a", args.rank, targets=("attn", "ff"), generator=torch.Generator(dev).manual_seed(1))
        self.ours_params = lora.trainable_parameters(self.ours, "a")
        if not args.smoke:
            from peft import LoraConfig
            self.ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PEFT_TARGETS),
                                 adapter_name="a")
        self.ref_params = [q for q in self.ref.parameters() if q.requires_grad]
        self.g = torch.Generator(dev).manual_seed(2)
        with torch.no_grad():
            for q in (*self.ours_params, *self.ref_params):
                q.data = q.data.float()
                q.normal_(0, 0.01, generator=self.g)
        self.h, self.D = self.ref.config.sample_size, self.ref.config.cross_attention_dim

    def case(self, variant, B):
        """The model work of one training step of `variant` at batch B."""
        dev, g, h, ours, ref = self.dev, self.g, self.h, self.ours, self.ref
        x = torch.randn(B, 4, h, h, device=dev, generator=g, dtype=torch.bfloat16)
        noise = torch.randn(B, 4, h, h, device=dev, generator=g)
        t = torch.randint(0, 1000, (B,), device=dev, generator=g)
        ctx = torch.randn(B, 77, self.D, device=dev, generator=g, dtype=torch.bfloat16)
        adapters = "+" in variant
        amp = not variant.endswith("/bf16")  # /bf16: the bf16 base run as it is, no autocast (norms in bf16)
        if variant.startswith("minisd"):
            lora.enable(ours, "a", adapters)
            lora.network.use_fused(ours, "plain" not in variant)
            model, params = (lambda z: ours(z, t, ctx)), self.ours_params
            x = x.to(memory_format=torch.channels_last)
        else:
            (ref.enable_adapters if adapters else ref.disable_adapters)()
            model, params = (lambda z: ref(z, t, encoder_hidden_states=ctx).sample), self.ref_params
        wrt = params if adapters else [x.requires_grad_(True)]

        def fwd_bwd():
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp, cache_enabled=False):
                eps = model(x)
            loss = ((eps.float() - noise) ** 2).mean()
            return torch.autograd.grad(loss, wrt)
        return fwd_bwd


def add_overheads(rows):
    """overhead_pct: each row's time over the same stack's without adapters (same batch, mode and autocast)."""
    for r in rows:
        base = next((q for q in rows if q["batch"] == r["batch"] and q["mode"] == r["mode"]
                     and q["impl"] == r["impl"].split("+")[0] + ("/bf16" if r["impl"].endswith("/bf16") else "")), None)
        r["overhead_pct"] = round(100 * (r["ms"] / base["ms"] - 1), 1) if base and base is not r else None


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    dev, rec = common.start("overhead", args)
    t0 = time.time()
    stacks = Stacks(args, dev)
    log(f"built in {time.time() - t0:.1f}s; trainable {sum(q.numel() for q in stacks.ours_params)} / "
        f"{sum(q.numel() for q in stacks.ref_params)}")
    variants = ["minisd", "minisd+fused", "minisd+plain", "diffusers", "diffusers+peft", "minisd/bf16",
                "minisd+fused/bf16", "minisd+plain/bf16", "diffusers/bf16", "diffusers+peft/bf16"]
    for B in [1] if args.smoke else [int(b) for b in args.batches.split(",")]:
        for variant in ["minisd", "minisd+fused"] if args.smoke else variants:
            for mode in ["eager", "graph"] if dev.type == "cuda" else ["eager"]:
                try:
                    free(dev)
                    fn = stacks.case(variant, B)
                    reset_peak(dev)
                    fn = graphed(fn, dev) if mode == "graph" else fn
                    ms = time_ms(fn, dev, iters=max(2, 16 // B), reps=3, warmup=2)
                    rec.add(batch=B, impl=variant, mode=mode, ms=round(ms, 2), peak_gb=peak_gb(dev))
                    del fn
                except Exception as e:
                    rec.error(f"{variant} {mode} b{B}", e)
    add_overheads(rec.rows)
    rec.save()
    log(table(rec.rows, ["batch", "mode", "impl", "ms", "overhead_pct", "peak_gb"]))


if __name__ == "__main__":
    main()
