"""Sampling speed: minisd (eager, CUDA graph) against diffusers (eager, optionally torch.compile), same weights.

    python bench/sampling.py --out out/bench/sampling.json              # SD 1.4 architecture, 512x512, 50 DDIM steps
    python bench/sampling.py --tiny --steps 2 --out /tmp/s.json         # small config, a CPU smoke test
    python bench/sampling.py --smoke --out /tmp/s.json                  # the test suite's: minisd only, fp32, b1

Per dtype (fp16, bf16) and batch (1, 4 images, CFG 7.5, so the U-Net sees 2, 8):
  step      one guided U-Net step (U-Net on [x, x] + guidance): ms, steps/s, TFLOP/s; diffusers' also replayed
            from a CUDA graph (the GPU-bound peer); minisd's graph also without channels_last, with PyTorch's
            GroupNorm, without each of minisd.fast.FORMS and without all of them, and (--all-variants) with
            cudnn.benchmark and each SDPA backend (fp16 only)
  pipeline  the whole sampler (text encoder, 50 DDIM steps, VAE decode): s per batch, images/s, peak memory (each
            stack's own: the other one's U-Net and VAE wait on the CPU; the text encoder is shared); the graph
            path's images and latents against the eager path's (rel err)
  compile   with pipeline: also diffusers with torch.compile(unet, mode="reduce-overhead", fullgraph=True) and a
            channels_last U-Net, compile time reported
  adapters  minisd with 1 and 2 unmerged rank-16 LoRA adapters (attn + ff, random non-zero ups) and with both
            merged, eager and graph; diffusers + peft with 2 unmerged adapters, eager
"""
import contextlib
import dataclasses
import time

import torch

import common
from common import (DTYPES, PEFT_TARGETS, build_pipelines, count_flops, free, graphed, log,
                    matmul_peak_tflops, peak_gb, reset_peak, table, time_ms, wall_s)

import lora
from minisd.fast import graphs


