"""Fine-tune block-wise LoRA / LoCon adapters of a Stable Diffusion 1.x checkpoint on a folder of images.

    python train.py                                   # minisd-tiny + the shipped identity set -> out/identity.safetensors
    python train.py --data data/style --blocks in0,out3 --out out/style.safetensors     # the paper's style adapter
    python train.py --ckpt sd-v1-4.ckpt --tokenizer openai/clip-vit-large-patch14 --data photos/ \\
        --prompt "a photo of sks person" --resolution 512 --rank 16 --steps 1000 --out out/me.safetensors
    torchrun --nproc-per-node 2 train.py ...           # data-parallel over GPUs (DistributedDataParallel)
    python train.py --eager ...                        # on CUDA: plain PyTorch steps, not replayed from CUDA graphs

Data: png / jpg / webp files with optional same-name .txt captions, else --prompt; kohya-style repeat folders
"N_name" count each image N times (and "name" is the caption when there is neither). The VAE latents and, when
the text encoder is frozen, the text embeddings are computed once and cached. The output is a kohya-format
.safetensors that A1111, ComfyUI, diffusers and sample.py load.
"""
import argparse
import contextlib
import functools
import io
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

try:
    import fcntl  # POSIX: the --out lock
except ImportError:
    fcntl = None

import lora
import minisd
from minisd.files import atomic_save, read_regular
from minisd.images import grid, to_pil
from minisd.limits import check_device, require, training_bytes

