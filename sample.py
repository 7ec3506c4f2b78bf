"""Text-to-image with a Stable Diffusion 1.x checkpoint and any number of LoRA / LoCon adapters.

    python sample.py                                   # minisd-tiny, shipped with the repo
    python sample.py --ckpt sd-v1-4.ckpt --tokenizer openai/clip-vit-large-patch14 --prompt "a photo of a cat"
    python sample.py --lora out/identity.safetensors --lora out/style.safetensors:0.8:OUTD \\
        --prompt "a large sks character on a white background, zwx style" --n 4

--lora FILE[:WEIGHT][:BLOCKS][:start=N][:stop=N]: BLOCKS (or lbw=BLOCKS, as sd-webui-lora-block-weight writes it)
is a lora-block-weight preset (NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL), 17 or 26 comma-separated weights, or
the paper's coarse groups ("in0,out3" or "in0=1,out3=0.5"); start/stop run the adapter's U-Net part only from step
`start` to step `stop` (1-based, stop excluded, as lora-block-weight counts; under CUDA graphs a gate per step
that the graph reads, captured once: minisd.fast.StepGates). The PNG carries each adapter as
webui's tag <lora:name:WEIGHT:lbw=PRESET or 26 values:start=N:stop=N>.
The prompt is read as webui reads it: (word:1.2), (word) = 1.1, [word] = 1/1.1, \\( escapes, BREAK, any length.
--sampler DDIM (default), "DPM++ 2M Karras" or "Euler a": with no adapters the image equals diffusers'
StableDiffusionPipeline with DDIMScheduler, DPMSolverMultistepScheduler(use_karras_sigmas=True) or
EulerAncestralDiscreteScheduler and the same seed.
On CUDA each guided U-Net step is one replay of a CUDA graph (minisd.fast), without Python's kernel-launch
overhead; the same function, but the conv weights go channels_last (other kernels: pixels may differ by rounding).
--eager: the plain PyTorch steps instead. (--cuda-graph, the default on CUDA, is still accepted.)
"""
import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import lora
import minisd
import minisd.fast
from minisd import hashes
from minisd.checkpoint import CheckpointError
from minisd.cli import one_line_errors
from minisd.images import a1111_parameters, grid, save_png, to_pil
from minisd.limits import check_device, require, sampling_bytes