def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def settings(unet, benchmark=False, channels_last=False, sdpa=None, pytorch_groupnorm=False):
    """cudnn.benchmark, channels_last weights, an SDPA backend and PyTorch's GroupNorm instead of
    minisd.fast's channels_last path (a comparison row), restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from minisd.fast.groupnorm import ChannelsLastGroupNorm as GroupNorm
    old, own_forward = torch.backends.cudnn.benchmark, GroupNorm.forward
    torch.backends.cudnn.benchmark = benchmark
    if pytorch_groupnorm:
        GroupNorm.forward = torch.nn.GroupNorm.forward
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    try:
        with sdpa_kernel([getattr(SDPBackend, sdpa)]) if sdpa else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cudnn.benchmark = old
        GroupNorm.forward = own_forward
        if channels_last:
            unet.to(memory_format=torch.contiguous_format)


def variant_name(v):
    return "+".join([k if v[k] is True else f"{k}={v[k]}" for k in v if v[k]]) or "default"


@dataclasses.dataclass
class Case:
    """One (dtype, batch) of the benchmark: both pipelines (same weights), a guided step's inputs, where rows go."""
    args: object
    rec: object
    dev: torch.device
    dname: str
    pipe: object  # diffusers' StableDiffusionPipeline
    sd: object  # minisd's StableDiffusion
    B: int
    x: torch.Tensor  # (B, 4, h, h) latents
    ctx: torch.Tensor  # (2B, 77, D): [uncond; cond]
    peak: float | None  # the bf16 matmul peak, TFLOP/s
    t: int = 501
    flops: float = dataclasses.field(init=False)  # of one guided step, counted at construction

    def __post_init__(self):
        self.gs, self.cuda, self.peer = self.args.guidance, self.dev.type == "cuda", not self.args.smoke
        self.dt, self.base = self.x.dtype, dict(dtype=self.dname, batch=self.B)
        with torch.no_grad():
            self.flops = count_flops(lambda: self.sd.unet(torch.cat([self.x, self.x]), self.timestep(), self.ctx))

    def timestep(self):
        return torch.tensor(self.t, device=self.dev)

    def eager_minisd(self):
        e_u, e_c = self.sd.unet(torch.cat([self.x, self.x]), self.timestep(), self.ctx).chunk(2)
        return e_u + self.gs * (e_c - e_u)

    def eager_diffusers(self, t=None):
        t = self.timestep() if t is None else t
        e_u, e_c = self.pipe.unet(torch.cat([self.x, self.x]), t, encoder_hidden_states=self.ctx).sample.chunk(2)
        return e_u + self.gs * (e_c - e_u)

    def step_row(self, impl, ms, **extra):
        tf = self.flops / ms / 1e9
        return self.rec.add(section="step", impl=impl, **self.base, ms=round(ms, 3), steps_per_s=round(1e3 / ms, 2),
                            tflops=round(tf, 1), pct_of_peak=round(100 * tf / self.peak, 1) if self.peak else None,
                            **extra)

    def resident(self, which):
        """"diffusers", "minisd" or "both" on the GPU, the other U-Net and VAE on the CPU."""
        for name, mods in (("diffusers", (self.pipe.unet, self.pipe.vae)), ("minisd", (self.sd.unet, self.sd.vae))):
            for m in mods:
                m.to(self.dev if which in (name, "both") else "cpu")
        free(self.dev)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--reps", type=int, default=2, help="timed whole-pipeline runs (median)")
    p.add_argument("--sections", default="step,pipeline,adapters", help="any of step,pipeline,adapters,compile")
    p.add_argument("--all-variants", action="store_true", help="also cudnn.benchmark and each SDPA backend")
    args = p.parse_args(argv)
    if args.smoke:
        args.dtypes, args.batches, args.steps, args.reps, args.sections = "fp32", "1", 2, 1, "step,pipeline"
    dev, rec = common.start("sampling", args)
    sections = set(args.sections.split(","))
    rec.meta["bf16_matmul_peak_tflops"] = peak = matmul_peak_tflops(dev)
    log(f"env {rec.meta['env']}; bf16 matmul peak {peak} TFLOP/s")
    for dname in args.dtypes.split(","):
        t0 = time.time()
        pipe, sd = build_pipelines(dev, DTYPES[dname], args.tiny)
        h, D = pipe.unet.config.sample_size, pipe.unet.config.cross_attention_dim
        log(f"[{dname}] built both pipelines in {time.time() - t0:.1f}s")
        for B in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator(dev).manual_seed(B)
            x = torch.randn(B, 4, h, h, generator=g, device=dev).to(DTYPES[dname])
            ctx = torch.randn(2 * B, 77, D, generator=g, device=dev).to(DTYPES[dname])
            c = Case(args, rec, dev, dname, pipe, sd, B, x, ctx, peak)
            if "step" in sections:
                step_section(c)
            if "pipeline" in sections:
                pipeline_section(c, sections)
            if "adapters" in sections and dname == args.dtypes.split(",")[0]:
                adapters_section(c)
        del pipe, sd, c
        free(dev)
    report(rec)


# ---------------------------------------------------------------------------------------------------- step

def step_section(c):
    """One guided U-Net step: eager, the peer replayed from a CUDA graph, minisd's graph in each variant."""
    log(f"[{c.dname} b{c.B}] guided U-Net step ({c.flops / 1e12:.2f} TFLOP)")
    with torch.no_grad():
        for impl, fn in (("diffusers-eager", c.eager_diffusers), ("minisd-eager", c.eager_minisd))[not c.peer:]:
            try:
                c.step_row(impl, time_ms(fn, c.dev))
            except Exception as e:
                c.rec.error(f"step {impl} {c.dname} b{c.B}", e)
        tt = c.timestep()  # a fixed timestep tensor: a capture cannot copy from the host
        for fmt in (torch.contiguous_format, torch.channels_last) if c.cuda else ():
            try:  # the GPU-bound peer: diffusers' step replayed from a CUDA graph
                c.pipe.unet.to(memory_format=fmt)
                c.step_row("diffusers-graph", time_ms(graphed(lambda: c.eager_diffusers(tt), c.dev), c.dev, iters=20),
                           variant="channels_last" if fmt == torch.channels_last else None)
            except Exception as e:
                c.rec.error(f"step diffusers-graph {fmt} {c.dname} b{c.B}", e)
            c.pipe.unet.to(memory_format=torch.contiguous_format)
            free(c.dev)
        ref = c.eager_minisd().float()
        if c.peer:
            c.rec.add(section="check", **c.base,
                      step_eps_minisd_vs_diffusers=float(f"{rel(c.eager_diffusers().float(), ref):.3g}"))
        if c.cuda:
            with settings(c.sd.unet, channels_last=True):
                c.step_row("minisd-eager", time_ms(c.eager_minisd, c.dev), variant="channels_last")
        for v in graph_variants(c) if c.cuda else []:
            graph_variant_row(c, v, ref)


