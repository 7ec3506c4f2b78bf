"""LoRA training speed: minisd + lora (fused, plain, CUDA-graph step) against diffusers + peft, same weights.

    python bench/training.py --out out/bench/training.json
    python bench/training.py --tiny --batches 1,2 --out /tmp/t.json          # small config, a CPU smoke test
    python bench/training.py --smoke --out /tmp/t.json                       # the test suite's: minisd-eager, batch 1

The setting of train.py with cached latents and text embeddings: frozen bf16 base, rank-16 adapters (float32
masters) on to_q/k/v/out.0 + ff.net.0.proj/ff.net.2 (minisd: lora.inject targets attn + ff; diffusers: peft
LoraConfig(r=16, target_modules=[...]), the same 160 layers), bf16 autocast, MSE on eps at random timesteps,
clip_grad_norm_(1.0), AdamW. One step = draw t and noise, forward, backward, clip, AdamW step.
--algos locon: also every ResBlock and sampler conv (3x3 convs at --conv-rank 8, k x k down / 1x1 up; the 1x1
shortcuts and time-embedding projections at rank 16); peft: the same modules, rank_pattern for the 3x3 convs.
  minisd-eager        lora's fused autograd functions (the default)
  minisd-eager-plain  lora.network.use_fused(unet, False): the plain composition
  minisd-graph        minisd.fast.TrainStepGraph: forward + backward + clip + AdamW(capturable) in one CUDA graph
  diffusers-eager     diffusers UNet2DConditionModel + peft
  ...-cl              minisd's U-Net channels_last
  ...-bf16            no autocast: the bf16 base as it is (autocast runs the norms in float32, casting around them)
  ...-ckpt            activation checkpointing (each U-Net block recomputed in the backward; inside the graph)
Peak memory is each stack's own: the other U-Net waits on the CPU while one is measured.
Also: the graph step's gradients against the eager step's on the same inputs, and TFLOP/s (FlopCounterMode count
of one step) against a measured bf16 matmul peak.
"""
import dataclasses
import time

import torch

import common
from common import (PEFT_TARGETS, build_unets, count_flops, free, log, matmul_peak_tflops, peak_gb,
                    reset_peak, table, time_ms)

import lora
from minisd.ddim import Schedule
from minisd.fast import TrainStepGraph

# LoCon: also every ResBlock (3x3 convs at the conv rank, the 1x1 shortcut and the time-embedding projection at the
# linear rank) and the down/upsampler convs = lora.inject(targets=("attn", "ff", "resnet", "sampler"))
LOCON_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
CONV3x3 = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]


