"""Fine-tune block-wise LoRA / LoCon adapters of a Stable Diffusion 1.x checkpoint on a folder of images.

    python train.py                                   # minisd-tiny + the identity set -> out/identity.safetensors
    python train.py --data data/style --blocks in0,out3 --out out/style.safetensors     # the paper's style adapter
    python train.py --ckpt sd-v1-4.ckpt --tokenizer openai/clip-vit-large-patch14 --data photos/ \\
        --prompt "a photo of sks person" --resolution 512 --rank 16 --steps 1000 --out out/me.safetensors
    torchrun --nproc-per-node 2 train.py ...           # data-parallel over GPUs (DistributedDataParallel)
    python train.py --eager ...                        # on CUDA: plain PyTorch steps, not replayed from CUDA graphs

Data: png / jpg / webp files with optional same-name .txt captions, else --prompt; kohya-style repeat folders
"N_name" count each image N times (and "name" is the caption when there is neither). The VAE latents and, when
the text encoder is frozen, the text embeddings are computed once and cached. The output is a kohya-format
.safetensors that A1111, ComfyUI, diffusers and sample.py load.

The file reads top to bottom: main() and train() name the steps of a run, each defined below in that order (check
the flags; start the processes; read the inputs; build the model and adapters; cache the data; optimizer and DDP;
resume; the loss; the loop, one training step at a time; finish).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

try:
    import fcntl  # POSIX: the --out lock
except ImportError:
    fcntl = None

import lora
import minisd.fast
import minisd.hashes
import minisd.text
from lora.network import TEXT_TARGET
from minisd.checkpoint import CheckpointError, file_errors, read_pickle
from minisd.cli import one_line_errors
from minisd.files import atomic_save, read_regular
from minisd.images import grid, save_png, to_pil
from minisd.limits import check_device, require, training_bytes
from minisd.pipeline import StableDiffusion

ROOT = Path(__file__).resolve().parent
ADAPTER = "trained"  # the name of the adapter being trained, inside the model
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_REPEATS = 1000  # kohya folders use 1-100; 10**9 would be an index of 8 GB per image
MAX_ASPECT = 8  # a 1 x 60000 image would be resized to size x 60000*size before the crop keeps 1/60000 of it
IMAGE_BYTES = 1 << 28  # 256 MiB: a 16-bit 8K PNG is about 200 MB
CAPTION_BYTES = 1 << 16  # CLIP reads 77 tokens (a few hundred characters); the tokenizer would still read every byte
# what a resumed run is expected to share with the run that saved the state (rank, blocks and algo must match)
RESUME_SETTINGS = ("data", "prior_data", "prompt", "resolution", "batch", "grad_accum", "lr", "te_lr", "alpha", "seed")
# what checking the flags and reading the input files raise: one line each (CheckpointError is a ValueError)
INPUT_ERRORS = (ValueError, OSError, KeyError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_flags(p.add_argument_group("model and data"))
    add_adapter_flags(p.add_argument_group("adapter"))
    add_training_flags(p.add_argument_group("training"))
    add_output_flags(p.add_argument_group("output"))
    args = p.parse_args(argv)
    if args.device is None:  # asked only when needed: a forked run given --device cpu never touches CUDA
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def add_model_and_data_flags(a):
    a.add_argument("--ckpt", default=str(ROOT / "weights" / "tiny"),
                   help="base model: LDM single file or diffusers folder (default: minisd-tiny)")
    a.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or hub name, for single files")
    a.add_argument("--data", default=str(ROOT / "data" / "identity"),
                   help="image folder (default: the shipped identity set)")
    a.add_argument("--prompt", default=None, help="caption for images without a .txt file (instance prompt)")
    a.add_argument("--resolution", type=int, default=None,
                   help="square training size (default: the model's native size)")
    a.add_argument("--flip", action="store_true", help="random horizontal flips")
    a.add_argument("--prior-data", default=None, help="class-image folder for prior preservation (DreamBooth)")
    a.add_argument("--prior-prompt", default=None, help="caption for class images without a .txt file")
    a.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior-preservation loss")


def add_adapter_flags(a):
    a.add_argument("--algo", choices=["lora", "locon"], default="lora",
                   help="lora: attention/ff/proj linears; locon: also ResBlock and sampler convs")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--alpha", type=float, default=None, help="default: = rank (scale 1)")
    a.add_argument("--conv-rank", type=int, default=None,
                   help="rank of k x k convs with --algo locon (default: --rank)")
    a.add_argument("--conv-alpha", type=float, default=None, help="default: = conv rank")
    a.add_argument("--blocks", default="all", help="which blocks and ranks: all, attn-only, in0,out3, in0=8,out3=16, "
                   "25 values, or a .toml/.json rank table")
    a.add_argument("--te-rank", type=int, default=0, help="text-encoder adapter rank (0: text encoder frozen)")
    a.add_argument("--te-alpha", type=float, default=None)


def add_training_flags(a):
    a.add_argument("--steps", type=int, default=300, help="optimizer steps")
    a.add_argument("--batch", type=int, default=4, help="images per step (per GPU)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    a.add_argument("--te-lr", type=float, default=None, help="text-encoder adapter learning rate (default: --lr)")
    a.add_argument("--weight-decay", type=float, default=0.01)
    a.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    a.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="cosine")
    a.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPUs that have it, else fp16 on GPU, none on CPU")
    a.add_argument("--grad-checkpointing", action="store_true",
                   help="less memory (SD 1.4 512², batch 8: 8.6 -> 3.5 GB), about 35%% more time")
    mode = a.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="plain PyTorch steps (default on CUDA: the CUDA graph, "
                      "where the settings allow it)")
    mode.add_argument("--cuda-graph", action="store_true", help="replay each step (forward, backward, clipping, "
                      "AdamW) from a CUDA graph: same data and random draws, fewer kernel launches; the default on "
                      "CUDA; not with fp16, --grad-accum > 1, --prior-data or --te-rank (without this flag they train "
                      "eagerly)")
    a.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting (5 is common; 0: off)")
    a.add_argument("--noise-offset", type=float, default=0.0,
                   help="offset noise (0.05-0.1 helps very dark/bright images)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda where there is one)")


def add_output_flags(a):
    a.add_argument("--out", default="out/identity.safetensors", help="adapter file (kohya format)")
    a.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (adapter + resumable state)")
    a.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a state file, or the newest one next to --out")
    a.add_argument("--sample-prompts", default=None,
                   help="prompts separated by '|' (or a .txt file, one per line) to render during training")
    a.add_argument("--sample-every", type=int, default=0,
                   help="render the sample prompts every N steps (and at the end)")
    a.add_argument("--sample-steps", type=int, default=25)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--debug", action="store_true", help="show tracebacks")


# ------------------------------------------------------------------------------------------------------ the run

class RunError(Exception):
    """What ends a run for a reason the researcher can act on (a flag the model cannot take, no readable image, a
    signal, a non-finite loss, a file not written): main() prints it as one line."""


class Stopped(RunError):
    """A signal ended the run, after its checkpoint."""


def main(argv=None, stop=None):
    """Train an adapter; returns its file. A RunError, too little memory or a second Ctrl-C end the run with one
    line `error: ...` (--debug: the traceback); anything else (an edited model's bug) raises as it is. `stop`: a
    StopRequest made in the main thread, for a run in another thread (only the main thread receives signals); a
    run it stops returns None, and its caller says so."""
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        try:
            return train(args, cleanup, stop)
        except (RunError, MemoryError, torch.OutOfMemoryError) as e:
            if isinstance(e, Stopped) and stop is not None:
                return None
            if args.debug:
                raise
            sys.exit(f"error: {e if isinstance(e, RunError) else out_of_memory(e)}")
        except KeyboardInterrupt:
            if args.debug:
                raise
            sys.exit("error: interrupted")


def out_of_memory(e):
    return f"out of memory ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"


def train(args, cleanup, stop=None):
    """The steps of a run, in order; returns the adapter file."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # torchrun's; rank 0 saves
    began = time.time()
    with one_line_errors(INPUT_ERRORS, args.debug):
        check_flags(args, world, rank)
    start_processes(args, world)
    with one_line_errors(INPUT_ERRORS, args.debug):
        inputs = read_inputs(args, rank, cleanup)
    read = time.time()
    sd, amp_dtype, base_dtype = load_base_model(args)
    loaded = time.time()
    size = check_model_takes(sd, inputs, args)
    gen = torch.Generator().manual_seed(args.seed)  # every random draw of the run, the adapters' initialization first
    unet_params, te_params = add_adapters(sd, inputs.table, gen, args)
    adapted = time.time()
    data = cache_data(sd, inputs, size, base_dtype, args)
    cached = time.time()
    opt = make_optimizer(unet_params, te_params, args)
    scaler = torch.amp.GradScaler(sd.device.type, enabled=amp_dtype == torch.float16)  # fp16 only
    model = data_parallel(sd.unet, unet_params, world, args)
    ac = sd.schedule.alphas_cumprod.float().to(torch.device(args.device))
    run = Run(args=args, out=inputs.out, world=world, rank=rank, sd=sd, amp_dtype=amp_dtype, model=model,
              params=unet_params + te_params, te_params=te_params, opt=opt, scaler=scaler, gen=gen, data=data,
              prompts=inputs.prompts, size=size, alphas_cumprod=ac, snr=ac / (1 - ac))
    if inputs.resume_from:
        resume_run(run, inputs.resume_from)
    run.rng_state = gen.get_state()  # what a checkpoint after no step saves
    run.t0 = time.time()
    sd.unet.train()
    run.graph = capture_train_step(run) if args.cuda_graph else None
    # "optimizer" also holds DDP's wrapping and reading a --resume state; AdamW() imports torch._dynamo: 0.7-1.6 s
    # on a 2-core CPU, 3.4-3.9 s on an H100 host (docs/performance.md)
    run.startup = {"inputs": read - began, "model": loaded - read, "adapters": adapted - loaded,
                   "data": cached - adapted, "optimizer": run.t0 - cached,
                   **({"capture": time.time() - run.t0} if run.graph else {})}
    if stop is None and world == 1:  # torchrun stops its processes itself
        stop = StopRequest()
        cleanup.callback(stop.restore)
    train_loop(run, stop)
    if rank == 0:
        finish(run)
    if world > 1:
        torch.distributed.destroy_process_group()
    return run.out


# ---------------------------------------------------------------------------------------------- the flags

def check_flags(args, world, rank):
    """Everything cheap about the flags, before any heavy work; decides eager or graph steps (args.cuda_graph)."""
    check_device(args.device)
    if args.cuda_graph:
        check_cuda_graph(args)
    args.cuda_graph, why = graph_mode(args)
    if why and rank == 0:
        print(f"note: {why}", file=sys.stderr)
    if world > 1 and args.prior_data:  # two forward passes before one backward: DDP would need another reducer setup
        raise ValueError("--prior-data does not work under torchrun yet: train on one process")
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


def check_numbers(args):
    """Counts positive, every float flag finite, the learning rates and alphas positive, the seed 64-bit."""
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


def graph_limit(args):
    """What the CUDA-graph step cannot take, or None. It captures one step of fixed shapes: one U-Net call, one
    optimizer step, no GradScaler and no text-encoder pass; under torchrun the gradients are averaged by one
    all-reduce between two graphs (forward + backward; clipping + AdamW)."""
    fp16 = mixed_precision(args.mixed_precision, torch.device(args.device)) == "fp16"
    unsupported = {"fp16 mixed precision (use --mixed-precision bf16 or no)": fp16,
                   "--grad-accum > 1": args.grad_accum > 1, "--prior-data": args.prior_data,
                   "--te-rank > 0": args.te_rank > 0}
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


def mixed_precision(choice, device):
    """auto: bf16 on GPUs that compute it natively (not emulated: pre-Ampere GPUs), else fp16 on GPU, none on CPU."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


# ------------------------------------------------------------------------------------------- the processes

def start_processes(args, world):
    """Under torchrun (world > 1) one process per GPU, or per CPU process with --device cpu; args.device becomes
    this process's GPU."""
    if world > 1:
        cuda = not args.device.startswith("cpu")  # --device cpu: gloo on CPU processes (tests, laptops)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    if torch.device(args.device).type == "cpu":
        # process-wide: tiny weights and activations otherwise hit slow denormal arithmetic (flushed to 0 instead)
        torch.set_flush_denormal(True)


# ----------------------------------------------------------------------------------------------- the inputs

@dataclass
class Inputs:
    """What the flags name, read and checked before the model is: the files a run reads and writes."""
    out: Path  # the adapter file, locked while the run lives
    table: lora.ranks.RankTable  # --blocks: the rank (and alpha) of each block
    items: list  # (path, caption, repeats) of each training image
    prior_items: list  # the same for --prior-data's class images
    prompts: list  # --sample-prompts
    resume_from: Path | None  # --resume's state file


def read_inputs(args, rank, cleanup):
    """The --out path (checked, and locked by rank 0), the rank table, the images and captions, the sample prompts
    and the --resume file."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write to {out.parent}")
    check_out(out, args.ckpt)
    if rank == 0:
        cleanup.enter_context(out_lock(out))
    if args.blocks.endswith((".toml", ".json")):  # a file: the whole table (its errors name the file)
        table = lora.rank_table(args.blocks)
    else:
        try:
            table = lora.rank_table(args.blocks, rank=args.rank, alphas=args.alpha)
        except ValueError as e:
            raise ValueError(f"--blocks {args.blocks}: {e}") from None
    if args.conv_rank is not None or args.conv_alpha is not None:  # conv layers follow the same block selection
        conv = args.conv_rank if args.conv_rank is not None else args.rank
        table = lora.rank_table(list(table.dims), alphas=list(table.alphas),
                                conv_dims=[conv if d else 0 for d in table.dims], conv_alphas=args.conv_alpha)
    return Inputs(out=out, table=table, items=find_images(args.data, args.prompt),
                  prior_items=find_images(args.prior_data, args.prior_prompt) if args.prior_data else [],
                  prompts=sample_prompts(args.sample_prompts), resume_from=_resume_file(args.resume, out))


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


def sample_prompts(spec):
    """--sample-prompts: 'a|b' or a .txt file of one prompt a line."""
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


def _resume_file(resume, out):
    """--resume's state file: the one named, or with no value the newest beside --out."""
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


# ------------------------------------------------------------------------------------ the model and adapters

def load_base_model(args):
    """The base model, frozen; returns it, the compute dtype and the base's dtype (float32 under fp16 autocast:
    fp16 base weights would overflow in the backward)."""
    amp = mixed_precision(args.mixed_precision, torch.device(args.device))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[amp]
    base_dtype = torch.float32 if amp == "fp16" else amp_dtype
    with one_line_errors(CheckpointError, args.debug):  # the file's problems; the model's code raises as it is
        sd = minisd.fast.load(args.ckpt, device=torch.device(args.device), dtype=base_dtype, tokenizer=args.tokenizer)
    return sd, amp_dtype, base_dtype


def check_model_takes(sd, inputs, args):
    """The flags the model decides: a resolution its VAE and U-Net can halve, --sample-steps within its schedule,
    the memory training needs. Returns the training resolution."""
    size = args.resolution or sd.native_size
    f = sd.vae.cfg.downscale * 2 ** (len(sd.unet.cfg.channel_mult) - 1)  # VAE and U-Net downsampling together
    if size % f:
        raise RunError(f"--resolution must be a multiple of {f} for this model (the VAE's {sd.vae.cfg.downscale}x "
                       f"and the U-Net's {f // sd.vae.cfg.downscale}x downsampling), got {size}")
    if inputs.prompts and args.sample_steps >= sd.schedule.num_train_timesteps:
        raise RunError(f"--sample-steps must be below the model's {sd.schedule.num_train_timesteps} timesteps")
    needed = training_bytes(sd, args.batch, size, args.grad_checkpointing) + adapter_bytes(sd, inputs.table, args)
    with one_line_errors(ValueError, args.debug):
        require(needed, torch.device(args.device), f"--resolution {size} --batch {args.batch} --rank {args.rank}"
                + f" --te-rank {args.te_rank}" * bool(args.te_rank))
    return size


def adapter_bytes(sd, table, args):
    """The adapter's float32 parameters, gradients and two AdamW moments (16 bytes a value), before they exist."""
    values = 0
    for path, rank, _ in lora.network.target_paths(sd.unet, table, lora.network.ALGOS[args.algo]):
        m = sd.unet.get_submodule(path)
        n_in, n_out = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else \
            (m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
        values += rank * (n_in + n_out)
    text = [m for p, m in sd.text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(TEXT_TARGET, p)]
    return 16 * (values + args.te_rank * sum(m.in_features + m.out_features for m in text))


def add_adapters(sd, table, gen, args):
    """The adapter being trained, in float32 (initialized from `gen`); returns its U-Net and text-encoder
    parameters."""
    text_encoder = sd.text_encoder if args.te_rank else None
    adapted = lora.inject(sd.unet, ADAPTER, table, targets=lora.network.ALGOS[args.algo], text_encoder=text_encoder,
                          te_rank=args.te_rank, te_alpha=args.te_alpha, generator=gen)
    if not adapted:
        raise RunError(f"--blocks {args.blocks}: nothing to train, no {args.algo} target layer in a block of nonzero "
                       "rank (LoRA adapts attention, feed-forward and proj layers, which SD 1.x's in3 and out0 do "
                       "not have; --algo locon also adapts convolutions)")
    lora.network.use_fused(sd.unet, sd.device.type == "cuda", text_encoder)  # plain is faster on a CPU
    if args.cuda_graph:  # cuDNN's NHWC kernels, NHWC GroupNorm (docs/performance.md#channels_last-and-groupnorm)
        sd.unet.to(memory_format=torch.channels_last)
    unet_params = lora.trainable_parameters(sd.unet, ADAPTER) if any(p.startswith("unet.") for p in adapted) else []
    te_params = lora.trainable_parameters(sd.text_encoder, ADAPTER) if args.te_rank else []
    sd.unet.gradient_checkpointing = args.grad_checkpointing
    return unet_params, te_params


# ------------------------------------------------------------------------------------------------- the data

@dataclass
class TrainingData:
    """The training images, cached once: VAE posteriors and, while the text encoder is frozen, caption embeddings."""
    captions: list  # image i's caption
    index: torch.Tensor  # the image of each sample of an epoch: image i as many times as its folder repeats it
    means: torch.Tensor  # (images, views, 4, h, w): the VAE posterior's mean, scaled, of the image (and its mirror)
    stds: torch.Tensor  # its standard deviation
    prior: tuple | None  # --prior-data's class images: ([(caption, repeats)], means, stds)
    text: dict | None  # caption -> embedding; None while the text encoder trains
    base_dtype: torch.dtype  # the text encoder's output dtype, when it runs in the loop


def cache_data(sd, inputs, size, base_dtype, args):
    """Latents always; text embeddings while the text encoder is frozen."""
    device = torch.device(args.device)
    kept, means, stds = cache_latents(sd, inputs.items, size, args.flip, device, args.quiet)
    captions = [c for c, _ in kept]
    index = torch.tensor([i for i, (_, r) in enumerate(kept) for _ in range(r)])  # repeats
    prior = cache_latents(sd, inputs.prior_items, size, args.flip, device, args.quiet) if inputs.prior_items else None
    all_captions = set(captions) | {c for c, _ in prior[0]} if prior else set(captions)
    text = None if args.te_rank else {c: sd.encode_prompt([c])[0] for c in all_captions}
    return TrainingData(captions, index, means, stds, prior, text, base_dtype)


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
        raise RunError("no readable images")
    return kept, torch.stack(means), torch.stack(stds)  # (N, views, 4, h, w)


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


# -------------------------------------------------------------------------------------- optimizer and DDP

def make_optimizer(unet_params, te_params, args):
    """AdamW over the adapter (the text encoder's with --te-lr); each group keeps its initial_lr for the schedule."""
    groups = [{"params": unet_params, "lr": args.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": args.te_lr or args.lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, capturable=args.cuda_graph)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
        if args.cuda_graph:  # a GPU tensor that the schedule fills in place: the captured AdamW step reads it
            g["lr"] = torch.tensor(g["lr"], device=torch.device(args.device))
    return opt


def data_parallel(unet, unet_params, world, args):
    """What the loss calls: the U-Net, or under torchrun its DistributedDataParallel wrapper (eager steps)."""
    if world == 1:
        return unet
    if args.cuda_graph:  # DDP's hooks cannot run inside a capture: one all-reduce between two graphs
        for p in unet_params:  # what DDP does at wrapping: every process starts from rank 0's adapters
            torch.distributed.broadcast(p.data, 0)
        return unet
    # the same adapters take part in every step (static_graph: DDP skips its per-step search for unused
    # parameters); gradients live in the all-reduce buckets (no copy into them)
    device = torch.device(args.device)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(unet, device_ids=device_ids, static_graph=True,
                                                     gradient_as_bucket_view=True)


# ------------------------------------------------------------------------------------------ the run's state

@dataclass
class Run:
    """What the steps of a run share: set up by train() in order, then advanced one training step at a time."""
    args: argparse.Namespace
    out: Path  # the adapter file
    world: int  # processes (torchrun); 1 without
    rank: int  # this process; rank 0 logs and saves
    sd: StableDiffusion  # the frozen base with the adapter being trained
    amp_dtype: torch.dtype  # the compute dtype (fp16: under autocast)
    model: torch.nn.Module  # what the loss calls: sd.unet or its DistributedDataParallel wrapper
    params: list  # the adapter's parameters: the U-Net's, then the text encoder's
    te_params: list  # the text encoder's
    opt: torch.optim.AdamW
    scaler: torch.amp.GradScaler  # fp16 loss scaling (off otherwise)
    gen: torch.Generator  # every random draw of the run, on the CPU
    data: TrainingData
    prompts: list  # --sample-prompts
    size: int  # the training resolution
    alphas_cumprod: torch.Tensor  # the noise schedule's, float32 on the device
    snr: torch.Tensor  # signal-to-noise ratio of each timestep: alphas_cumprod / (1 - alphas_cumprod)
    step: int = 0  # optimizer steps done
    resumed_at: int = 0  # the step a --resume state began this process at (its summary counts the steps after it)
    history: list = field(default_factory=list)  # (step, loss, lr, seconds since t0) of each step
    rng_state: torch.Tensor | None = None  # gen's state that a checkpoint after this step saves
    graph: minisd.fast.TrainStepGraph | None = None  # the captured step (--cuda-graph)
    t0: float = 0.0  # when the loop began (the graph's capture included)
    startup: dict = field(default_factory=dict)  # seconds of each part of the run before the loop
    base_hash: str | None = None  # the frozen base U-Net's hash for the adapters' metadata, computed at the first save

    @property
    def device(self):
        return torch.device(self.args.device)


# ------------------------------------------------------------------------------------------------- resume

def resume_run(run, path):
    """Continue from a --resume state: the adapter, optimizer, scaler, RNG, step and history."""
    with one_line_errors(CheckpointError, run.args.debug):
        run.step, run.history = resume(path, run.sd, run.opt, run.scaler, run.gen, run.args)
    run.resumed_at = run.step
    if run.rank == 0:
        print(f"resumed from {path} at step {run.step}")


def resume(path, sd, opt, scaler, gen, args):
    """Load a --resume state into the adapter, optimizer, scaler and RNG; returns (step, history). A state of other
    adapter shapes (--rank/--blocks/--algo/--te-rank) is refused; other changed settings are warned about, as kohya
    continues with the new values: the run goes on, no longer the one an uninterrupted run would give."""
    state = read_pickle(path)
    with file_errors(path, "not a usable --resume state"):
        keys = ("step", "adapter", "optimizer", "scaler", "rng", "history")
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing or not isinstance(state["step"], int) or state["step"] < 0:
            what = f"no {', '.join(missing)}" if missing else f"step {str(state['step'])[:40]!r}"
            raise CheckpointError(f"--resume {path}: not a train.py state ({what})")
        params = adapter_parameters(sd)
        saved = state["adapter"]
        if set(saved) != set(params) or any(saved[k].shape != p.shape for k, p in params.items()):
            raise CheckpointError(f"--resume {path}: made with other adapter settings "
                                  "(--blocks/--rank/--algo/--te-rank)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        load_optimizer_state(opt, state["optimizer"])
        for p in (p for g in opt.param_groups for p in g["params"]):
            if any(v.shape != p.shape for k, v in opt.state.get(p, {}).items() if k != "step"):
                raise CheckpointError(f"--resume {path}: optimizer state of other shapes than the adapter")
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"])
        history = [tuple(r) for r in state["history"]]
        if not all(len(r) == 4 and all(isinstance(x, (int, float)) for x in r) for r in history):
            raise CheckpointError(f"--resume {path}: history rows are not (step, loss, lr, seconds)")
        settings = state.get("settings") if isinstance(state.get("settings"), dict) else {}  # none before this check
    for k, now in run_settings(args).items():
        before = settings.get(k, now)
        if before != now:
            warnings.warn(f"--resume {path}: --{k.replace('_', '-')} was {before}, now {now}; continuing with {now}")
    return state["step"], history


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


def run_settings(args):
    """RESUME_SETTINGS of this run (folders as absolute paths)."""
    return {k: str(Path(getattr(args, k)).resolve()) if k.endswith("data") and getattr(args, k) else getattr(args, k)
            for k in RESUME_SETTINGS}


def adapter_parameters(sd):
    """{name: parameter} of the trained adapter, U-Net and text encoder."""
    return {f"{part}.{k}": p for part, m in (("unet", sd.unet), ("te", sd.text_encoder))
            for k, p in m.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- the loss

def draw_batch(run, step, micro):
    """The CPU part of this process's share of micro-batch `micro` of `step`: draw_inputs' CPU tensors and the
    captions. Every process draws the whole global batch from `gen` and keeps its slice: N processes see what one
    process with an N times larger batch sees (data order and random draws), so the result is one GPU's up to
    the batch split."""
    args, data, n = run.args, run.data, len(run.data.index)
    k = (step * args.grad_accum + micro) * args.batch * run.world  # the global batch's first sample, in epoch order
    idx = torch.stack([epoch_order(n, args.seed, j // n)[j % n] for j in range(k, k + args.batch * run.world)])
    mine = slice(run.rank * args.batch, (run.rank + 1) * args.batch)  # this process's share of a global batch
    draws = [d[mine] for d in draw_inputs(data.index[idx], data.means.shape, run.gen, len(run.alphas_cumprod), args)]
    return draws, [data.captions[i] for i in draws[0]]


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    """The data order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same batches. The
    derived seed wraps at 2**64 (torch's seed range), so every --seed works."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 64))


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


def batch_inputs(run, draws, captions):
    """z0, noise, t and text context on the device, from draw_batch's draws and captions."""
    return (*inputs_on_device(run.data.means, run.data.stds, *draws, run.device), embed(run, captions))


def inputs_on_device(means, stds, rows, view, normal, noise, t, device):
    """z0 (sampled from the cached VAE posterior), noise and t on the device, from draw_inputs' draws."""
    z0 = means[rows, view] + stds[rows, view] * normal.to(device)
    return z0, noise.to(device), t.to(device)


def embed(run, captions):
    """The text context of `captions`: cached, or from the text encoder when it trains."""
    if run.data.text:
        return torch.stack([run.data.text[c] for c in captions])
    return minisd.text.encode_prompts(run.sd.tokenizer, run.sd.text_encoder, captions).to(run.data.base_dtype)


def diffusion_loss(run, z0, noise, t, ctx):
    """Noise-prediction MSE at timesteps t (with optional min-SNR weighting); no random draws, so --cuda-graph
    captures it. cache_enabled=False: autocast's weight cache cannot live across graph replays (same values)."""
    a = run.alphas_cumprod[t][:, None, None, None]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    # fp16: float32 base under autocast. bf16: the base is bf16 already and runs as it is; autocast would only move
    # every GroupNorm and LayerNorm to float32, with a cast on each side (docs/performance.md#training-speed)
    fp16 = run.amp_dtype == torch.float16
    with torch.autocast(run.device.type, run.amp_dtype, enabled=fp16, cache_enabled=False):
        eps = run.model(zt.to(ctx.dtype), t, ctx)
    per_sample = ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if run.args.min_snr_gamma:
        snr = run.snr[t]
        per_sample = per_sample * torch.clamp(snr, max=run.args.min_snr_gamma) / snr
    return per_sample.mean()


def prior_loss(run):
    """The diffusion loss of a batch of --prior-data's class images (DreamBooth's prior preservation)."""
    captions, means, stds = run.data.prior
    rows = torch.randint(len(captions), (run.args.batch,), generator=run.gen)
    draws = draw_inputs(rows, means.shape, run.gen, len(run.alphas_cumprod), run.args)
    z0, noise, t = inputs_on_device(means, stds, *draws, run.device)
    return diffusion_loss(run, z0, noise, t, embed(run, [captions[i][0] for i in rows]))


# ------------------------------------------------------------------------------------------------- the loop

def capture_train_step(run):
    """--cuda-graph: the deterministic part of a step (forward, backward, clipping, AdamW), captured once from zero
    inputs (`gen` is not touched). The graph reads the parameters and buffers where they are now: nothing may
    replace them afterwards. Under torchrun the gradients are averaged by one all-reduce between two graphs."""
    B, latent, means = run.args.batch, run.data.means.shape[2:], run.data.means
    example = (means.new_zeros(B, *latent), means.new_zeros(B, *latent),
               torch.zeros(B, dtype=torch.long, device=run.device), embed(run, run.data.captions[:1] * B))
    average = (lambda g: torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.AVG)) if run.world > 1 else None
    return minisd.fast.TrainStepGraph(functools.partial(diffusion_loss, run), run.opt, example, clip_norm=1.0,
                                      reduce_grads=average)


def train_loop(run, stop):
    """Steps until --steps, each followed by its checkpoint, signal check and samples."""
    args = run.args
    per_step = args.batch * args.grad_accum * run.world  # images
    with tqdm(total=args.steps, initial=run.step, desc="training", disable=args.quiet or run.rank != 0) as bar:
        # each step's first micro-batch is drawn a step ahead (train_step draws the next one)
        batch = draw_batch(run, run.step, 0) if run.step < args.steps else None
        while run.step < args.steps:
            factor = lr_factor(run.step, args)
            loss, batch = train_step(run, batch, factor)
            run.step += 1
            seconds = round(time.time() - run.t0, 2)
            run.history.append((run.step, loss, run.opt.param_groups[0]["initial_lr"] * factor, seconds))
            speed = f"{per_step * bar.n / max(1e-9, time.time() - run.t0):.1f}" if bar.n else "-"
            bar.set_postfix(loss=f"{loss:.4f}", img_s=speed)
            bar.update(1)
            if "first step" not in run.startup:  # after the loss was printed, so the GPU has finished it
                run.startup["first step"] = time.time() - run.t0 - run.startup.get("capture", 0.0)
            after_step(run, stop)


def train_step(run, batch, factor):
    """One optimizer step at learning rate factor `factor`, from `batch` (its first micro-batch, drawn a step ahead).
    Eager: forward and backward of each micro-batch, then clipping and AdamW; graph: all of it in one replay, on the
    same draws. Returns the loss and the next step's first micro-batch."""
    for g in run.opt.param_groups:
        if run.graph:  # a GPU tensor that the captured AdamW step reads: filled in place
            g["lr"].fill_(g["initial_lr"] * factor)
        else:
            g["lr"] = g["initial_lr"] * factor
    if run.graph:
        loss = run.graph(*batch_inputs(run, *batch))  # launched, not waited for
    else:
        loss = forward_backward(run, batch)
    # The next step's CPU draws, before waiting for the loss: with --cuda-graph the GPU still runs this step. A
    # checkpoint saved after this step keeps `gen`'s state from before them: a run resumed from it draws them again.
    run.rng_state = run.gen.get_state()
    next_batch = draw_batch(run, run.step + 1, 0) if run.step + 1 < run.args.steps else None
    loss = loss.item() if run.graph else loss
    stop_on_nonfinite(run, loss)
    if not run.graph:
        optimizer_step(run)
    return loss, next_batch


def lr_factor(step, args):
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return {"constant": 1.0, "linear": 1.0 - progress,
            "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[args.schedule]


def forward_backward(run, batch):
    """The eager step's forward and backward passes, over --grad-accum micro-batches (the first is `batch`, the
    others drawn here), each with the prior-preservation loss if any; returns the mean loss (a float)."""
    args, total = run.args, 0.0
    for micro in range(args.grad_accum):
        if micro:
            batch = draw_batch(run, run.step, micro)
        loss = diffusion_loss(run, *batch_inputs(run, *batch))
        if run.data.prior is not None:
            loss = loss + args.prior_weight * prior_loss(run)
        run.scaler.scale(loss / args.grad_accum).backward()
        total += loss.item() / args.grad_accum
    return total


def optimizer_step(run):
    """The eager step's end: gradients averaged across processes, unscaled, clipped to norm 1, AdamW."""
    if run.world > 1 and run.te_params:  # DDP averages the U-Net's gradients; the text encoder's are averaged here
        for p in run.te_params:
            torch.distributed.all_reduce(p.grad)  # a sum (gloo has no average)
            p.grad /= run.world
    run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)


def stop_on_nonfinite(run, loss):
    """A NaN or infinite loss ends the run before the optimizer takes it, naming the last checkpoint saved from
    weights that gave a finite loss; the checkpoint of this step's weights is set aside (`.nonfinite`)."""
    if math.isfinite(loss):
        return
    step, out = run.step, run.out
    for suffix in (".safetensors", ".state.pt") if run.rank == 0 else ():
        bad = out.with_name(f"{out.stem}-step{step:06d}{suffix}")
        if bad.exists():  # saved from the weights that gave this loss: not one to resume from
            bad.replace(bad.with_name(bad.name + ".nonfinite"))
    good = [p for p in state_files(out) if step_of(p) < step]
    where = f"; the last good checkpoint is {good[-1]}" if good else ""
    raise RunError(f"loss is {loss} at step {step}: stopping (try a lower --lr or --mixed-precision bf16){where}")


def after_step(run, stop):
    """A checkpoint every --save-every steps; on a signal, a checkpoint and the end of the run; samples every
    --sample-every steps."""
    args, step, main_process = run.args, run.step, run.rank == 0
    saved = None
    if main_process and args.save_every and step % args.save_every == 0 and step < args.steps:
        saved = save_checkpoint(run)
    if stop and stop.signal:
        saved = saved or save_checkpoint(run)
        raise Stopped(f"{signal.Signals(stop.signal).name} at step {step}: saved {saved}; to continue, run the same "
                      f"command with --resume")
    if main_process and run.prompts and args.sample_every and step % args.sample_every == 0:
        render_samples(run)


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


# --------------------------------------------------------------------------------------------------- finish

def finish(run):
    """Rank 0 at the end: the last samples, the adapter, the loss log and plot, and one line of summary."""
    args = run.args
    if run.prompts and (not args.sample_every or run.step % args.sample_every):
        render_samples(run)
    save_adapter(run)
    with one_line_errors(OSError, args.debug):
        write_log(run.history, run.out)
    took, per_step = time.time() - run.t0, args.batch * args.grad_accum * run.world
    here = run.step - run.resumed_at  # the steps this process ran, which `took` times
    print(f"trained {run.step} steps" + (f", {here} after the resume at {run.resumed_at}," if run.resumed_at else "")
          + f" ({per_step} images each) in {took:.0f}s, {per_step * here / max(took, 1e-9):.1f} images/s; "
          f"final loss {np.mean([h[1] for h in run.history[-20:]]):.4f}; wrote {run.out}")
    if "first step" in run.startup:  # what a user waits for before training starts (the imports are not counted)
        print(f"start-up {sum(run.startup.values()):.1f}s to the end of the first step: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in run.startup.items()))


def adapter_metadata(run, n_images, size):
    """kohya's ss_* training settings and the base U-Net's hash (a sha256 over every base weight, seconds for SD
    1.4): computed at a run's first save only, since the base does not change while the adapter trains, and cached
    across runs (minisd.hashes: by the checkpoint's U-Net file, its size and modification time, and the dtype)."""
    if run.base_hash is None:
        kind = f"base-unet-sha256 {str(run.sd.dtype).removeprefix('torch.')}"
        compute = lambda _: lora.formats.unet_hash(run.sd.unet)
        run.base_hash = minisd.hashes.cached(minisd.hashes.unet_file(run.args.ckpt), kind, compute,
                                             minisd.hashes.default_cache())
    return {**kohya_args(run.args, n_images, size, run.step), "minisd_base_unet_sha256": run.base_hash}


def save_adapter(run):
    """The trained adapter at --out; on a full disk a checkpoint instead, if one fits, and one line saying so."""
    metadata = adapter_metadata(run, len(run.data.captions), run.size)
    try:
        atomic_save(lambda p: lora.save(p, run.sd.unet, run.sd.text_encoder, ADAPTER, metadata=metadata),
                    run.out)
    except OSError as e:  # a full disk: keep the run if a checkpoint still fits
        try:
            saved = f"saved {save_checkpoint(run)} instead: run the same command with --resume to write {run.out.name}"
        except RunError as no:
            saved = f"no checkpoint either ({no})"
        raise RunError(f"{e}; {saved}") from e


def save_checkpoint(run):
    """The adapter as it is now, and the state that resumes the run exactly (optimizer, scaler, RNG, history, and
    the settings of RESUME_SETTINGS), as a pair: if the state cannot be written, the adapter is removed again."""
    args, step, out = run.args, run.step, run.out
    adapter = out.with_name(f"{out.stem}-step{step:06d}.safetensors")
    state = {"step": step, "optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict(), "rng": run.rng_state,
             "history": [list(h) for h in run.history], "settings": run_settings(args),
             "adapter": {k: p.detach().cpu() for k, p in adapter_parameters(run.sd).items()}}
    path = out.with_name(f"{out.stem}-step{step:06d}.state.pt")
    try:
        meta = adapter_metadata(run, 0, 0)
        atomic_save(lambda p: lora.save(p, run.sd.unet, run.sd.text_encoder, ADAPTER, metadata=meta), adapter)
        atomic_save(lambda p: torch.save(state, p), path)
    except OSError as e:
        adapter.unlink(missing_ok=True)
        good = [p for p in state_files(out) if p != path]
        raise RunError(f"{e}; the last checkpoint is {good[-1] if good else 'none'}") from e
    return path


@torch.no_grad()
def render_samples(run):
    """The sample prompts rendered with the adapter as it is now: a grid at <out stem>-samples/step<N>.png."""
    sd, args, out = run.sd, run.args, run.out
    sd.unet.eval()
    images = to_pil(sd.sample(run.prompts, steps=args.sample_steps, guidance=7.5, seed=args.seed, progress=False))
    sd.unet.train()
    folder = out.with_name(f"{out.stem}-samples")
    with one_line_errors(OSError, args.debug):
        folder.mkdir(exist_ok=True)
        save_png(grid(images, min(4, len(images))), folder / f"step{run.step:06d}.png")


def kohya_args(args, n_images, size, step):
    """Training settings in kohya's ss_* metadata names (strings)."""
    return {"ss_learning_rate": str(args.lr), "ss_text_encoder_lr": str(args.te_lr or args.lr),
            "ss_unet_lr": str(args.lr), "ss_max_train_steps": str(args.steps), "ss_steps": str(step),
            "ss_batch_size_per_device": str(args.batch), "ss_gradient_accumulation_steps": str(args.grad_accum),
            "ss_lr_scheduler": args.schedule, "ss_lr_warmup_steps": str(args.warmup),
            "ss_mixed_precision": args.mixed_precision, "ss_seed": str(args.seed),
            "ss_num_train_images": str(n_images), "ss_resolution": f"({size}, {size})",
            "ss_min_snr_gamma": str(args.min_snr_gamma), "ss_noise_offset": str(args.noise_offset),
            "ss_sd_model_name": Path(args.ckpt).name, "minisd_blocks_spec": str(args.blocks), "minisd_algo": args.algo,
            "ss_training_comment": "minisd train.py"}


def write_log(history, out):
    rows = "step,loss,lr,seconds\n" + "".join(f"{s},{l:.6f},{lr:.3g},{t}\n" for s, l, lr, t in history)
    atomic_save(lambda p: p.write_text(rows), out.with_name(f"{out.stem}-loss.csv"))
    atomic_save(lambda p: loss_plot(history, p), out.with_name(f"{out.stem}-loss.png"))


def loss_plot(rows, path, width=640, height=240):
    """A small line plot of the loss (and its running mean), drawn with PIL."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    losses = np.array([r[1] for r in rows])
    if len(losses) > 1:
        smooth = np.convolve(losses, np.ones(min(20, len(losses))) / min(20, len(losses)), mode="valid")
        lo, hi = float(losses.min()), float(np.percentile(losses, 98)) + 1e-8

        def xy(i, v, n):
            return 40 + i * (width - 50) / max(1, n - 1), height - 20 - (min(v, hi) - lo) / (hi - lo) * (height - 40)
        d.line([xy(i, v, len(losses)) for i, v in enumerate(losses)], fill=(180, 200, 240))
        d.line([xy(i + len(losses) - len(smooth), v, len(losses)) for i, v in enumerate(smooth)], fill=(20, 60, 180),
               width=2)
        d.text((4, 4), f"loss {hi:.3g}", fill="black")
        d.text((4, height - 16), f"{lo:.3g}   step 0 .. {rows[-1][0]}", fill="black")
    im.save(path, format="PNG")


if __name__ == "__main__":
    main()