def graph_variants(c):
    variants = [{}, dict(channels_last=True)]
    full = not c.args.tiny and c.dname == "fp16"
    if full:  # without each capture-time form, and without all of them
        variants += [dict(channels_last=True, pytorch_groupnorm=True),
                     *[dict(channels_last=True, without=f) for f in graphs.FORMS],
                     dict(channels_last=True, without="all_forms")]
    if full and c.args.all_variants:
        variants += [dict(benchmark=True, channels_last=True), dict(channels_last=True, sdpa="FLASH_ATTENTION"),
                     dict(channels_last=True, sdpa="CUDNN_ATTENTION")]
    return variants


def graph_variant_row(c, v, ref):
    """minisd's guided step replayed from a CUDA graph in variant v: speed, capture time, error against eager."""
    try:
        forms = tuple(f for f in graphs.FORMS if v.get("without") not in (f, "all_forms"))
        with settings(c.sd.unet, **{k: v[k] for k in v if k != "without"}):
            t1 = time.time()
            graph = graphs.GuidedUNetGraph(c.sd.unet, c.x, c.ctx, c.gs, forms=forms)
            capture_s = time.time() - t1
            err = rel(graph(c.x, c.t, c.ctx).float(), ref)
            ms = time_ms(lambda: graph(c.x, c.t, c.ctx), c.dev, iters=20)
            graph = None  # frees the capture before the next one
        c.step_row("minisd-graph", ms, variant=variant_name(v), capture_s=round(capture_s, 2),
                   rel_err_vs_eager=float(f"{err:.3g}"))
    except Exception as e:
        c.rec.error(f"step graph {variant_name(v)} {c.dname} b{c.B}", e)
    free(c.dev)


# ------------------------------------------------------------------------------------------------ pipeline

def pipeline_section(c, sections):
    """The whole sampler of each stack, then the checks: images and latents against each other, decode and text
    timings, where each stack's peak memory comes from."""
    log(f"[{c.dname} b{c.B}] whole sampler, {c.args.steps} steps")
    prompts = [f"a photo of cat number {i}" for i in range(c.B)]
    kept = {}  # images and latents of each run, for the checks
    pipeline_runs(c, sections, prompts, kept)
    lat = torch.randn(c.B, 4, *c.x.shape[2:], device=c.dev, dtype=c.dt)  # latents for the decoder's timings
    checks = pipeline_checks(c, prompts, kept, lat)
    memory_parts(c, checks, lat)
    c.resident("both")
    c.rec.add(section="check", **c.base,
              **{k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in checks.items()})


def sample_minisd(c, prompts, kept, steps, graph, key):
    decode = c.sd.decode
    c.sd.decode = lambda lat: (kept.__setitem__(key + "_latents", lat.float().cpu()), decode(lat))[1]
    try:
        kept[key] = c.sd.sample(prompts, steps=steps, guidance=c.gs, seed=0, progress=False, cuda_graph=graph)
    finally:
        del c.sd.decode


def sample_diffusers(c, prompts, kept, steps, compiled=False):
    pipe = c.pipe
    if compiled and not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        pipe.unet = torch.compile(pipe.unet.to(memory_format=torch.channels_last), mode="reduce-overhead",
                                  fullgraph=True)
    kept["diffusers"] = pipe(prompts, num_inference_steps=steps, guidance_scale=c.gs, output_type="pt",
                             generator=torch.Generator("cpu").manual_seed(0)).images.float().cpu()