@dataclasses.dataclass
class Bench:
    """Both U-Nets (same bf16 weights), the "cached" latents and text embeddings, and where rows go."""
    args: object
    rec: object
    dev: torch.device
    ref: object  # diffusers' UNet2DConditionModel (+ peft)
    ours: object  # minisd's UNet (+ lora)
    N: int  # the largest batch

    def __post_init__(self):
        self.h, self.D = self.ref.config.sample_size, self.ref.config.cross_attention_dim
        self.gen = torch.Generator(self.dev).manual_seed(0)
        self.lat = torch.randn(self.N, 4, self.h, self.h, device=self.dev, generator=self.gen)  # scaled latents
        self.txt = torch.randn(self.N, 77, self.D, device=self.dev, generator=self.gen).to(torch.bfloat16)
        self.ac = Schedule().alphas_cumprod.float().to(self.dev)
        self.loss_ours = self.make_loss(lambda x, t, c: self.ours(x, t, c))
        self.loss_ref = self.make_loss(lambda x, t, c: self.ref(x, t, encoder_hidden_states=c).sample)
        self.loss_ours_bf16 = self.make_loss(lambda x, t, c: self.ours(x, t, c), amp=False)

    def make_loss(self, call, amp=True):
        def loss_fn(z0, ctx, t, noise):
            a = self.ac[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=amp, cache_enabled=False):
                eps = call(zt.to(ctx.dtype), t, ctx)
            return ((eps.float() - noise) ** 2).mean()
        return loss_fn

    def draw(self, B):
        return (self.lat[:B], self.txt[:B], torch.randint(0, 1000, (B,), device=self.dev, generator=self.gen),
                torch.randn(B, 4, self.h, self.h, device=self.dev, generator=self.gen))

    def resident(self, on_gpu, on_cpu):
        """One U-Net on the GPU, the other on the CPU: the peak memory is then the first stack's alone."""
        on_cpu.to("cpu")
        on_gpu.to(self.dev)
        free(self.dev)

    def fresh_adapters(self, algo):
        """New adapters "trained" on both U-Nets (the previous algo's removed): (ours_params, ref_params)."""
        from peft import LoraConfig
        args, ours, ref = self.args, self.ours, self.ref
        if "trained" in lora.adapter_names(ours):
            lora.remove(ours, "trained")
            ref.delete_adapters("trained")
        locon = algo == "locon"
        paths = lora.inject(ours, "trained", lora.rank_table(args.rank, conv_dims=args.conv_rank),
                            targets=("attn", "ff") + (("resnet", "sampler") if locon else ()),
                            generator=torch.Generator(self.dev).manual_seed(1))
        ours_params = lora.trainable_parameters(ours, "trained")
        conv = {f"{n}$": args.conv_rank for n in CONV3x3} if locon else {}
        ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                   target_modules=PEFT_TARGETS + (LOCON_TARGETS if locon else []),
                                   rank_pattern=conv, alpha_pattern=conv), adapter_name="trained")
        ref_params = [q for q in ref.parameters() if q.requires_grad]
        for q in ref_params:
            q.data = q.data.float()  # float32 masters, as minisd's (diffusers' scripts: cast_training_params)
        n_peft = sum(1 for n, _ in ref.named_modules() if n.endswith("lora_A.trained"))
        counts = dict(adapted_layers_minisd=len(paths), adapted_layers_peft=n_peft,
                      trainable_minisd=sum(q.numel() for q in ours_params),
                      trainable_peft=sum(q.numel() for q in ref_params))
        self.rec.meta.setdefault("adapters", {})[algo] = counts
        log(f"{algo}: {counts}")
        return ours_params, ref_params


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--conv-rank", type=int, default=8, help="LoCon's 3x3 convs")
    p.add_argument("--algos", default="lora,locon")
    p.add_argument("--variants", default="diffusers-eager,minisd-eager,minisd-eager-plain,minisd-graph-cl,"
                                         "minisd-graph-cl-bf16,minisd-graph-plain-cl-bf16")
    args = p.parse_args(argv)
    dev, rec = common.start("training", args)
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
    variants = ["minisd-eager"] if args.smoke else args.variants.split(",")
    rec.meta["bf16_matmul_peak_tflops"] = peak = matmul_peak_tflops(dev)
    log(f"env {rec.meta['env']}; bf16 matmul peak {peak} TFLOP/s")
    b = Bench(args, rec, dev, *build_unets(dev, torch.bfloat16, args.tiny), N=max(batches))
    b.ours.train()
    b.ref.train()
    for algo in ["lora"] if args.smoke else args.algos.split(","):
        b.resident(b.ours, b.ref)
        params = b.fresh_adapters(algo)
        if dev.type == "cuda" and any(v.startswith("minisd-graph") for v in variants):
            graph_gradient_check(b, algo, params[0], batches[0])
        for B in batches:
            b.resident(b.ours, b.ref)
            flops = flop_count(b, algo, params[0], B)
            for v in variants:
                if v.startswith("minisd-graph") and dev.type != "cuda":
                    continue
                variant_row(b, algo, v, B, params, flops, peak)
            lora.network.use_fused(b.ours, True)
            free(dev)
    report(rec)


def graph_gradient_check(b, algo, ours_params, B):
    """The graph step's gradients against the eager step's, same inputs (lr 0, no clipping: p.grad is the raw
    gradient)."""
    try:
        inputs = b.draw(B)
        opt = torch.optim.AdamW(ours_params, lr=0.0, capturable=True)
        graph = TrainStepGraph(b.loss_ours, opt, inputs, clip_norm=None)
        loss_g = graph(*inputs).item()
        grads_g = torch.cat([q.grad.flatten().float() for q in ours_params])
        opt.zero_grad(set_to_none=True)
        loss_e = b.loss_ours(*inputs)
        loss_e.backward()
        grads_e = torch.cat([q.grad.flatten().float() for q in ours_params])
        err = ((grads_g - grads_e).norm() / grads_e.norm()).item()
        b.rec.add(section="check", algo=algo, batch=B, loss_graph=loss_g, loss_eager=loss_e.item(),
                  grad_rel_err=float(f"{err:.3g}"), grad_norm=grads_e.norm().item())
        del graph, opt, loss_e  # a live autograd graph would bind the next capture to this one's streams
        for q in ours_params:
            q.grad = None
    except Exception as e:
        b.rec.error(f"graph gradient check {algo}", e)
    free(b.dev)


