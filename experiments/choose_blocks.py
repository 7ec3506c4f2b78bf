"""Choose the blocks of a style adapter from your own adapters and images (lora/choose.py has the math).

    python experiments/choose_blocks.py --ckpt sd-v1-4.ckpt --tokenizer openai/clip-vit-large-patch14 \\
        --identity id.safetensors --style style_all.safetensors --identity-data photos/ --style-data paintings/ \\
        --method ablation --budget 0.25 --rank 8 --algo locon --out table.json
    python train.py --data paintings/ --blocks table.json --algo locon ...   # the style adapter on the chosen blocks

Methods: ablation (both adapter files and both image folders: the denoising loss with the style adapter's blocks
switched one at a time), weights (both adapter files only), fisher (the base model and both image folders only),
probe (the base model and --pairs: counterfactual images, the same scenes with and without the style and with
another subject; the tiny world renders them: tinyworld.world.write_pairs).
--style must be a style adapter trained on all blocks. --budget: adapter parameters (a number > 1) or a fraction of
the all-block adapter's (<= 1). Prints every block's score and parameters and the chosen --blocks string; --out
writes the rank-table file train.py --blocks reads (.json), with the scores beside it (<out stem>.scores.json).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
import lora.choose as choose  # noqa: E402
import minisd  # noqa: E402
from minisd.files import atomic_save  # noqa: E402
import train  # noqa: E402
from tinyworld.world import PAIR_PARTS  # noqa: E402  --pairs' folders: the layout write_pairs writes

NEEDS = {"ablation": ("identity", "style", "identity_data", "style_data"), "weights": ("identity", "style"),
         "fisher": ("identity_data", "style_data"), "probe": ("pairs",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "tiny"), help="base model (default: minisd-tiny)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or hub name, for single files")
    p.add_argument("--identity", help="identity adapter file (all blocks)")
    p.add_argument("--style", help="style adapter file trained on all blocks")
    p.add_argument("--identity-data", help="identity image folder (train.py's --data layout)")
    p.add_argument("--style-data", help="style image folder")
    p.add_argument("--identity-prompt", default=None, help="caption of identity images without a .txt file")
    p.add_argument("--style-prompt", default=None, help="caption of style images without a .txt file")
    p.add_argument("--pairs", help="probe: a folder of scene/ (images in the style, with captions), without_style/ "
                   "and other_subject/ (the same scenes, same file names)")
    p.add_argument("--method", choices=sorted(NEEDS), default="weights")
    p.add_argument("--budget", default="0.25", help="parameters (> 1) or a fraction (<= 1) of the all-block adapter's")
    p.add_argument("--rank", type=int, default=8, help="the rank the style adapter will be trained at")
    p.add_argument("--algo", choices=sorted(choose.ALGOS), default="lora", help="as train.py --algo")
    p.add_argument("--images", type=int, default=None,
                   help="at most this many images of each folder (default: 16 on a GPU, 4 on a CPU; probe: 16)")
    p.add_argument("--draws", type=int, default=None,
                   help="(noise, timestep) draws per image (default: 4 on a GPU, 1 on a CPU; probe: 4)")
    p.add_argument("--harm-weight", type=float, default=1.0, help="ablation: weight of the identity harm")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="rank-table file to write (.json)")
    args = p.parse_args(argv)
    # ablation on a CPU: 16 images x 4 draws took over 15 min for minisd-tiny; the probe (3 forwards a draw) 10 s
    few = str(args.device).startswith("cpu") and args.method != "probe"
    args.images = args.images if args.images is not None else 4 if few else 16
    args.draws = args.draws if args.draws is not None else 1 if few else 4
    return args


def check_args(args):
    """Every bad flag or missing file as one ValueError naming it, before the model is loaded."""
    for name in NEEDS[args.method]:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value is None:
            raise ValueError(f"{flag} is needed by --method {args.method}")
        if name.endswith("data") and not Path(value).is_dir():
            raise ValueError(f"{flag} {value}: no such folder")
        if name == "pairs" and not all((Path(value) / part).is_dir() for part in PAIR_PARTS):
            raise ValueError(f"{flag} {value}: needs the folders {', '.join(PAIR_PARTS)}")
        if name in ("identity", "style") and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    try:
        budget = float(args.budget)
    except ValueError:
        raise ValueError(f"--budget {args.budget}: not a number (parameters, or a fraction <= 1)") from None
    if not budget > 0 or args.rank < 1 or args.images < 1 or args.draws < 1:
        raise ValueError("--budget, --rank, --images and --draws must be > 0")
    if args.out and not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: the rank-table file is written as .json")


@torch.no_grad()
def folder_latents(sd, folder, prompt, flag, args):
    """A folder's image file names, and the VAE latent means (N, 4, h, w) and captions of its first --images images;
    a bad folder or caption stops in one line naming `flag` and the folder (an unreadable image is skipped)."""
    try:
        items = train.find_images(folder, prompt)
        captions, means, _ = train.cache_latents(sd, items[:args.images], args.resolution or sd.native_size, False,
                                                 sd.device, True)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{flag} {folder}: {e}") from None
    return [path.name for path, _, _ in items], means[:, 0], [c for c, _ in captions]


@torch.no_grad()
def image_draws(sd, folder, prompt, flag, args):
    """A folder's first --images images -> choose.make_draws of their VAE latents and caption embeddings."""
    _, means, captions = folder_latents(sd, folder, prompt, flag, args)
    return choose.make_draws(means, sd.encode_prompt(captions), args.draws, args.seed, len(sd.schedule.alphas_cumprod))