ROOT = Path(__file__).resolve().parent
ADAPTER = "trained"  # the name of the adapter being trained, inside the model
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_REPEATS = 1000  # kohya folders use 1-100; 10**9 would be an index of 8 GB per image
MAX_ASPECT = 8  # a 1 x 60000 image would be resized to size x 60000*size before the crop keeps 1/60000 of it
IMAGE_BYTES = 1 << 28  # 256 MiB: a 16-bit 8K PNG is about 200 MB
CAPTION_BYTES = 1 << 16  # CLIP reads 77 tokens (a few hundred characters); the tokenizer would still read every byte
# what a resumed run is expected to share with the run that saved the state (rank, blocks and algo must match)
RESUME_SETTINGS = ("data", "prior_data", "prompt", "resolution", "batch", "grad_accum", "lr", "te_lr", "alpha", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("model and data")
    a.add_argument("--ckpt", default=str(ROOT / "weights" / "tiny"), help="base model: LDM single file or diffusers folder (default: minisd-tiny)")
    a.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or hub name, for single files")
    a.add_argument("--data", default=str(ROOT / "data" / "identity"), help="image folder (default: the shipped identity set)")
    a.add_argument("--prompt", default=None, help="caption for images without a .txt file (instance prompt)")
    a.add_argument("--resolution", type=int, default=None, help="square training size (default: the model's native size)")
    a.add_argument("--flip", action="store_true", help="random horizontal flips")
    a.add_argument("--prior-data", default=None, help="class-image folder for prior preservation (DreamBooth)")
    a.add_argument("--prior-prompt", default=None, help="caption for class images without a .txt file")
    a.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    a = p.add_argument_group("adapter")
    a.add_argument("--algo", choices=["lora", "locon"], default="lora", help="lora: attention/ff/proj linears; locon: also ResBlock and sampler convs")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--alpha", type=float, default=None, help="default: = rank (scale 1)")
    a.add_argument("--conv-rank", type=int, default=None, help="rank of k x k convs with --algo locon (default: --rank)")
    a.add_argument("--conv-alpha", type=float, default=None, help="default: = conv rank")
    a.add_argument("--blocks", default="all", help="which blocks and ranks: all, attn-only, in0,out3, in0=8,out3=16, 25 values, or a .toml/.json rank table")
    a.add_argument("--te-rank", type=int, default=0, help="text-encoder adapter rank (0: text encoder frozen)")
    a.add_argument("--te-alpha", type=float, default=None)
    a = p.add_argument_group("training")
    a.add_argument("--steps", type=int, default=300, help="optimizer steps")
    a.add_argument("--batch", type=int, default=4, help="images per step (per GPU)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    a.add_argument("--te-lr", type=float, default=None, help="text-encoder adapter learning rate (default: --lr)")
    a.add_argument("--weight-decay", type=float, default=0.01)
    a.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    a.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="cosine")
    a.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto", help="auto: bf16 on GPUs that have it, else fp16 on GPU, none on CPU")
    a.add_argument("--grad-checkpointing", action="store_true",
                   help="less memory (SD 1.4 512², batch 8: 8.6 -> 3.5 GB), about 35%% more time")
    mode = a.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="plain PyTorch steps (default on CUDA: the CUDA graph, "
                      "where the settings allow it)")
    mode.add_argument("--cuda-graph", action="store_true", help="replay each step (forward, backward, clipping, AdamW) "
                      "from a CUDA graph: same data and random draws, fewer kernel launches; the default on CUDA; not "
                      "with fp16, --grad-accum > 1, --prior-data or --te-rank (without this flag they train eagerly)")
    a.add_argument("--min-snr-gamma", type=float, default=0.0, help="min-SNR-gamma loss weighting (5 is common; 0: off)")
    a.add_argument("--noise-offset", type=float, default=0.0, help="offset noise (0.05-0.1 helps very dark/bright images)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.add_argument_group("output")
    a.add_argument("--out", default="out/identity.safetensors", help="adapter file (kohya format)")
    a.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (adapter + resumable state)")
    a.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from a state file, or the newest one next to --out")
    a.add_argument("--sample-prompts", default=None, help="prompts separated by '|' (or a .txt file, one per line) to render during training")
    a.add_argument("--sample-every", type=int, default=0, help="render the sample prompts every N steps (and at the end)")
    a.add_argument("--sample-steps", type=int, default=25)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------- data

def find_images(folder, default_caption):
    """[(path, caption, repeats)] from a folder; 'N_name' subfolders repeat their images N times."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder")
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        m = re.fullmatch(r"(\d+)_(.*)", path.parent.name) if path.parent != folder else None
        txt = path.with_suffix(".txt")
        caption = read_caption(txt) if txt.is_file() else default_caption or (m[2] if m else None)
        if not caption:
            raise ValueError(f"{path}: no caption (.txt file) and no --prompt")
        repeats = int(m[1]) if m else 1
        if repeats > MAX_REPEATS:
            raise ValueError(f"{path.parent}: {repeats} repeats (the folder's 'N_' prefix); at most {MAX_REPEATS}")
        items.append((path, caption, repeats))
    if not items:
        raise ValueError(f"--data {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def read_caption(txt):
    return read_regular(txt, CAPTION_BYTES, "caption file").decode(errors="replace").strip()


def load_image(path, size):
    """Any readable image -> (3, size, size) float in [-1, 1]: EXIF rotation applied, converted to RGB (alpha over
    white), resized so the short side is `size` and center-cropped. None (with a warning) if unreadable, not a
    regular file, over 256 MiB or longer than 8 times its width (or the reverse)."""
    try:
        with Image.open(io.BytesIO(read_regular(path, IMAGE_BYTES, "training image"))) as im:
            if max(im.size) > MAX_ASPECT * min(im.size):
                raise ValueError(f"{im.width} x {im.height} pixels, an aspect ratio beyond {MAX_ASPECT}:1")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
            if im.mode in ("I;16", "I;16B", "I"):  # 16-bit grayscale: scale to 8 bits first
                im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
    except Exception as e:  # PIL raises many kinds; one bad photo must not end the run
        warnings.warn(f"{path}: skipped, unreadable image ({type(e).__name__}: {e})")
        return None
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


@torch.no_grad()
def cache_latents(sd, items, size, flip, device, quiet=False):
    """Encode every image once: (mean, std) of the VAE latent (scaled), for the image and, with --flip, its mirror."""
    kept, means, stds = [], [], []
    for path, caption, repeats in tqdm(items, desc="caching latents", leave=False, disable=quiet):
        img = load_image(path, size)
        if img is None:
            continue
        views = torch.stack([img, img.flip(-1)] if flip else [img]).to(device, sd.dtype)
        mean, logvar = sd.vae.encode(views)
        kept.append((caption, repeats))
        means.append(mean.float() * sd.vae.cfg.scale_factor)
        stds.append((0.5 * logvar.float()).exp() * sd.vae.cfg.scale_factor)
    if not kept:
        raise ValueError("no readable images")
    return kept, torch.stack(means), torch.stack(stds)  # (N, views, 4, h, w)


# ----------------------------------------------------------------------------------------------- training

def lr_factor(step, args):
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[args.schedule]


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    """The data order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same batches. The
    derived seed wraps at 2**64 (torch's seed range), so every --seed works."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 64))


def state_files(out):
    """The `<out stem>-step<N>.state.pt` files beside `out`, by step number (the name is matched as text: '[', '*'
    and '?' in it are no pattern)."""
    if not out.parent.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.parent.iterdir()
             for m in [re.fullmatch(re.escape(out.stem) + r"-step(\d+)\.state\.pt", p.name)] if m]
    return [p for _, p in sorted(found)]


def step_of(state_file):
    return int(re.search(r"-step(\d+)\.state\.pt$", state_file.name)[1])


@contextlib.contextmanager
def out_lock(out):
    """Hold the lock `.<out name>.lock` beside --out while the run lives (flock; the file holds the PID): a second run
    on the same --out is refused, naming the first one's PID. The kernel releases a lock when its process ends,
    however it ends, so a lock file left by a killed run is stale and simply taken over. No lock without fcntl
    (Windows)."""
    path = out.with_name(f".{out.name}.lock")
    if fcntl is None:
        yield path
        return
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise ValueError(f"--out {out}: another train.py run (PID {pid}) is writing it (lock file {path})") \
                from None
        if path.exists() and os.path.samefile(path, f.fileno()):  # else its holder removed it meanwhile: lock anew
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: a run waiting on this file sees it is gone and retries
        f.close()


class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM during training: the first asks the loop to save a checkpoint after the step it is
    in and stop; a second stops at once (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self):
        self.signal = None
        on = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)} if on else {}

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(RuntimeError):
    pass


