"""How well minisd-tiny draws what it is asked for: generate images for base captions (held-in concepts) and let the
judge read back subject, style family and background; the judges' validation on the base model's own generations.

    python -m tinyworld.quality --n 64            # prints the accuracy table, writes out/quality.json and a grid
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import minisd
from minisd.images import grid as pil_grid, to_pil
from . import judge as judges
from .world import dataset

ROOT = Path(__file__).resolve().parent.parent


def grid(images, cols):
    """(B, 3, H, W) in [0, 1] -> one PIL image, cols images a row."""
    return pil_grid(to_pil(images), cols)


def generate(sd, captions, seed, steps=30, guidance=5.0, batch=32):
    return torch.cat([sd.sample(captions[i:i + batch], steps=steps, guidance=guidance, seed=seed + i, progress=False)
                      for i in range(0, len(captions), batch)])


def generated_accuracy(sd, judge, n=64, seed=4321, steps=30, guidance=5.0):
    """{reading: accuracy} of the judge's heads on images generated for n random base-split captions."""
    scenes = [scene for _, _, scene in dataset(n, seed, "base")]
    images = generate(sd, [s.caption() for s in scenes], seed, steps, guidance)
    if judge is None:
        return {}, images
    read = judges.score(judge, images, judges.HELD_MEMBERS[0], judges.HELD_STYLES[0])["read"]
    truth = {"subject": [s.subject for s in scenes], "family": [s.style.family for s in scenes],
             "background": [s.background for s in scenes], "colour": [s.colour for s in scenes]}
    acc = {k: float(np.mean([p == t for p, t in zip(read[k], truth[k])])) for k in truth}
    acc["subject+family"] = float(np.mean([read["subject"][i] == s.subject and read["family"][i] == s.style.family
                                           for i, s in enumerate(scenes)]))
    return acc, images


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "tiny"))
    p.add_argument("--judge", default=str(ROOT / "weights" / "tiny" / "judge.safetensors"), help="'' for none")
    p.add_argument("--n", type=int, default=64, help="number of generated images")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/quality.json")
    args = p.parse_args()
    t0 = time.time()
    sd = minisd.load(args.ckpt, device=args.device)
    judge = judges.load(args.judge, device=args.device) if args.judge else None
    acc, images = generated_accuracy(sd, judge, args.n, steps=args.steps, guidance=args.guidance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "steps": args.steps, "guidance": args.guidance, "accuracy": acc}, indent=1))
    grid(images, 8).save(out.with_suffix(".png"))
    for k, v in acc.items():
        print(f"{k:16s} {v:6.1%}")
    print(f"{args.n} images in {time.time() - t0:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
