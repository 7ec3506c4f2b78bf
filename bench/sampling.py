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
    peer = not args.smoke
    cuda = dev.type == "cuda"
    sections = set(args.sections.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    rec.meta["bf16_matmul_peak_tflops"] = peak = matmul_peak_tflops(dev)
    log(f"env {rec.meta['env']}; bf16 matmul peak {peak} TFLOP/s")
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        t0 = time.time()
        pipe, sd = build_pipelines(dev, dt, args.tiny)
        h = pipe.unet.config.sample_size
        D = pipe.unet.config.cross_attention_dim
        log(f"[{dname}] built both pipelines in {time.time() - t0:.1f}s")
        def resident(which):  # "diffusers", "minisd" or "both" on the GPU, the other U-Net and VAE on the CPU
            for name, mods in (("diffusers", (pipe.unet, pipe.vae)), ("minisd", (sd.unet, sd.vae))):
                for m in mods:
                    m.to(dev if which in (name, "both") else "cpu")
            free(dev)

        for B in batches:
            g = torch.Generator(dev).manual_seed(B)
            x = torch.randn(B, 4, h, h, generator=g, device=dev).to(dt)
            ctx = torch.randn(2 * B, 77, D, generator=g, device=dev).to(dt)
            gs, t = args.guidance, 501

            def eager_minisd():
                e_u, e_c = sd.unet(torch.cat([x, x]), torch.tensor(t, device=dev), ctx).chunk(2)
                return e_u + gs * (e_c - e_u)

            def eager_diffusers():
                e_u, e_c = pipe.unet(torch.cat([x, x]), torch.tensor(t, device=dev), encoder_hidden_states=ctx).sample.chunk(2)
                return e_u + gs * (e_c - e_u)

            with torch.no_grad():
                flops = count_flops(lambda: sd.unet(torch.cat([x, x]), torch.tensor(t, device=dev), ctx))
            base = dict(dtype=dname, batch=B)

            def step_row(impl, ms, **extra):
                tf = flops / ms / 1e9
                return rec.add(section="step", impl=impl, **base, ms=round(ms, 3), steps_per_s=round(1e3 / ms, 2),
                               tflops=round(tf, 1), pct_of_peak=round(100 * tf / peak, 1) if peak else None, **extra)

            if "step" in sections:
                log(f"[{dname} b{B}] guided U-Net step ({flops / 1e12:.2f} TFLOP)")
                with torch.no_grad():
                    for impl, fn in (("diffusers-eager", eager_diffusers), ("minisd-eager", eager_minisd))[not peer:]:
                        try:
                            step_row(impl, time_ms(fn, dev))
                        except Exception as e:
                            rec.error(f"step {impl} {dname} b{B}", e)
                    tt = torch.tensor(t, device=dev)

                    def diffusers_static():  # eager_diffusers on a fixed timestep tensor: a capture cannot copy from the host
                        e_u, e_c = pipe.unet(torch.cat([x, x]), tt, encoder_hidden_states=ctx).sample.chunk(2)
                        return e_u + gs * (e_c - e_u)
                    for fmt in (torch.contiguous_format, torch.channels_last) if cuda else ():
                        try:  # the GPU-bound peer: diffusers' step replayed from a CUDA graph
                            pipe.unet.to(memory_format=fmt)
                            step_row("diffusers-graph", time_ms(graphed(diffusers_static, dev), dev, iters=20),
                                     variant="channels_last" if fmt == torch.channels_last else None)
                        except Exception as e:
                            rec.error(f"step diffusers-graph {fmt} {dname} b{B}", e)
                        pipe.unet.to(memory_format=torch.contiguous_format)
                        free(dev)
                    ref = eager_minisd().float()
                    if peer:
                        rec.add(section="check", **base,
                                step_eps_minisd_vs_diffusers=float(f"{rel(eager_diffusers().float(), ref):.3g}"))
                    if cuda:
                        with settings(sd.unet, channels_last=True):
                            step_row("minisd-eager", time_ms(eager_minisd, dev), variant="channels_last")
                    variants = [{}, dict(channels_last=True)]
                    if cuda and not args.tiny and dname == "fp16":  # without each capture-time form, and without both
                        variants += [dict(channels_last=True, pytorch_groupnorm=True),
                                     *[dict(channels_last=True, without=f) for f in graphs.FORMS],
                                     dict(channels_last=True, without="all_forms")]
                    if cuda and not args.tiny and dname == "fp16" and args.all_variants:
                        variants += [dict(benchmark=True, channels_last=True), dict(channels_last=True, sdpa="FLASH_ATTENTION"),
                                     dict(channels_last=True, sdpa="CUDNN_ATTENTION")]
                    for v in variants if cuda else []:
                        try:
                            forms = tuple(f for f in graphs.FORMS if v.get("without") not in (f, "all_forms"))
                            with settings(sd.unet, **{k: v[k] for k in v if k != "without"}):
                                t1 = time.time()
                                graph = graphs.GuidedUNetGraph(sd.unet, x, ctx, gs, forms=forms)
                                capture_s = time.time() - t1
                                err = rel(graph(x, t, ctx).float(), ref)
                                ms = time_ms(lambda: graph(x, t, ctx), dev, iters=20)
                                del graph
                            step_row("minisd-graph", ms, variant=variant_name(v), capture_s=round(capture_s, 2),
                                     rel_err_vs_eager=float(f"{err:.3g}"))
                        except Exception as e:
                            rec.error(f"step graph {variant_name(v)} {dname} b{B}", e)
                        free(dev)

            if "pipeline" in sections:
                log(f"[{dname} b{B}] whole sampler, {args.steps} steps")
                prompts = [f"a photo of cat number {i}" for i in range(B)]
                kept = {}

                def ours(steps, graph, key):
                    decode = sd.decode
                    sd.decode = lambda lat: (kept.__setitem__(key + "_latents", lat.float().cpu()), decode(lat))[1]
                    try:
                        kept[key] = sd.sample(prompts, steps=steps, guidance=gs, seed=0, progress=False, cuda_graph=graph)
                    finally:
                        del sd.decode

                def theirs(steps):
                    kept["diffusers"] = pipe(prompts, num_inference_steps=steps, guidance_scale=gs, output_type="pt",
                                             generator=torch.Generator("cpu").manual_seed(0)).images.float().cpu()

                def theirs_compiled(steps):
                    if not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
                        pipe.unet = torch.compile(pipe.unet.to(memory_format=torch.channels_last), mode="reduce-overhead",
                                                  fullgraph=True)
                    theirs(steps)

                runs = [("diffusers-eager", theirs), ("minisd-eager", lambda steps: ours(steps, False, "eager"))]
                runs = runs[not peer:]
                if cuda:
                    runs.append(("minisd-graph", lambda steps: ours(steps, True, "graph")))
                if cuda and "compile" in sections:
                    runs.append(("diffusers-compile", theirs_compiled))
                for impl, fn in runs:
                    try:
                        resident(impl.split("-")[0])
                        t1 = time.time()
                        fn(min(3, args.steps))  # warm-up (and the graph capture, the compilation)
                        warm_s = time.time() - t1
                        reset_peak(dev)
                        s = wall_s(lambda: fn(args.steps), dev, reps=args.reps)
                        rec.add(section="pipeline", impl=impl, **base, s_per_batch=round(s, 4), s_per_image=round(s / B, 4),
                                images_per_s=round(B / s, 3), peak_gb=peak_gb(dev), warmup_s=round(warm_s, 1))
                    except Exception as e:
                        rec.error(f"pipeline {impl} {dname} b{B}", e)
                    free(dev)
                if isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
                    pipe.unet = pipe.unet._orig_mod.to(memory_format=torch.contiguous_format)
                resident("both")
                checks = {}
                if "graph" in kept:
                    checks["graph_vs_eager_images"] = rel(kept["graph"], kept["eager"])
                    checks["graph_vs_eager_latents"] = rel(kept["graph_latents"], kept["eager_latents"])
                    try:  # eager on channels_last weights, as attach leaves them on CUDA: the same kernels
                        ours(args.steps, False, "eager_cl")
                        checks["graph_vs_eager_cl_images"] = rel(kept["graph"], kept["eager_cl"])
                        checks["graph_vs_eager_cl_latents"] = rel(kept["graph_latents"], kept["eager_cl_latents"])
                    except Exception as e:
                        rec.error("same-layout check", e)
                sd.unet.to(memory_format=torch.contiguous_format)
                sd.fast.graphs.release()
                if "eager" in kept and "diffusers" in kept:
                    checks["eager_vs_diffusers_images"] = rel(kept["eager"], kept["diffusers"])
                checks["latents_finite"] = bool(torch.isfinite(kept["eager_latents"]).all()) if "eager_latents" in kept else None
                try:
                    lat = torch.randn(B, 4, h, h, device=dev, dtype=dt)
                    with torch.no_grad():
                        for layout, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
                            sd.vae.to(memory_format=fmt)  # channels_last: what minisd.fast.attach sets on CUDA
                            checks[f"vae_decode_ms_{layout}"] = round(time_ms(lambda: sd.decode(lat), dev, iters=2, reps=2,
                                                                              warmup=1), 2)
                        checks["text_encode_ms"] = round(time_ms(lambda: sd.encode_prompt([""] * B + prompts), dev, iters=3, reps=2), 2)
                except Exception as e:
                    rec.error("decode timing", e)
                stacks = (("minisd", lambda: sd.vae.decode(lat), eager_minisd),
                          ("diffusers", lambda: pipe.vae.decode(lat).sample, eager_diffusers))
                for stack, decode, step in stacks[:1 + peer]:
                    try:  # where each pipeline's peak comes from: resident weights, VAE decode, one eager U-Net step
                        resident(stack)
                        with torch.no_grad():
                            for part, fn in (("decode", decode), ("step", step)):
                                reset_peak(dev)
                                base_gb = torch.cuda.memory_allocated() / 2 ** 30 if cuda else 0
                                fn()
                                checks[f"{part}_peak_gb_{stack}"] = peak_gb(dev)
                            checks[f"resident_gb_{stack}"] = round(base_gb, 2)
                    except Exception as e:
                        rec.error(f"memory {stack}", e)
                resident("both")
                rec.add(section="check", **base, **{k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in checks.items()})

            if "adapters" in sections and (dname == args.dtypes.split(",")[0]):
                log(f"[{dname} b{B}] adapters")
                try:
                    gen = torch.Generator(dev).manual_seed(7)
                    for name in ("a", "b"):
                        lora.inject(sd.unet, name, 16, targets=("attn", "ff"), dtype=dt, generator=gen)
                        with torch.no_grad():
                            for _, layer in lora.network.adapted_layers(sd.unet, name=name):
                                layer.adapters[name].up.normal_(0, 0.02, generator=gen)
                    cases = [("none", lambda: None), ("1 unmerged", lambda: lora.enable(sd.unet, "b", False)),
                             ("2 unmerged", lambda: lora.enable(sd.unet, "b", True)),
                             ("2 merged", lambda: lora.merge(sd.unet))]
                    if cuda:
                        sd.unet.to(memory_format=torch.channels_last)  # as the graph path runs it
                    with torch.no_grad():
                        for label, prepare in cases:
                            if label == "none":
                                lora.enable(sd.unet, "a", False)
                                lora.enable(sd.unet, "b", False)
                            elif label == "1 unmerged":
                                lora.enable(sd.unet, "a", True)
                            prepare()
                            step_row("minisd-eager", time_ms(eager_minisd, dev), adapters=label, variant="channels_last")
                            ref = eager_minisd().float()
                            packings = ("weight", "factors", None) if label in ("1 unmerged", "2 unmerged") else ("weight",)
                            for pack in packings if cuda else ():
                                free(dev)
                                before = torch.cuda.memory_allocated()
                                graph = graphs.GuidedUNetGraph(sd.unet, x, ctx, gs, pack_adapters=pack)
                                extra = (torch.cuda.memory_allocated() - before) / 2 ** 30
                                err = rel(graph(x, t, ctx).float(), ref)
                                step_row("minisd-graph", time_ms(lambda: graph(x, t, ctx), dev, iters=20), adapters=label,
                                         variant=f"channels_last+pack={pack or 'none (lora.fused)'}",
                                         rel_err_vs_eager=float(f"{err:.3g}"), graph_extra_gb=round(extra, 3))
                                del graph
                    lora.unmerge(sd.unet)
                    sd.unet.to(memory_format=torch.contiguous_format)
                    lora.remove(sd.unet, "a")
                    lora.remove(sd.unet, "b")
                    sd.fast.graphs.release()
                except Exception as e:
                    rec.error(f"adapters minisd {dname} b{B}", e)
                free(dev)
                try:
                    from peft import LoraConfig
                    for name in ("a", "b"):
                        pipe.unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=PEFT_TARGETS), adapter_name=name)
                    pipe.unet.set_adapters(["a", "b"])
                    with torch.no_grad():
                        for n, prm in pipe.unet.named_parameters():
                            if "lora_B" in n:
                                prm.normal_(0, 0.02, generator=gen)
                    pipe.unet.to(dt)
                    with torch.no_grad():
                        step_row("diffusers-eager", time_ms(eager_diffusers, dev), adapters="2 unmerged (peft)")
                    pipe.unet.delete_adapters(["a", "b"])
                except Exception as e:
                    rec.error(f"adapters peft {dname} b{B}", e)
                free(dev)

        del pipe, sd
        free(dev)

    cols = ["section", "impl", "dtype", "batch", "variant", "adapters", "ms", "steps_per_s", "tflops", "pct_of_peak", "warmup_s",
            "s_per_batch", "images_per_s", "peak_gb", "rel_err_vs_eager", "graph_extra_gb"]
    log(table([r for r in rec.rows if r["section"] != "check"], cols))
    log(table([r for r in rec.rows if r["section"] == "check"],
              ["dtype", "batch", "step_eps_minisd_vs_diffusers", "graph_vs_eager_images", "graph_vs_eager_latents",
               "graph_vs_eager_cl_images", "graph_vs_eager_cl_latents", "eager_vs_diffusers_images", "latents_finite",
               "vae_decode_ms_nchw", "vae_decode_ms_cl", "text_encode_ms"]))
    log(table([r for r in rec.rows if r["section"] == "check"],
              ["dtype", "batch"] + [f"{k}_{s}" for s in ("minisd", "diffusers") for k in ("resident_gb", "decode_peak_gb", "step_peak_gb")]))
    ratios = []
    for r in rec.rows:
        if r["section"] == "pipeline" and r["impl"].startswith("minisd"):
            peer = next((q for q in rec.rows if q["section"] == "pipeline" and q["impl"] == "diffusers-eager"
                         and q["dtype"] == r["dtype"] and q["batch"] == r["batch"]), None)
            compiled = next((q for q in rec.rows if q["section"] == "pipeline" and q["impl"] == "diffusers-compile"
                             and q["dtype"] == r["dtype"] and q["batch"] == r["batch"]), None)
            if peer:
                ratios.append(dict(impl=r["impl"], dtype=r["dtype"], batch=r["batch"],
                                   speedup_vs_diffusers=round(r["images_per_s"] / peer["images_per_s"], 2),
                                   vs_diffusers_compile=round(r["images_per_s"] / compiled["images_per_s"], 2) if compiled else None))
    rec.meta["ratios"] = ratios
    rec.save()
    log(table(ratios, ["impl", "dtype", "batch", "speedup_vs_diffusers", "vs_diffusers_compile"]))


if __name__ == "__main__":
    main()