TINY = Path(__file__).resolve().parent / "weights" / "tiny"
# what checking the flags and reading or writing files raise: one line each (CheckpointError is a ValueError)
INPUT_ERRORS = (ValueError, OSError, KeyError)
CHUNK = 8  # images per sampler call: --n 100 runs 13 calls, chunk k seeded with --seed + k (n <= 8: one call)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(TINY),
                   help="LDM single file (.safetensors/.ckpt) or diffusers folder (default: minisd-tiny)")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder or hub name, for single files (default: CLIP's, shipped with minisd)")
    p.add_argument("--prompt", default="a large red star on a blue background, striped style")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="DDIM", help="DDIM, 'DPM++ 2M Karras' or 'Euler a' (webui's names, any case)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size, 512 for SD 1.4)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help=f"images per prompt (saved as a grid and one by one); sampled "
                   f"{CHUNK} at a time, the k-th {CHUNK} with --seed + k")
    p.add_argument("--out", default="out/sample.png", help="PNG file")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT][:BLOCKS][:start=N][:stop=N]",
                   help="an adapter; repeatable")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on GPU, float32 on CPU")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="plain PyTorch steps (default on CUDA: CUDA graphs)")
    mode.add_argument("--cuda-graph", action="store_true", help="replay each U-Net step from a CUDA graph (the default "
                      "on CUDA; CUDA only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


class Lora(NamedTuple):
    path: Path
    weight: float
    blocks: str | None  # a block-weight spec (lora.parse_block_weights); None: all blocks
    start: int | None  # lora-block-weight's step range: the U-Net part runs from step `start` (1-based) ...
    stop: int | None  # ... to step `stop` (excluded)


def parse_lora(spec):
    """'FILE[:WEIGHT][:BLOCKS][:start=N][:stop=N]' -> Lora; BLOCKS may also be written lbw=BLOCKS and the range
    step=A-B, as sd-webui-lora-block-weight reads them (<lora:name:1:lbw=OUTD:start=10:stop=30>)."""
    m = re.fullmatch(r"(.+?\.(?:safetensors|ckpt|pt|bin))((?::[^:]*)*)", spec)
    if not m:
        raise ValueError(f"--lora {spec}: expected FILE.safetensors[:WEIGHT][:BLOCKS][:start=N][:stop=N]")
    keyed, plain = {}, []
    for item in m[2].split(":")[1:]:
        key, eq, value = item.partition("=")
        if eq and key.strip().lower() in ("lbw", "start", "stop", "step"):
            keyed[key.strip().lower()] = value.strip()
        else:
            plain.append(item)
    if "step" in keyed:  # lora-block-weight's step=A-B: start=A, stop=B
        keyed["start"], _, keyed["stop"] = keyed.pop("step").partition("-")
    if len(plain) > 2 or (len(plain) == 2 and "lbw" in keyed):
        raise ValueError(f"--lora {spec}: expected FILE.safetensors[:WEIGHT][:BLOCKS or lbw=BLOCKS][:start=N][:stop=N]")
    try:
        weight = float(plain[0]) if plain and plain[0] else 1.0
    except ValueError:
        raise ValueError(f"--lora {spec}: weight {plain[0]!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"--lora {spec}: weight {weight} is not a finite number")
    blocks = keyed.get("lbw", plain[1] if len(plain) == 2 and plain[1] else None)
    if blocks == "":
        raise ValueError(f"--lora {spec}: lbw= is empty; give a preset (OUTD, ...) or 17 or 26 weights")
    if blocks is not None:
        try:
            values = lora.parse_block_weights(blocks).values()
        except ValueError as e:
            raise ValueError(f"--lora {spec}: lbw={blocks}: {e}") from None
        if not all(map(math.isfinite, values)):
            raise ValueError(f"--lora {spec}: lbw={blocks}: block weights must be finite numbers")
    start, stop = (parse_step(spec, keyed, k) for k in ("start", "stop"))
    if start is not None and stop is not None and start > stop:
        raise ValueError(f"--lora {spec}: start={start} is after stop={stop}")
    return Lora(Path(m[1]), weight, blocks, start, stop)


def parse_step(spec, keyed, key):
    if key not in keyed:
        return None
    if not re.fullmatch(r"\d+", keyed[key]):
        raise ValueError(f"--lora {spec}: {key}={keyed[key]} is not a step number (0, 1, 2, ...)")
    return int(keyed[key])


def lbw_tag(a):
    """The adapter's webui tag: <lora:name:weight[:lbw=BLOCKS][:start=N][:stop=N]>, its blocks as a lora-block-weight
    preset name or its 26 values (BASE, IN00-IN11, M00, OUT00-OUT11), which sd-webui-lora-block-weight reads."""
    tag = f"<lora:{a.path.stem}:{a.weight:g}"
    if a.blocks is not None:
        preset = a.blocks.strip().upper()
        values = ",".join(f"{v:g}" for v in lora.parse_block_weights(a.blocks).values())
        tag += f":lbw={preset if preset in lora.blocks.LBW_PRESETS else values}"
    tag += "".join(f":{k}={v}" for k, v in (("start", a.start), ("stop", a.stop)) if v is not None)
    return tag + ">"


def step_table(names, adapters, steps):
    """{adapter name: [whether it runs at step i] for i < steps} for the adapters with a step range
    (lora.blocks.step_mask: 1-based steps, start included, stop excluded, as lora-block-weight counts them)."""
    return {n: lora.blocks.step_mask(a.start, a.stop, steps)
            for n, a in zip(names, adapters) if a.start is not None or a.stop is not None}


def step_switch(unet, names, adapters, steps):
    """on_step for sample(): each adapter with a step range runs on the U-Net only in its steps (step_table); its
    text-encoder part stays on: the prompt is encoded once, before the first step (as in webui). A
    minisd.fast.StepGates: eagerly it switches the adapters, under CUDA graphs the graph reads a gate per step."""
    table = {n: on for n, on in step_table(names, adapters, steps).items() if lora.network.adapted_layers(unet, name=n)}
    return minisd.fast.StepGates(table, lambda name, on: lora.enable(unet, name, on)) if table else None


def graph_mode(args):
    """sample()'s cuda_graph: False with --eager, True with --cuda-graph, else None (the speed layer on CUDA)."""
    return False if args.eager else args.cuda_graph or None


def check(args):
    """Everything that can be wrong with the flags, before any heavy work."""
    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance must be >= 0 (and finite), got {args.guidance}")
    if not 0 <= args.eta <= 1:  # eta > 1 asks for more noise than the step has: the square root of a negative number
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be a 64-bit number (0 .. 2**64-1), got {args.seed}")
    check_device(args.device)
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise ValueError("--cuda-graph needs a CUDA device")
    try:
        args.sampler = minisd.sampler_named(args.sampler)[0]
    except ValueError as e:
        raise ValueError(f"--sampler: {e}") from None
    if args.eta and args.sampler != "DDIM":
        raise ValueError(f"--eta is DDIM's; --sampler {args.sampler!r} takes none")
    for size in (args.height, args.width):
        if size is not None and (size <= 0 or size % 8):
            raise ValueError(f"--height and --width must be positive multiples of 8, got {size}")
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or folder")
    adapters = [parse_lora(s) for s in args.lora]
    for a in adapters:
        if not a.path.is_file():
            raise FileNotFoundError(f"--lora {a.path}: no such file")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: must be a .png file")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, not after sampling
    if Path(args.out).is_dir() or not os.access(Path(args.out).parent, os.W_OK):
        raise PermissionError(f"--out {args.out}: cannot write a file there")
    return adapters


def png_parameters(args, sd, size, adapters, index=None, seed=None):
    """AUTOMATIC1111's `parameters` text for an image of this run (minisd.images.a1111_parameters)."""
    tags = "".join(" " + lbw_tag(a) for a in adapters)
    fields = {"Steps": args.steps, "Sampler": args.sampler, "CFG scale": f"{args.guidance:g}",
              "Seed": args.seed if seed is None else seed, "Size": f"{size[1]}x{size[0]}",
              "Model hash": hashes.model_hash(args.ckpt), "Model": Path(args.ckpt).stem}
    if args.eta and args.sampler == "DDIM":
        fields["Eta DDIM"] = f"{args.eta:g}"
    if args.n > 1 and index is not None:
        fields.update({"Batch size": args.n, "Batch pos": index})
    if adapters:
        fields["Lora hashes"] = '"' + ", ".join(f"{a.path.stem}: {hashes.lora_hash(a.path)}" for a in adapters) + '"'
    return a1111_parameters(args.prompt + tags, args.negative_prompt, fields)


def check_model(args, sd):
    """The flags that depend on the model: steps within its schedule, sizes its U-Net can halve, memory it has."""
    T = sd.schedule.num_train_timesteps
    if args.steps >= T:  # DDIM's timesteps start at 1: T steps would need timestep T
        raise ValueError(f"--steps must be in 1..{T - 1} for this model's {T}-step schedule, got {args.steps}")
    height, width = args.height or sd.native_size, args.width or sd.native_size
    f = sd.vae.cfg.downscale * 2 ** (len(sd.unet.cfg.channel_mult) - 1)  # VAE and U-Net downsampling together
    if height % f or width % f:
        raise ValueError(f"--height and --width must be multiples of {f} for this model (the VAE's "
                         f"{sd.vae.cfg.downscale}x and the U-Net's {f // sd.vae.cfg.downscale}x downsampling), "
                         f"got {height}x{width}")
    needed = sampling_bytes(sd, min(args.n, CHUNK), height, width, args.guidance > 1) + args.n * 3 * height * width * 2
    require(needed, sd.device, f"--height {height} --width {width} --n {args.n}")  # + the PIL images and the grid


def load_adapters(sd, adapters, dtype):
    """Each --lora as its own adapter; files of the same name (from other folders) get the names a, a_2, a_3."""
    names = []
    for a in adapters:
        stem = lora.formats.name_of(a.path)
        name, i = stem, 1
        while name in names:
            i += 1
            name = f"{stem}_{i}"
        names.append(name)
        lora.load(a.path, sd.unet, sd.text_encoder, name=name, weight=a.weight,
                  block_weights=lora.parse_block_weights(a.blocks) if a.blocks else None, dtype=dtype)
    return names


def main(argv=None):
    """Sample and write the PNGs. A bad flag or file ends the run with one line `error: ...` (--debug: the
    traceback), as does too little memory; an error of the model's own code raises as it is."""
    args = parse_args(argv)
    try:
        images, size, t0 = generate(args)
    except (MemoryError, torch.OutOfMemoryError) as e:
        if args.debug:
            raise
        size = f"--height {args.height} --width {args.width} " if args.height or args.width else ""
        sys.exit(f"error: out of memory at {size}--n {args.n} ({type(e).__name__})")
    print(f"wrote {Path(args.out)} ({len(images)} image{'s' * (len(images) > 1)}, {size[1]}x{size[0]}) in "
          f"{time.time() - t0:.1f}s")


def generate(args):
    """The images of --n, written one by one (n > 1) and as a grid at --out; returns them, their size and the time
    the model began loading."""
    out = Path(args.out)
    with one_line_errors(INPUT_ERRORS, args.debug):
        adapters = check(args)
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    if args.device == "cpu":
        # process-wide: tiny weights and activations otherwise hit slow denormal arithmetic (flushed to 0 instead)
        torch.set_flush_denormal(True)
    t0 = time.time()
    with one_line_errors(CheckpointError, args.debug):  # the file's problems; the model's code raises as it is
        sd = minisd.load(args.ckpt, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
    with one_line_errors(ValueError, args.debug):
        check_model(args, sd)
    with one_line_errors(CheckpointError, args.debug):  # the --lora files
        names = load_adapters(sd, adapters, dtype)
    on_step = step_switch(sd.unet, names, adapters, args.steps)
    images = []
    for k, first in enumerate(range(0, args.n, CHUNK)):
        seed = (args.seed + k) % 2 ** 64 if k else args.seed
        count = min(CHUNK, args.n - first)
        chunk = to_pil(sd.sample(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                                 eta=args.eta, height=args.height, width=args.width, n=count, seed=seed,
                                 cuda_graph=graph_mode(args), sampler=args.sampler, on_step=on_step))
        size = (chunk[0].height, chunk[0].width)
        with one_line_errors(OSError, args.debug):
            for i, im in enumerate(chunk if args.n > 1 else []):
                save_png(im, out.with_name(f"{out.stem}-{first + i:03d}.png"),
                         png_parameters(args, sd, size, adapters, i, seed))
        images += chunk
    sheet = grid(images, min(len(images), 4)) if len(images) > 1 else images[0]
    with one_line_errors(OSError, args.debug):
        save_png(sheet, out, png_parameters(args, sd, size, adapters))
    return images, size, t0


if __name__ == "__main__":
    main()