def pipeline_runs(c, sections, prompts, kept):
    runs = [("diffusers-eager", lambda steps: sample_diffusers(c, prompts, kept, steps)),
            ("minisd-eager", lambda steps: sample_minisd(c, prompts, kept, steps, False, "eager"))][not c.peer:]
    if c.cuda:
        runs.append(("minisd-graph", lambda steps: sample_minisd(c, prompts, kept, steps, True, "graph")))
    if c.cuda and "compile" in sections:
        runs.append(("diffusers-compile", lambda steps: sample_diffusers(c, prompts, kept, steps, compiled=True)))
    for impl, fn in runs:
        try:
            c.resident(impl.split("-")[0])
            t1 = time.time()
            fn(min(3, c.args.steps))  # warm-up (and the graph capture, the compilation)
            warm_s = time.time() - t1
            reset_peak(c.dev)
            s = wall_s(lambda: fn(c.args.steps), c.dev, reps=c.args.reps)
            c.rec.add(section="pipeline", impl=impl, **c.base, s_per_batch=round(s, 4), s_per_image=round(s / c.B, 4),
                      images_per_s=round(c.B / s, 3), peak_gb=peak_gb(c.dev), warmup_s=round(warm_s, 1))
        except Exception as e:
            c.rec.error(f"pipeline {impl} {c.dname} b{c.B}", e)
        free(c.dev)
    if isinstance(c.pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        c.pipe.unet = c.pipe.unet._orig_mod.to(memory_format=torch.contiguous_format)
    c.resident("both")


def pipeline_checks(c, prompts, kept, lat):
    checks = {}
    if "graph" in kept:
        checks["graph_vs_eager_images"] = rel(kept["graph"], kept["eager"])
        checks["graph_vs_eager_latents"] = rel(kept["graph_latents"], kept["eager_latents"])
        try:  # eager on channels_last weights, as attach leaves them on CUDA: the same kernels
            sample_minisd(c, prompts, kept, c.args.steps, False, "eager_cl")
            checks["graph_vs_eager_cl_images"] = rel(kept["graph"], kept["eager_cl"])
            checks["graph_vs_eager_cl_latents"] = rel(kept["graph_latents"], kept["eager_cl_latents"])
        except Exception as e:
            c.rec.error("same-layout check", e)
    c.sd.unet.to(memory_format=torch.contiguous_format)
    c.sd.fast.graphs.release()
    if "eager" in kept and "diffusers" in kept:
        checks["eager_vs_diffusers_images"] = rel(kept["eager"], kept["diffusers"])
    checks["latents_finite"] = bool(torch.isfinite(kept["eager_latents"]).all()) if "eager_latents" in kept else None
    try:
        with torch.no_grad():
            for layout, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
                c.sd.vae.to(memory_format=fmt)  # channels_last: what minisd.fast.attach sets on CUDA
                checks[f"vae_decode_ms_{layout}"] = round(time_ms(lambda: c.sd.decode(lat), c.dev, iters=2, reps=2,
                                                                  warmup=1), 2)
            checks["text_encode_ms"] = round(time_ms(lambda: c.sd.encode_prompt([""] * c.B + prompts), c.dev,
                                                     iters=3, reps=2), 2)
    except Exception as e:
        c.rec.error("decode timing", e)
    return checks


def memory_parts(c, checks, lat):
    """Where each pipeline's peak comes from: resident weights, VAE decode, one eager U-Net step."""
    stacks = (("minisd", lambda: c.sd.vae.decode(lat), c.eager_minisd),
              ("diffusers", lambda: c.pipe.vae.decode(lat).sample, c.eager_diffusers))
    for stack, decode, step in stacks[:1 + c.peer]:
        try:
            c.resident(stack)
            with torch.no_grad():
                for part, fn in (("decode", decode), ("step", step)):
                    reset_peak(c.dev)
                    base_gb = torch.cuda.memory_allocated() / 2 ** 30 if c.cuda else 0
                    fn()
                    checks[f"{part}_peak_gb_{stack}"] = peak_gb(c.dev)
                checks[f"resident_gb_{stack}"] = round(base_gb, 2)
        except Exception as e:
            c.rec.error(f"memory {stack}", e)


# ------------------------------------------------------------------------------------------------ adapters

def adapters_section(c):
    log(f"[{c.dname} b{c.B}] adapters")
    gen = torch.Generator(c.dev).manual_seed(7)
    try:
        adapters_minisd(c, gen)
    except Exception as e:
        c.rec.error(f"adapters minisd {c.dname} b{c.B}", e)
    free(c.dev)
    try:
        adapters_peft(c, gen)
    except Exception as e:
        c.rec.error(f"adapters peft {c.dname} b{c.B}", e)
    free(c.dev)


def adapters_minisd(c, gen):
    """Two rank-16 adapters (attn + ff, random non-zero ups): none, one or two unmerged, both merged; eager and
    replayed with each packing of the graph."""
    sd = c.sd
    for name in ("a", "b"):
        lora.inject(sd.unet, name, 16, targets=("attn", "ff"), dtype=c.dt, generator=gen)
        with torch.no_grad():
            for _, layer in lora.network.adapted_layers(sd.unet, name=name):
                layer.adapters[name].up.normal_(0, 0.02, generator=gen)
    cases = [("none", lambda: [lora.enable(sd.unet, n, False) for n in ("a", "b")]),
             ("1 unmerged", lambda: lora.enable(sd.unet, "a", True)),
             ("2 unmerged", lambda: lora.enable(sd.unet, "b", True)),
             ("2 merged", lambda: lora.merge(sd.unet))]
    if c.cuda:
        sd.unet.to(memory_format=torch.channels_last)  # as the graph path runs it
    with torch.no_grad():
        for label, prepare in cases:
            prepare()
            c.step_row("minisd-eager", time_ms(c.eager_minisd, c.dev), adapters=label, variant="channels_last")
            ref = c.eager_minisd().float()
            packings = ("weight", "factors", None) if label in ("1 unmerged", "2 unmerged") else ("weight",)
            for pack in packings if c.cuda else ():
                free(c.dev)
                before = torch.cuda.memory_allocated()
                graph = graphs.GuidedUNetGraph(sd.unet, c.x, c.ctx, c.gs, pack_adapters=pack)
                extra = (torch.cuda.memory_allocated() - before) / 2 ** 30
                err = rel(graph(c.x, c.t, c.ctx).float(), ref)
                c.step_row("minisd-graph", time_ms(lambda: graph(c.x, c.t, c.ctx), c.dev, iters=20), adapters=label,
                           variant=f"channels_last+pack={pack or 'none (lora.fused)'}",
                           rel_err_vs_eager=float(f"{err:.3g}"), graph_extra_gb=round(extra, 3))
                graph = None  # frees the capture before the next one
    lora.unmerge(sd.unet)
    sd.unet.to(memory_format=torch.contiguous_format)
    lora.remove(sd.unet, "a")
    lora.remove(sd.unet, "b")
    sd.fast.graphs.release()


def adapters_peft(c, gen):
    """diffusers + peft with the same two unmerged adapters, eager."""
    from peft import LoraConfig
    unet = c.pipe.unet
    for name in ("a", "b"):
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=PEFT_TARGETS), adapter_name=name)
    unet.set_adapters(["a", "b"])
    with torch.no_grad():
        for n, prm in unet.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02, generator=gen)
    unet.to(c.dt)
    with torch.no_grad():
        c.step_row("diffusers-eager", time_ms(c.eager_diffusers, c.dev), adapters="2 unmerged (peft)")
    unet.delete_adapters(["a", "b"])


