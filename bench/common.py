"""Shared by the bench/ scripts: the same random SD 1.4-architecture weights in diffusers and minisd, timers, JSON.

The diffusers models are built directly on the device with SD 1.4's configuration (--tiny: the tests' small one),
every parameter re-drawn (norm weights near 1, the rest ~ 1/sqrt(fan_in), as tests/sdfixtures does), and minisd's
U-Net, VAE and text encoder get copies of those weights (through minisd.checkpoint's name map; the text encoder's
names are transformers'). Both pipelines share a character-level CLIP tokenizer (no downloads).
"""
import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SD14 = dict(unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
            vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                     sample_size=512),
            clip=dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, hidden_act="quick_gelu"))
TINY = dict(unet=dict(sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=64,
                      attention_head_dim=8, norm_num_groups=32),
            vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32),
            clip=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                      max_position_embeddings=77, hidden_act="quick_gelu"))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # = lora.inject(targets=("attn", "ff"))
QUICK = False  # --tiny: time one call (a smoke test of the code paths, not a measurement)


def parser(doc):
    """The options every benchmark has: --tiny, --smoke, --device, --out; the script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tests' small config (a CPU smoke test)")
    p.add_argument("--smoke", action="store_true", help="the test suite's smoke test: --tiny on the CPU, the smallest "
                   "case of each kind, one call per timing, no peer (diffusers, peft) runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file")
    return p


def start(name, args):
    """(device, Recorder) of a benchmark run; --tiny sets QUICK, --smoke also --tiny and --device cpu."""
    global QUICK
    if args.smoke:
        args.tiny, args.device = True, "cpu"
    QUICK = args.tiny
    dev = torch.device(args.device)
    return dev, Recorder(args.out, {"bench": name, "args": vars(args), "env": environment(dev)})


def log(*a):
    print(*a, flush=True)


@torch.no_grad()
def redraw(module, seed):
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, device=p.device)
        if p.ndim == 1:
            p.copy_(1 + 0.1 * r if ("norm" in name and name.endswith("weight")) else 0.1 * r)
        else:
            p.copy_(r / math.sqrt(p[0].numel()))
    return module


def build_unets(device, dtype, tiny, seed=0):
    """(diffusers UNet2DConditionModel, minisd UNet) with identical random weights, eval, frozen, on device in dtype;
    minisd's with the speed layer's module swaps, as minisd.load gives it (minisd.fast.speed_up)."""
    from diffusers import UNet2DConditionModel
    from minisd.checkpoint import load_strict, unet_from_diffusers
    from minisd.fast import speed_up
    from minisd.unet import UNet, UNetConfig
    kw = (TINY if tiny else SD14)["unet"]
    with torch.device(device):
        ref = redraw(UNet2DConditionModel(**kw), seed)
    c = ref.config
    boc = c.block_out_channels
    cfg = UNetConfig(model_channels=boc[0], channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.layers_per_block,
                     attention_levels=tuple(i for i, t in enumerate(c.down_block_types) if "CrossAttn" in t),
                     num_heads=c.attention_head_dim, context_dim=c.cross_attention_dim, norm_groups=c.norm_num_groups)
    with torch.device("meta"):
        ours = UNet(cfg)
    load_strict(ours, {k: v.detach().clone() for k, v in unet_from_diffusers(ref.state_dict(), cfg, "bench").items()},
                "bench", "U-Net")
    for m in (ref, ours):
        m.to(dtype=dtype).eval().requires_grad_(False)
    return ref, speed_up(ours)


def build_pipelines(device, dtype, tiny, seed=0):
    """(diffusers StableDiffusionPipeline with DDIM, minisd StableDiffusion with the speed layer, as minisd.load
    gives it), the same weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from minisd.tokenizer import load_tokenizer
    from minisd.checkpoint import load_strict, vae_from_diffusers
    from minisd.clip import CLIPTextConfig as OurTextConfig
    from minisd.text import build_text_encoder
    from minisd.fast import attach
    from minisd.pipeline import StableDiffusion
    from minisd.ddim import Schedule
    from minisd.vae import AutoencoderKL as OurVAE, VAEConfig
    from sdfixtures import write_char_tokenizer
    cfgs = TINY if tiny else SD14
    ref_unet, unet = build_unets(device, dtype, tiny, seed)
    with torch.device(device):
        vae = redraw(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                   **cfgs["vae"]), seed + 1)
        text = redraw(CLIPTextModel(CLIPTextConfig(**cfgs["clip"])), seed + 2)
    v = vae.config
    vcfg = VAEConfig(ch=v.block_out_channels[0], ch_mult=tuple(c // v.block_out_channels[0] for c in v.block_out_channels),
                     num_res_blocks=v.layers_per_block)
    with torch.device("meta"):
        our_vae = OurVAE(vcfg)
    load_strict(our_vae, {k: t.detach().clone() for k, t in vae_from_diffusers(vae.state_dict(), vcfg, "bench").items()},
                "bench", "VAE")
    our_text = build_text_encoder({k: t.detach().clone() for k, t in text.state_dict().items()}, "bench",
                                  OurTextConfig(**cfgs["clip"]))
    for m in (vae, text, our_vae, our_text):
        m.to(dtype=dtype).eval().requires_grad_(False)
    chars = write_char_tokenizer(tempfile.mkdtemp())
    tok = CLIPTokenizer.from_pretrained(str(chars))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=ref_unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = StableDiffusion(unet, our_vae, our_text, load_tokenizer(chars), Schedule(),
                           sample_size=ref_unet.config.sample_size, name="bench")
    return pipe, attach(ours)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, iters=10, reps=3, warmup=2):
    """Median over `reps` of the mean time per call of `iters` back-to-back calls, in ms (CUDA events on the GPU)."""
    if QUICK:
        iters, reps, warmup = 1, 1, 0
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(out)


def graphed(fn, device, warmup=3, repeat=1):
    """A callable replaying fn (`repeat` calls of it, in one graph) from a CUDA graph (fn itself off CUDA); fn's
    tensors become the graph's buffers."""
    if torch.device(device).type != "cuda":
        return fn
    from minisd.fast.graphs import _capture, _warm_up
    _warm_up(fn, warmup)
    g = torch.cuda.CUDAGraph()
    with _capture(g):
        for _ in range(repeat):
            fn()
    return g.replay


def wall_s(fn, device, reps=2):
    """Median wall time of whole calls (synchronised), in s."""
    out = []
    for _ in range(1 if QUICK else reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.device(device).type == "cuda" else None


def free(device):
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak_tflops(device, n=8192, dtype=torch.bfloat16):
    """A large bf16 matrix product on random data: the measured ceiling for the efficiency lines."""
    if torch.device(device).type != "cuda":
        return None
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, iters=10, reps=3, warmup=3)
    return round(2 * n ** 3 / ms / 1e9, 1)


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


def environment(device):
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def save(path, payload):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str))


def table(rows, cols):
    """A plain text table of the dict rows, in the given columns."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


class Recorder:
    """Collects result rows and errors; saves the JSON after every row, so a timeout still leaves results."""

    def __init__(self, out, meta):
        self.out, self.meta, self.rows, self.errors = out, meta, [], []

    def add(self, **row):
        self.rows.append(row)
        log("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        self.save()
        return row

    def error(self, what, exc):
        import traceback
        tb = traceback.format_exc()
        log(f"  ERROR in {what}: {type(exc).__name__}: {exc}\n{tb}")
        self.errors.append({"what": what, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-3000:]})
        self.save()

    def save(self):
        save(self.out, {**self.meta, "rows": self.rows, "errors": self.errors})
