"""Text-to-image with a Stable Diffusion 1.x checkpoint and any number of LoRA / LoCon adapters.

    python sample.py                                   # minisd-tiny, shipped with the repo
    python sample.py --ckpt sd-v1-4.ckpt --tokenizer openai/clip-vit-large-patch14 --prompt "a photo of a cat"
    python sample.py --lora out/identity.safetensors --lora out/style.safetensors:0.8:OUTD \\
        --prompt "a large sks character on a white background, zwx style" --n 4

--lora FILE[:WEIGHT[:BLOCKS]]: BLOCKS is a lora-block-weight preset (NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL),
17 or 26 comma-separated weights, or the paper's coarse groups ("in0,out3" or "in0=1,out3=0.5").
With no adapters the image equals diffusers' StableDiffusionPipeline + DDIMScheduler with the same seed.
On CUDA each guided U-Net step is one replay of a CUDA graph (minisd.fast), without Python's kernel-launch
overhead; the same function, but the conv weights go channels_last (other kernels: pixels may differ by rounding).
--eager: the plain PyTorch steps instead. (--cuda-graph, the default on CUDA, is still accepted.)
"""
import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import lora
import minisd

TINY = Path(__file__).resolve().parent / "weights" / "tiny"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(TINY), help="LDM single file (.safetensors/.ckpt) or diffusers folder (default: minisd-tiny)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or hub name, for single files (default: openai/clip-vit-large-patch14 from the local cache)")
    p.add_argument("--prompt", default="a large red star on a blue background, striped style")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size, 512 for SD 1.4)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="images per prompt (saved as a grid and one by one)")
    p.add_argument("--out", default="out/sample.png", help="PNG file")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT[:BLOCKS]]", help="an adapter; repeatable")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: float16 on GPU, float32 on CPU")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="plain PyTorch steps (default on CUDA: CUDA graphs)")
    mode.add_argument("--cuda-graph", action="store_true", help="replay each U-Net step from a CUDA graph (the default "
                      "on CUDA; CUDA only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def parse_lora(spec):
    """'FILE[:WEIGHT[:BLOCKS]]' -> (path, weight, blocks or None)."""
    m = re.fullmatch(r"(.+?\.(?:safetensors|ckpt|pt|bin))(?::([^:]*))?(?::(.+))?", spec)
    if not m:
        raise ValueError(f"--lora {spec}: expected FILE.safetensors[:WEIGHT[:BLOCKS]]")
    try:
        weight = float(m[2]) if m[2] else 1.0
    except ValueError:
        raise ValueError(f"--lora {spec}: weight {m[2]!r} is not a number") from None
    return Path(m[1]), weight, m[3]


def file_hash(path):
    """A1111's model hash: the first 10 hex digits of the file's sha256 (for a folder: of its U-Net weights)."""
    path = Path(path)
    if path.is_dir():
        path = next(p for p in sorted((path / "unet").glob("diffusion_pytorch_model*")))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def check(args):
    """Everything that can be wrong with the flags, before any heavy work."""
    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    if args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise ValueError("--cuda-graph needs a CUDA device")
    for size in (args.height, args.width):
        if size is not None and (size <= 0 or size % 8):
            raise ValueError(f"--height and --width must be positive multiples of 8, got {size}")
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or folder")
    adapters = [parse_lora(s) for s in args.lora]
    for path, _, blocks in adapters:
        if not path.is_file():
            raise FileNotFoundError(f"--lora {path}: no such file")
        if blocks:
            lora.parse_block_weights(blocks)
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: must be a .png file")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, not after sampling
    if Path(args.out).is_dir() or not os.access(Path(args.out).parent, os.W_OK):
        raise PermissionError(f"--out {args.out}: cannot write a file there")
    return adapters


def png_info(args, sd, size, adapters, index=None):
    """AUTOMATIC1111's `parameters` text chunk, so other tools read the settings back."""
    tags = "".join(f" <lora:{p.stem}:{w:g}>" for p, w, _ in adapters)
    fields = {"Steps": args.steps, "Sampler": "DDIM", "CFG scale": f"{args.guidance:g}", "Seed": args.seed,
              "Size": f"{size[1]}x{size[0]}", "Model hash": file_hash(args.ckpt), "Model": Path(args.ckpt).stem}
    if args.eta:
        fields["Eta DDIM"] = f"{args.eta:g}"
    if args.n > 1 and index is not None:
        fields.update({"Batch size": args.n, "Batch pos": index})
    if adapters:
        fields["Lora hashes"] = '"' + ", ".join(f"{p.stem}: {file_hash(p)}" for p, _, _ in adapters) + '"'
        fields["Lora blocks"] = '"' + ", ".join(f"{p.stem}: {b or 'ALL'}" for p, _, b in adapters) + '"'
    text = f"{args.prompt}{tags}\nNegative prompt: {args.negative_prompt}\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())
    info = PngInfo()
    info.add_text("parameters", text)
    return info


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images (rounded like diffusers' numpy_to_pil)."""
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def grid(images, cols):
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def main(argv=None):
    args = parse_args(argv)
    try:
        adapters = check(args)
        dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
        if args.device == "cpu":
            torch.set_flush_denormal(True)  # tiny weights and activations otherwise hit slow denormal arithmetic
        t0 = time.time()
        sd = minisd.load(args.ckpt, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
        for path, weight, blocks in adapters:
            lora.load_kohya(path, sd.unet, sd.text_encoder, weight=weight,
                            block_weights=lora.parse_block_weights(blocks) if blocks else None, dtype=dtype)
        images = to_pil(sd.sample(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance, eta=args.eta,
                                  height=args.height, width=args.width, n=args.n, seed=args.seed,
                                  cuda_graph=False if args.eager else args.cuda_graph or None))
    except (minisd.CheckpointError, ValueError, OSError, KeyError) as e:
        if args.debug:
            raise
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = (images[0].height, images[0].width)
    if len(images) > 1:
        for i, im in enumerate(images):
            im.save(out.with_name(f"{out.stem}-{i:03d}.png"), pnginfo=png_info(args, sd, size, adapters, i))
        grid(images, min(len(images), 4)).save(out, pnginfo=png_info(args, sd, size, adapters))
    else:
        images[0].save(out, pnginfo=png_info(args, sd, size, adapters))
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {size[1]}x{size[0]}) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