# -------------------------------------------------------------------------------------------------- report

def report(rec):
    cols = ["section", "impl", "dtype", "batch", "variant", "adapters", "ms", "steps_per_s", "tflops", "pct_of_peak",
            "warmup_s", "s_per_batch", "images_per_s", "peak_gb", "rel_err_vs_eager", "graph_extra_gb"]
    checks = [r for r in rec.rows if r["section"] == "check"]
    log(table([r for r in rec.rows if r["section"] != "check"], cols))
    log(table(checks, ["dtype", "batch", "step_eps_minisd_vs_diffusers", "graph_vs_eager_images",
                       "graph_vs_eager_latents", "graph_vs_eager_cl_images", "graph_vs_eager_cl_latents",
                       "eager_vs_diffusers_images", "latents_finite", "vae_decode_ms_nchw", "vae_decode_ms_cl",
                       "text_encode_ms"]))
    log(table(checks, ["dtype", "batch"] + [f"{k}_{s}" for s in ("minisd", "diffusers")
                                            for k in ("resident_gb", "decode_peak_gb", "step_peak_gb")]))
    pipeline = lambda impl, r: next((q for q in rec.rows if q["section"] == "pipeline" and q["impl"] == impl
                                     and q["dtype"] == r["dtype"] and q["batch"] == r["batch"]), None)
    ratios = []
    for r in rec.rows:
        if r["section"] == "pipeline" and r["impl"].startswith("minisd") and pipeline("diffusers-eager", r):
            eager, compiled = pipeline("diffusers-eager", r), pipeline("diffusers-compile", r)
            ratios.append(dict(impl=r["impl"], dtype=r["dtype"], batch=r["batch"],
                               speedup_vs_diffusers=round(r["images_per_s"] / eager["images_per_s"], 2),
                               vs_diffusers_compile=round(r["images_per_s"] / compiled["images_per_s"], 2)
                               if compiled else None))
    rec.meta["ratios"] = ratios
    rec.save()
    log(table(ratios, ["impl", "dtype", "batch", "speedup_vs_diffusers", "vs_diffusers_compile"]))


if __name__ == "__main__":
    main()
