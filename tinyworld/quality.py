"""How well minisd-tiny draws what it is asked for: generate images for held-in (base) captions and let the
world's classifier read back subject, style, colour and background.

    python -m tinyworld.quality --n 64            # prints the accuracy table, writes out/quality.json and a grid
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import minisd
from . import classify
from .world import dataset

ROOT = Path(__file__).resolve().parent.parent


def generated_accuracy(sd, judge, n=64, seed=4321, steps=30, guidance=5.0, batch=32):
    """{head: accuracy} of the classifier on images generated for n random base-split captions."""
    scenes = [scene for _, _, scene in dataset(n, seed, "base")]
    images = torch.cat([sd.sample([s.caption() for s in scenes[i:i + batch]], steps=steps, guidance=guidance,
                                  seed=seed + i, progress=False) for i in range(0, n, batch)])
    pred = classify.predict(judge, images)
    acc = {k: float(np.mean([p == getattr(s, k) for p, s in zip(pred[k], scenes)])) for k in classify.LABELS}
    acc["subject+style"] = float(np.mean([pred["subject"][i] == s.subject and pred["style"][i] == s.style
                                          for i, s in enumerate(scenes)]))
    return acc, images, scenes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "tiny"))
    p.add_argument("--classifier", default=str(ROOT / "weights" / "tiny" / "classifier.safetensors"))
    p.add_argument("--n", type=int, default=64, help="number of generated images")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/quality.json")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    t0 = time.time()
    sd, judge = minisd.load(args.ckpt, device=args.device), classify.load(args.classifier, device=args.device)
    acc, images, scenes = generated_accuracy(sd, judge, args.n, steps=args.steps, guidance=args.guidance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "steps": args.steps, "guidance": args.guidance, "accuracy": acc}, indent=1))
    from sample import grid, to_pil
    grid(to_pil(images), 8).save(out.with_suffix(".png"))
    for k, v in acc.items():
        print(f"{k:14s} {v:6.1%}")
    print(f"{args.n} images in {time.time() - t0:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