@torch.no_grad()
def pair_draws(sd, folder, args):
    """--pairs -> [choose.make_draws] of scene/, without_style/ and other_subject/ (their first --images files), each
    with the scenes' captions and the same seed: the three share noise, timesteps and context."""
    # captions come from scene/*.txt; the other folders' are not used
    parts = {part: folder_latents(sd, Path(folder) / part, None if part == "scene" else "-", "--pairs", args)
             for part in PAIR_PARTS}
    names, _, captions = parts["scene"]
    for part, (part_names, _, part_captions) in parts.items():
        if part_names != names:
            raise ValueError(f"--pairs {Path(folder) / part}: not the same file names as {Path(folder) / 'scene'}")
        if len(part_captions) != min(len(names), args.images):
            raise ValueError(f"--pairs {Path(folder) / part}: an image could not be read")
    context, T = sd.encode_prompt(captions), len(sd.schedule.alphas_cumprod)
    return [choose.make_draws(parts[part][1], context, args.draws, args.seed, T) for part in PAIR_PARTS]


def block_scores(sd, method, params, args, id_draws=None, style_draws=None):
    """(scores, details) of one method on sd (left as it was)."""
    if method == "probe":
        return choose.probe_scores(sd.unet, sd.schedule.alphas_cumprod, *pair_draws(sd, args.pairs, args), params)
    if method == "weights":
        return choose.weight_scores(sd.unet, args.identity, args.style, params, sd.text_encoder)
    ac = sd.schedule.alphas_cumprod
    if method == "fisher":
        return choose.fisher_scores(sd.unet, ac, style_draws, id_draws, params, args.algo)
    lora.load(args.identity, sd.unet, sd.text_encoder, name="identity")
    try:
        lora.load(args.style, sd.unet, sd.text_encoder, name="style")
        lora.network.use_fused(sd.unet, sd.device.type == "cuda")  # the plain composition is faster on a CPU (train.py)
        try:
            return choose.ablation_scores(sd.unet, ac, style_draws, id_draws, params, harm_weight=args.harm_weight)
        finally:
            lora.remove(sd.unet, "style", sd.text_encoder)
    finally:
        lora.remove(sd.unet, "identity", sd.text_encoder)


def run(args, sd=None):
    """-> {"method", "params", "scores", "details", "blocks", "spec", "budget"}; writes --out if given."""
    check_args(args)
    sd = sd or minisd.load(args.ckpt, device=args.device, tokenizer=args.tokenizer)
    torch.set_flush_denormal(True)  # small activations otherwise hit slow denormal arithmetic on a CPU
    params = choose.block_parameters(sd.unet, args.rank, args.algo)
    draws = {}
    if args.method in ("ablation", "fisher"):
        draws = {"id_draws": image_draws(sd, args.identity_data, args.identity_prompt, "--identity-data", args),
                 "style_draws": image_draws(sd, args.style_data, args.style_prompt, "--style-data", args)}
    scores, details = block_scores(sd, args.method, params, args, **draws)
    blocks, spec = choose.choose_blocks(scores, params, args.budget, args.rank)
    result = {"method": args.method, "params": params, "scores": scores, "details": details, "blocks": blocks,
              "spec": spec, "budget": choose.resolve_budget(args.budget, params)}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(lambda p: p.write_text(json.dumps({"dims": spec}) + "\n"), out)  # a rank-table file (lora.ranks)
        atomic_save(lambda p: p.write_text(json.dumps(result, indent=1)), out.with_suffix(".scores.json"))
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        r = run(args)
    except (ValueError, FileNotFoundError, KeyError, minisd.CheckpointError) as e:
        sys.exit(f"error: {e}")
    se = r["details"].get("se", {})  # ablation's standard errors over the draws
    print(f"{'block':6s} {'score':>10s}{'± se' if se else '':>8s} {'params':>10s}")
    for b in choose.COARSE:
        score = f"{r['scores'][b]:10.4g}" if b in r["scores"] else f"{'-':>10s}"
        error = (f"{se[b]:8.2g}" if b in se else f"{'':8s}") if se else ""
        print(f"{b:6s} {score}{error} {r['params'][b]:10d}{'  *' if b in r['blocks'] else ''}")
    used = sum(r["params"][b] for b in r["blocks"])
    if args.method == "ablation" and r["details"]["B"] <= 0:
        print(f"warning: the style adapter does not lower the denoising loss on --style-data (B = "
              f"{r['details']['B']:.3g}): the ablation scores mean little")
    unsettled = [b for b in se if abs(r["scores"][b]) < 2 * se[b]]
    if unsettled:
        print(f"within two standard errors of 0 (more --images or --draws would settle them): {', '.join(unsettled)}")
    print(f"chosen ({used} of {r['budget']:.0f} parameters): --blocks {r['spec']}"
          + (f"  (or --blocks {args.out})" if args.out else ""))


if __name__ == "__main__":
    main()