def loss_plot(rows, path, width=640, height=240):
    """A small line plot of the loss (and its running mean), drawn with PIL."""
    from PIL import ImageDraw
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    losses = np.array([r[1] for r in rows])
    if len(losses) > 1:
        smooth = np.convolve(losses, np.ones(min(20, len(losses))) / min(20, len(losses)), mode="valid")
        lo, hi = float(losses.min()), float(np.percentile(losses, 98)) + 1e-8
        xy = lambda i, v, n: (40 + i * (width - 50) / max(1, n - 1), height - 20 - (min(v, hi) - lo) / (hi - lo) * (height - 40))
        d.line([xy(i, v, len(losses)) for i, v in enumerate(losses)], fill=(180, 200, 240))
        d.line([xy(i + len(losses) - len(smooth), v, len(losses)) for i, v in enumerate(smooth)], fill=(20, 60, 180), width=2)
        d.text((4, 4), f"loss {hi:.3g}", fill="black")
        d.text((4, height - 16), f"{lo:.3g}   step 0 .. {rows[-1][0]}", fill="black")
    im.save(path, format="PNG")


def mixed_precision(choice, device):
    """auto: bf16 on GPUs that compute it natively (not emulated: pre-Ampere GPUs), else fp16 on GPU, none on CPU."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        try:
            return train(args, cleanup)
        except (minisd.CheckpointError, ValueError, FileNotFoundError, KeyError, PermissionError, OSError, Interrupted,
                MemoryError, torch.OutOfMemoryError) as e:
            if args.debug:
                raise
            sys.exit(f"error: {_out_of_memory(e) if isinstance(e, (MemoryError, torch.OutOfMemoryError)) else e}")
        except KeyboardInterrupt:
            if args.debug:
                raise
            sys.exit("error: interrupted")


def _out_of_memory(e):
    return f"out of memory ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"


def check_numbers(args):
    """Counts positive, every float flag finite, the learning rates and alphas positive, the seed 64-bit, the device
    present."""
    for flag in ("steps", "batch", "grad_accum", "rank", "sample_steps"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("lr", "te_lr", "alpha", "conv_alpha", "te_alpha", "weight_decay", "prior_weight", "min_snr_gamma",
                 "noise_offset"):
        value, positive = getattr(args, flag), flag.endswith(("lr", "alpha"))  # the rest may be 0
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number {'>' if positive else '>='} 0, "
                             f"got {value}")
    if not 0 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be in 0 .. 2**64-1, got {args.seed}")


def check_out(out, ckpt):
    """--out may name a new file or an adapter file (it is replaced); never the base model or any other file."""
    if not out.exists():
        return
    if Path(ckpt).exists() and os.path.samefile(out, ckpt):
        raise ValueError(f"--out {out}: is the --ckpt base model; refusing to overwrite it")
    try:
        with safe_open(str(out), "pt") as f:
            keys = list(f.keys())
    except (OSError, SafetensorError):
        keys = []
    if not keys or not all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ValueError(f"--out {out}: exists and is not a kohya adapter file; refusing to overwrite it")


def train(args, cleanup):
    # -- distributed: one process per GPU under torchrun; rank 0 logs and saves
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    check_device(args.device)
    if args.cuda_graph:
        check_cuda_graph(args)
    args.cuda_graph, why = graph_mode(args)
    if why and rank == 0:
        print(f"note: {why}", file=sys.stderr)
    if world > 1:
        if args.prior_data:  # two forward passes before one backward: DDP would need another reducer setup
            raise ValueError("--prior-data does not work under torchrun yet: train on one process")
        cuda = not args.device.startswith("cpu")  # --device cpu: gloo on CPU processes (tests, laptops)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    main_process = rank == 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny weights and activations otherwise hit slow denormal arithmetic

    # -- check everything cheap before any heavy work
    check_numbers(args)
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or folder")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise ValueError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: adapters are written as .safetensors")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out}: is a folder, not an adapter file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write to {out.parent}")
    check_out(out, args.ckpt)
    if main_process:
        cleanup.enter_context(out_lock(out))
    table = (lora.rank_table(args.blocks) if args.blocks.endswith((".toml", ".json"))  # a file: the whole table
             else lora.rank_table(args.blocks, rank=args.rank, alphas=args.alpha))
    if args.conv_rank is not None or args.conv_alpha is not None:  # conv layers follow the same block selection
        conv = args.conv_rank if args.conv_rank is not None else args.rank
        table = lora.rank_table(list(table.dims), alphas=list(table.alphas), conv_dims=[conv if d else 0 for d in table.dims],
                                conv_alphas=args.conv_alpha)
    items = find_images(args.data, args.prompt)
    prior_items = find_images(args.prior_data, args.prior_prompt) if args.prior_data else []
    prompts = _sample_prompts(args.sample_prompts)
    resume_from = _resume_file(args.resume, out)

    # -- model: frozen base in the compute dtype, adapters in float32
    amp = mixed_precision(args.mixed_precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[amp]
    base_dtype = torch.float32 if amp == "fp16" else amp_dtype  # fp16 base weights would overflow in the backward
    sd = minisd.load(args.ckpt, device=device, dtype=base_dtype, tokenizer=args.tokenizer)
    size = args.resolution or sd.native_size
    f = sd.vae.cfg.downscale * 2 ** (len(sd.unet.cfg.channel_mult) - 1)  # VAE and U-Net downsampling together
    if size % f:
        raise ValueError(f"--resolution must be a multiple of {f} for this model (the VAE's {sd.vae.cfg.downscale}x "
                         f"and the U-Net's {f // sd.vae.cfg.downscale}x downsampling), got {size}")
    if prompts and args.sample_steps >= sd.schedule.num_train_timesteps:
        raise ValueError(f"--sample-steps must be below the model's {sd.schedule.num_train_timesteps} timesteps")
    require(training_bytes(sd, args.batch, size, args.grad_checkpointing) + adapter_bytes(sd, table, args),
            device, f"--resolution {size} --batch {args.batch} --rank {args.rank}"
            + f" --te-rank {args.te_rank}" * bool(args.te_rank))
    gen = torch.Generator().manual_seed(args.seed)
    targets = lora.C3LIER if args.algo == "locon" else lora.LIERLA
    adapted = lora.inject(sd.unet, ADAPTER, table, targets=targets, text_encoder=sd.text_encoder if args.te_rank else None,
                          te_rank=args.te_rank, te_alpha=args.te_alpha, generator=gen)
    if not adapted:
        raise ValueError(f"--blocks {args.blocks}: nothing to train, no {args.algo} target layer in a block of nonzero rank"
                         " (LoRA adapts attention, feed-forward and proj layers, which SD 1.x's in3 and out0 do not"
                         " have; --algo locon also adapts convolutions)")
    lora.use_fused(sd.unet, device.type == "cuda", sd.text_encoder if args.te_rank else None)  # plain is faster on a CPU
    if args.cuda_graph:  # cuDNN's NHWC kernels, and minisd.fast keeps the big activations NHWC (docs/performance.md)
        sd.unet.to(memory_format=torch.channels_last)
    unet_params = lora.trainable_parameters(sd.unet, ADAPTER) if any(p.startswith("unet.") for p in adapted) else []
    te_params = lora.trainable_parameters(sd.text_encoder, ADAPTER) if args.te_rank else []
    sd.unet.gradient_checkpointing = args.grad_checkpointing

    # -- data, cached: latents always, text embeddings while the text encoder is frozen
    data, means, stds = cache_latents(sd, items, size, args.flip, device, args.quiet)
    index = torch.tensor([i for i, (_, r) in enumerate(data) for _ in range(r)])  # repeats
    captions = [c for c, _ in data]
    prior = cache_latents(sd, prior_items, size, args.flip, device, args.quiet) if prior_items else None
    all_captions = set(captions) | {c for c, _ in prior[0]} if prior else set(captions)
    text_cache = None if args.te_rank else {c: sd.encode_prompt([c])[0] for c in all_captions}

    def embed(caps):
        return torch.stack([text_cache[c] for c in caps]) if text_cache else \
            minisd.text.encode_prompts(sd.tokenizer, sd.text_encoder, caps).to(base_dtype)

    groups = [{"params": unet_params, "lr": args.lr}] + ([{"params": te_params, "lr": args.te_lr or args.lr}] if te_params else [])
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, capturable=args.cuda_graph)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
        if args.cuda_graph:  # a GPU tensor that the schedule fills in place: the captured AdamW step reads it
            g["lr"] = torch.tensor(g["lr"], device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    model = sd.unet
    if world > 1 and args.cuda_graph:  # DDP's hooks cannot run inside a capture: one all-reduce between two graphs
        for p in unet_params:  # what DDP does at wrapping: every process starts from rank 0's adapters
            torch.distributed.broadcast(p.data, 0)
    elif world > 1:
        # the same adapters take part in every step (static_graph: DDP skips its per-step search for unused
        # parameters); gradients live in the all-reduce buckets (no copy into them)
        model = torch.nn.parallel.DistributedDataParallel(sd.unet, device_ids=[device.index] if device.type == "cuda" else None,
                                                          static_graph=True, gradient_as_bucket_view=True)
    ac = sd.schedule.alphas_cumprod.float().to(device)
    snr = ac / (1 - ac)
    step, history = 0, []
    if resume_from:
        step, history = resume(resume_from, sd, opt, scaler, gen, args)
        if main_process:
            print(f"resumed from {resume_from} at step {step}")

    rng_state = gen.get_state()  # what a checkpoint after no step saves
    mine = slice(rank * args.batch, (rank + 1) * args.batch)  # this process's share of a global batch

    def draw_batch(step, micro):
        """The CPU part of this process's share of micro-batch `micro` of `step`: draw_inputs' CPU tensors and the
        captions. Every process draws the whole global batch from `gen` and keeps its slice: N processes see what one
        process with an N times larger batch sees (data order and random draws), so the result is one GPU's up to
        the batch split."""
        k = (step * args.grad_accum + micro) * args.batch * world  # the global batch's first sample, in epoch order
        idx = torch.stack([epoch_order(len(index), args.seed, j // len(index))[j % len(index)]
                           for j in range(k, k + args.batch * world)])
        draws = [d[mine] for d in draw_inputs(index[idx], means.shape, gen, len(ac), args)]
        return draws, [captions[i] for i in draws[0]]

    def batch_inputs(draws, caps):
        """z0, noise, t and text context on the device, from draw_batch's draws and captions."""
        return (*inputs_on_device(means, stds, *draws, device), embed(caps))

    # -- the loop
    per_step = args.batch * args.grad_accum * world
    bar = tqdm(total=args.steps, initial=step, desc="training", disable=args.quiet or not main_process)
    t0 = time.time()
    sd.unet.train()
    graph = None
    if args.cuda_graph:  # the deterministic part of a step, captured once (zero inputs: `gen` is not touched)
        # The graph reads the parameters and buffers where they are now: nothing may replace them afterwards.
        B, latent = args.batch, means.shape[2:]
        example = (means.new_zeros(B, *latent), means.new_zeros(B, *latent), torch.zeros(B, dtype=torch.long, device=device),
                   embed(captions[:1] * B))
        loss_fn = lambda z0, noise, t, ctx: diffusion_loss(model, z0, noise, t, ctx, ac, snr, args, amp_dtype, device)
        average = (lambda g: torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.AVG)) if world > 1 else None
        graph = minisd.fast.TrainStepGraph(loss_fn, opt, example, clip_norm=1.0, reduce_grads=average)
    batch = draw_batch(step, 0) if step < args.steps else None  # each step's first micro-batch is drawn a step ahead
    stop = StopRequest() if world == 1 else None  # torchrun stops its processes itself
    if stop:
        cleanup.callback(stop.restore)
    while step < args.steps:
        factor = lr_factor(step, args)
        for g in opt.param_groups:
            if graph:
                g["lr"].fill_(g["initial_lr"] * factor)
            else:
                g["lr"] = g["initial_lr"] * factor
        if graph:  # forward, backward, clipping and the AdamW step in one replay, on the eager path's draws
            loss = graph(*batch_inputs(*batch))  # launched, not waited for
        else:
            total = 0.0
            for micro in range(args.grad_accum):
                if micro:
                    batch = draw_batch(step, micro)
                loss = diffusion_loss(model, *batch_inputs(*batch), ac, snr, args, amp_dtype, device)
                if prior is not None:
                    prow = torch.randint(len(prior[0]), (args.batch,), generator=gen)
                    prior_draws = draw_inputs(prow, prior[1].shape, gen, len(ac), args)
                    pz0, pnoise, pt = inputs_on_device(prior[1], prior[2], *prior_draws, device)
                    loss = loss + args.prior_weight * diffusion_loss(model, pz0, pnoise, pt, embed([prior[0][i][0] for i in prow]),
                                                                     ac, snr, args, amp_dtype, device)
                scaler.scale(loss / args.grad_accum).backward()
                total += loss.item() / args.grad_accum
        # The next step's CPU draws, before waiting for the loss: with --cuda-graph the GPU still runs this step. A
        # checkpoint saved after this step keeps `gen`'s state from before them: a run resumed from it draws them again.
        rng_state = gen.get_state()
        batch = draw_batch(step + 1, 0) if step + 1 < args.steps else None
        if graph:
            total = loss.item()
        if not math.isfinite(total):
            bar.close()
            for suffix in (".safetensors", ".state.pt") if main_process else ():
                bad = out.with_name(f"{out.stem}-step{step:06d}{suffix}")
                if bad.exists():  # saved from the weights that gave this loss: not one to resume from
                    bad.replace(bad.with_name(bad.name + ".nonfinite"))
            good = [p for p in state_files(out) if step_of(p) < step]
            where = f"; the last good checkpoint is {good[-1]}" if good else ""
            raise ValueError(f"loss is {total} at step {step}: stopping (try a lower --lr or --mixed-precision bf16){where}")
        if not graph:
            if world > 1 and te_params:  # DDP averages the U-Net's gradients; the text encoder's are averaged here
                for p in te_params:
                    torch.distributed.all_reduce(p.grad)  # a sum (gloo has no average)
                    p.grad /= world
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet_params + te_params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        step += 1
        history.append((step, total, opt.param_groups[0]["initial_lr"] * factor, round(time.time() - t0, 2)))
        bar.set_postfix(loss=f"{total:.4f}", img_s=f"{per_step * bar.n / max(1e-9, time.time() - t0):.1f}" if bar.n else "-")
        bar.update(1)
        saved = None
        if main_process and args.save_every and step % args.save_every == 0 and step < args.steps:
            saved = save_checkpoint(sd, opt, scaler, rng_state, step, history, args, out)
        if stop and stop.signal:
            saved = saved or save_checkpoint(sd, opt, scaler, rng_state, step, history, args, out)
            bar.close()
            raise Interrupted(f"{signal.Signals(stop.signal).name} at step {step}: saved {saved}; to continue, run the "
                              f"same command with --resume")
        if main_process and prompts and args.sample_every and step % args.sample_every == 0:
            render_samples(sd, prompts, args, out, step)
    bar.close()

    if main_process:
        if prompts and (not args.sample_every or step % args.sample_every):
            render_samples(sd, prompts, args, out, step)
        try:
            atomic_save(lambda p: lora.save_kohya(p, sd.unet, sd.text_encoder, ADAPTER,
                                                  metadata=kohya_args(args, len(data), size, step)), out)
        except OSError as e:  # a full disk: keep the run if a checkpoint still fits
            saved = rescue(lambda: save_checkpoint(sd, opt, scaler, rng_state, step, history, args, out), out)
            raise OSError(f"{e}; {saved}") from e
        write_log(history, out)
        took = time.time() - t0
        print(f"trained {step} steps ({per_step} images each) in {took:.0f}s, {per_step * len(history) / max(took, 1e-9):.1f} images/s;"
              f" final loss {np.mean([h[1] for h in history[-20:]]):.4f}; wrote {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def draw_inputs(rows, latents_shape, gen, timesteps, args):
    """The random part of the training examples of cached latents `rows` (cache shape `latents_shape`: images, views,
    C, H, W), drawn on the CPU from `gen`: rows, which view (the image or its mirror), the standard normal sample of
    the VAE posterior, noise (with optional offset noise) and timesteps t, all CPU tensors."""
    view = torch.randint(latents_shape[1], (len(rows),), generator=gen)
    normal = torch.randn((len(rows), *latents_shape[2:]), generator=gen)
    noise = torch.randn(normal.shape, generator=gen)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(normal.shape[:2] + (1, 1), generator=gen)
    t = torch.randint(0, timesteps, (len(rows),), generator=gen)
    return rows, view, normal, noise, t


def inputs_on_device(means, stds, rows, view, normal, noise, t, device):
    """z0 (sampled from the cached VAE posterior), noise and t on the device, from draw_inputs' draws."""
    z0 = means[rows, view] + stds[rows, view] * normal.to(device)
    return z0, noise.to(device), t.to(device)


def diffusion_loss(model, z0, noise, t, ctx, ac, snr, args, amp_dtype, device):
    """Noise-prediction MSE at timesteps t (with optional min-SNR weighting); no random draws, so --cuda-graph
    captures it. cache_enabled=False: autocast's weight cache cannot live across graph replays (same values)."""
    a = ac[t][:, None, None, None]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    # fp16: float32 base under autocast. bf16: the base is bf16 already and runs as it is; autocast would only move
    # every GroupNorm and LayerNorm to float32, with a cast on each side (docs/performance.md: 8 % of a step)
    with torch.autocast(device.type, amp_dtype, enabled=amp_dtype == torch.float16, cache_enabled=False):
        eps = model(zt.to(ctx.dtype), t, ctx)
    per_sample = ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if args.min_snr_gamma:
        per_sample = per_sample * torch.clamp(snr[t], max=args.min_snr_gamma) / snr[t]
    return per_sample.mean()


def graph_limit(args):
    """What the CUDA-graph step cannot take, or None. It captures one step of fixed shapes: one U-Net call, one
    optimizer step, no GradScaler and no text-encoder pass; under torchrun the gradients are averaged by one
    all-reduce between two graphs (forward + backward; clipping + AdamW)."""
    fp16 = mixed_precision(args.mixed_precision, torch.device(args.device)) == "fp16"
    unsupported = {"fp16 mixed precision (use --mixed-precision bf16 or no)": fp16, "--grad-accum > 1": args.grad_accum > 1,
                   "--prior-data": args.prior_data, "--te-rank > 0": args.te_rank > 0}
    return next((what for what, bad in unsupported.items() if bad), None)


def check_cuda_graph(args):
    """An explicit --cuda-graph: refuse what the graph cannot do, before any heavy work."""
    limit = graph_limit(args)
    if limit:
        raise ValueError(f"--cuda-graph does not work with {limit}")
    if torch.device(args.device).type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, got --device {args.device}")


def graph_mode(args):
    """(use the CUDA-graph step?, why not, or None): on CUDA unless --eager; a setting the graph cannot take trains
    eagerly, with the reason; on a CPU always eager (nothing to say)."""
    if args.eager or torch.device(args.device).type != "cuda":
        return False, None
    limit = graph_limit(args)
    return (False, f"eager steps: the CUDA graph does not take {limit}") if limit else (True, None)


def load_optimizer_state(opt, saved):
    """opt.load_state_dict(saved), keeping opt's own lr and capturable setting (load_state_dict takes both from the
    file), so that a state saved with or without --cuda-graph resumes either way."""
    own = [(g["lr"], g["capturable"]) for g in opt.param_groups]
    opt.load_state_dict(saved)
    for g, (lr, capturable) in zip(opt.param_groups, own):
        g["lr"], g["capturable"] = lr, capturable
        for p in g["params"]:
            if p in opt.state:  # AdamW keeps its step count beside the parameter when capturable, else on the CPU
                opt.state[p]["step"] = opt.state[p]["step"].to(p.device if capturable else "cpu", torch.float32)


def save_checkpoint(sd, opt, scaler, rng_state, step, history, args, out):
    """The adapter as it is now, and the state that resumes the run exactly (optimizer, scaler, RNG, history, and
    the settings of RESUME_SETTINGS), as a pair: if the state cannot be written, the adapter is removed again."""
    adapter = out.with_name(f"{out.stem}-step{step:06d}.safetensors")
    state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state,
             "history": [list(h) for h in history], "settings": run_settings(args),
             "adapter": {k: p.detach().cpu() for k, p in adapter_parameters(sd).items()}}
    path = out.with_name(f"{out.stem}-step{step:06d}.state.pt")
    try:
        meta = kohya_args(args, 0, 0, step)
        atomic_save(lambda p: lora.save_kohya(p, sd.unet, sd.text_encoder, ADAPTER, metadata=meta), adapter)
        atomic_save(lambda p: torch.save(state, p), path)
    except OSError as e:
        adapter.unlink(missing_ok=True)
        good = [p for p in state_files(out) if p != path]
        raise OSError(f"{e}; the last checkpoint is {good[-1] if good else 'none'}") from e
    return path