def flop_count(b, algo, ours_params, B):
    """FlopCounterMode's count of one forward and backward of minisd's step at batch B, or None."""
    try:
        flops = count_flops(lambda: b.loss_ours(*b.draw(B)).backward())
        for q in ours_params:
            q.grad = None
        return flops
    except Exception as e:
        b.rec.error(f"flop count {algo} b{B}", e)


def eager_step(loss_fn, opt, params, draw):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(*draw())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    return loss


def variant_row(b, algo, v, B, params, flops, peak):
    """One variant's training step at batch B: ms, samples/s, TFLOP/s, peak memory, capture time, the loss."""
    ours, is_graph = b.ours, v.startswith("minisd-graph")
    try:
        b.resident(*((b.ref, ours) if v.startswith("diffusers") else (ours, b.ref)))
        lora.network.use_fused(ours, "plain" not in v)
        ours.gradient_checkpointing = "-ckpt" in v
        if "-cl" in v:
            ours.to(memory_format=torch.channels_last)
        model_params, loss_fn = (params[1], b.loss_ref) if v.startswith("diffusers") else (params[0], b.loss_ours)
        if "-bf16" in v:
            loss_fn = b.loss_ours_bf16
        capture_s = None
        reset_peak(b.dev)  # the graph rows' peak includes the warm-up and the capture (the graph's own pool)
        opt = torch.optim.AdamW(model_params, lr=1e-4, weight_decay=0.01, capturable=is_graph)
        if is_graph:
            t1 = time.time()
            graph = TrainStepGraph(loss_fn, opt, b.draw(B), clip_norm=1.0)
            capture_s = round(time.time() - t1, 2)
            step = lambda: graph(*b.draw(B))
        else:
            step = lambda: eager_step(loss_fn, opt, model_params, lambda: b.draw(B))
        ms = time_ms(step, b.dev, iters=max(2, 16 // B), reps=3, warmup=2)
        loss = step().item()
        tf = flops / ms / 1e9 if flops else None
        b.rec.add(section="train", algo=algo, impl=v, batch=B, ms=round(ms, 2), samples_per_s=round(B * 1e3 / ms, 2),
                  tflops=round(tf, 1) if tf else None, pct_of_peak=round(100 * tf / peak, 1) if tf and peak else None,
                  peak_gb=peak_gb(b.dev), capture_s=capture_s, loss=round(loss, 4))
        opt = step = graph = None  # freed before the next variant
        for q in model_params:
            q.grad = None
    except Exception as e:
        b.rec.error(f"train {algo} {v} b{B}", e)
    ours.to(memory_format=torch.contiguous_format)
    ours.gradient_checkpointing = False


def report(rec):
    rows = [r for r in rec.rows if r["section"] == "train"]
    log(table(rows, ["algo", "impl", "batch", "ms", "samples_per_s", "tflops", "pct_of_peak", "peak_gb", "capture_s",
                     "loss"]))
    ratios = []
    for r in rows:
        peer = next((q for q in rows if q["impl"] == "diffusers-eager"
                     and (q["algo"], q["batch"]) == (r["algo"], r["batch"])), None)
        if peer and r["impl"] != "diffusers-eager":
            ratios.append(dict(algo=r["algo"], impl=r["impl"], batch=r["batch"],
                               speedup_vs_diffusers=round(r["samples_per_s"] / peer["samples_per_s"], 2),
                               memory_vs_diffusers=round(r["peak_gb"] / peer["peak_gb"], 2)
                               if r["peak_gb"] and peer["peak_gb"] else None))
    rec.meta["ratios"] = ratios
    rec.save()
    log(table(ratios, ["algo", "impl", "batch", "speedup_vs_diffusers", "memory_vs_diffusers"]))
    log(table([r for r in rec.rows if r["section"] == "check"],
              ["algo", "batch", "loss_graph", "loss_eager", "grad_rel_err", "grad_norm"]))


if __name__ == "__main__":
    main()