def rescue(save, out):
    """After the final adapter could not be written: save a checkpoint if one fits, and say what to resume from."""
    try:
        return f"saved {save()} instead: run the same command with --resume to write {out.name}"
    except OSError as e:
        return f"no checkpoint either ({e})"


def run_settings(args):
    """RESUME_SETTINGS of this run (folders as absolute paths)."""
    return {k: str(Path(getattr(args, k)).resolve()) if k.endswith("data") and getattr(args, k) else getattr(args, k)
            for k in RESUME_SETTINGS}


def resume(path, sd, opt, scaler, gen, args):
    """Load a --resume state into the adapter, optimizer, scaler and RNG; returns (step, history). A state of other
    adapter shapes (--rank/--blocks/--algo/--te-rank) is refused; other changed settings are warned about, as kohya
    continues with the new values: the run goes on, no longer the one an uninterrupted run would give."""
    state = minisd.checkpoint.read_pickle(path)
    with minisd.checkpoint.file_errors(path, "not a usable --resume state"):
        keys = ("step", "adapter", "optimizer", "scaler", "rng", "history")
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing or not isinstance(state["step"], int) or state["step"] < 0:
            what = f"no {', '.join(missing)}" if missing else f"step {str(state['step'])[:40]!r}"
            raise minisd.CheckpointError(f"--resume {path}: not a train.py state ({what})")
        params = adapter_parameters(sd)
        saved = state["adapter"]
        if set(saved) != set(params) or any(saved[k].shape != p.shape for k, p in params.items()):
            raise minisd.CheckpointError(f"--resume {path}: made with other adapter settings "
                                         "(--blocks/--rank/--algo/--te-rank)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        load_optimizer_state(opt, state["optimizer"])
        for p in (p for g in opt.param_groups for p in g["params"]):
            if any(v.shape != p.shape for k, v in opt.state.get(p, {}).items() if k != "step"):
                raise minisd.CheckpointError(f"--resume {path}: optimizer state of other shapes than the adapter")
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"])
        history = [tuple(r) for r in state["history"]]
        if not all(len(r) == 4 and all(isinstance(x, (int, float)) for x in r) for r in history):
            raise minisd.CheckpointError(f"--resume {path}: history rows are not (step, loss, lr, seconds)")
        settings = state.get("settings") if isinstance(state.get("settings"), dict) else {}  # none before this check
    for k, now in run_settings(args).items():
        before = settings.get(k, now)
        if before != now:
            warnings.warn(f"--resume {path}: --{k.replace('_', '-')} was {before}, now {now}; continuing with {now}")
    return state["step"], history


def adapter_bytes(sd, table, args):
    """The adapter's float32 parameters, gradients and two AdamW moments (16 bytes a value), before they exist."""
    targets = lora.C3LIER if args.algo == "locon" else lora.LIERLA
    values = 0
    for path, rank, _ in lora.target_paths(sd.unet, table, targets):
        m = sd.unet.get_submodule(path)
        n_in, n_out = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else \
            (m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
        values += rank * (n_in + n_out)
    text = [m for p, m in sd.text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(lora.network.TEXT_TARGET, p)]
    return 16 * (values + args.te_rank * sum(m.in_features + m.out_features for m in text))


def adapter_parameters(sd):
    """{name: parameter} of the trained adapter, U-Net and text encoder."""
    return {f"{part}.{k}": p for part, m in (("unet", sd.unet), ("te", sd.text_encoder))
            for k, p in m.named_parameters() if p.requires_grad}


def _resume_file(resume, out):
    if resume is None:
        return None
    if resume != "latest":
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume {resume}: no such file")
        return Path(resume)
    found = state_files(out)
    if not found:
        raise FileNotFoundError(f"--resume: no {out.stem}-step*.state.pt beside {out}")
    return found[-1]


def _sample_prompts(spec):
    if not spec:
        return []
    if spec.endswith(".txt"):
        try:
            text = read_regular(spec, CAPTION_BYTES, "prompt file").decode()
        except UnicodeDecodeError:
            raise ValueError(f"--sample-prompts {spec}: not a UTF-8 text file") from None
        if "\0" in text:
            raise ValueError(f"--sample-prompts {spec}: not a text file (NUL bytes)")
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [p.strip() for p in spec.split("|") if p.strip()]


@torch.no_grad()
def render_samples(sd, prompts, args, out, step):
    sd.unet.eval()
    images = to_pil(sd.sample(prompts, steps=args.sample_steps, guidance=7.5, seed=args.seed, progress=False))
    sd.unet.train()
    folder = out.with_name(f"{out.stem}-samples")
    folder.mkdir(exist_ok=True)
    atomic_save(lambda p: grid(images, min(4, len(images))).save(p, format="PNG"), folder / f"step{step:06d}.png")


def kohya_args(args, n_images, size, step):
    """Training settings in kohya's ss_* metadata names (strings)."""
    return {"ss_learning_rate": str(args.lr), "ss_text_encoder_lr": str(args.te_lr or args.lr), "ss_unet_lr": str(args.lr),
            "ss_max_train_steps": str(args.steps), "ss_steps": str(step), "ss_batch_size_per_device": str(args.batch),
            "ss_gradient_accumulation_steps": str(args.grad_accum), "ss_lr_scheduler": args.schedule,
            "ss_lr_warmup_steps": str(args.warmup), "ss_mixed_precision": args.mixed_precision, "ss_seed": str(args.seed),
            "ss_num_train_images": str(n_images), "ss_resolution": f"({size}, {size})", "ss_min_snr_gamma": str(args.min_snr_gamma),
            "ss_noise_offset": str(args.noise_offset), "ss_sd_model_name": Path(args.ckpt).name,
            "minisd_blocks_spec": str(args.blocks), "minisd_algo": args.algo, "ss_training_comment": "minisd train.py"}


def write_log(history, out):
    rows = "step,loss,lr,seconds\n" + "".join(f"{s},{l:.6f},{lr:.3g},{t}\n" for s, l, lr, t in history)
    atomic_save(lambda p: p.write_text(rows), out.with_name(f"{out.stem}-loss.csv"))
    atomic_save(lambda p: loss_plot(history, p), out.with_name(f"{out.stem}-loss.png"))


if __name__ == "__main__":
    main()
