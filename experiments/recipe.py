"""The adapter recipe, chosen on a development prompt set only (the gates and the experiments use other seeds).

Each recipe is a set of train.py flags. Identity recipes train an all-block adapter on the identity set and are
scored on development "combo" prompts (the identity in the held-out style, style word included: what G1 asks);
style recipes train an all-block and an in0,out3 adapter on the style set, scored on development style prompts.

    python experiments/recipe.py --device cuda          # one GPU, a few minutes
    python experiments/recipe.py --only identity:v1 --n 8 --device cpu   # plumbing check
    python experiments/recipe.py --style bricks/6 --only style:s1600,style:s3200 --out out/recipe_bricks-6

Writes <out>/recipe.json: per recipe and adapter the rates, similarities and training seconds.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minisd  # noqa: E402
import train  # noqa: E402
from tinyworld import judge as judges  # noqa: E402
from tinyworld.evaluate import (Setting, held_pair, pair_arguments, pair_data, prompts, rates,  # noqa: E402
                                 recipe_argv, render_setting)
from tinyworld.world import write_set  # noqa: E402

TINY = ROOT / "weights" / "tiny"
DEV_SEED = 100  # development prompts and noise; gates.py and blockwise.py draw theirs from 1000 up
RECIPES = [  # (data set, name, train.py flags), in the order they run: a run cut short keeps the first ones
    ("identity", "v1", "--algo locon --rank 8 --lr 5e-3 --steps 200"),
    ("style", "v1", "--algo locon --rank 8 --lr 5e-3 --steps 200"),
    ("identity", "s400", "--algo locon --rank 8 --lr 5e-3 --steps 400"),
    ("identity", "s800", "--algo locon --rank 8 --lr 5e-3 --steps 800"),
    ("identity", "s1600", "--algo locon --rank 8 --lr 5e-3 --steps 1600"),
    ("identity", "lr1e-2", "--algo locon --rank 8 --lr 1e-2 --steps 400"),
    ("identity", "lr1e-2s800", "--algo locon --rank 8 --lr 1e-2 --steps 800"),
    ("identity", "rank16", "--algo locon --rank 16 --lr 5e-3 --steps 800"),
    ("identity", "lora", "--algo lora --rank 8 --lr 5e-3 --steps 800"),
    ("identity", "data48", "--algo locon --rank 8 --lr 5e-3 --steps 800 --data {identity48}"),
    ("identity", "te", "--algo locon --rank 8 --lr 5e-3 --steps 400 --te-rank 4 --te-lr 1e-3"),
    ("identity", "prior", "--algo locon --rank 8 --lr 5e-3 --steps 400 --prior-data {prior} --prior-weight 0.5"),
    ("style", "s400", "--algo locon --rank 8 --lr 5e-3 --steps 400"),
    ("style", "s800", "--algo locon --rank 8 --lr 5e-3 --steps 800"),
    ("style", "s1600", "--algo locon --rank 8 --lr 5e-3 --steps 1600"),
    ("style", "lr1e-2s800", "--algo locon --rank 8 --lr 1e-2 --steps 800"),
    ("style", "rank16", "--algo locon --rank 16 --lr 5e-3 --steps 800"),
    ("style", "lr2e-2s800", "--algo locon --rank 8 --lr 2e-2 --steps 800"),
    ("identity", "d48s1600", "--algo locon --rank 8 --lr 5e-3 --steps 1600 --data {identity48}"),
    ("identity", "d96s1600", "--algo locon --rank 8 --lr 5e-3 --steps 1600 --data {identity96}"),
    ("identity", "d48te", "--algo locon --rank 8 --lr 5e-3 --steps 800 --data {identity48} --te-rank 4 --te-lr 1e-3"),
    ("identity", "d48lr3e-3", "--algo locon --rank 8 --lr 3e-3 --steps 1600 --data {identity48}"),
    ("style", "d48s1600", "--algo locon --rank 8 --lr 5e-3 --steps 1600 --data {style48}"),
    ("style", "r32s1600", "--algo locon --rank 32 --lr 5e-3 --steps 1600"),
    ("style", "lr7e-3s1600", "--algo locon --rank 8 --lr 7e-3 --steps 1600"),
    ("identity", "d96lr3e-3", "--algo locon --rank 8 --lr 3e-3 --steps 1600 --data {identity96}"),
    ("identity", "d96lr2e-3s2400", "--algo locon --rank 8 --lr 2e-3 --steps 2400 --data {identity96}"),
    ("style", "s3200", "--algo locon --rank 8 --lr 5e-3 --steps 3200"),
    ("style", "lr1e-2s1600", "--algo locon --rank 8 --lr 1e-2 --steps 1600"),
    ("style", "r16s3200", "--algo locon --rank 16 --lr 5e-3 --steps 3200"),
    ("style", "s6400", "--algo locon --rank 8 --lr 5e-3 --steps 6400"),
    ("style", "s12800", "--algo locon --rank 8 --lr 5e-3 --steps 12800"),
    ("style", "r16s6400", "--algo locon --rank 16 --lr 5e-3 --steps 6400"),
    ("style", "lr7e-3s6400", "--algo locon --rank 8 --lr 7e-3 --steps 6400"),
    ("style", "constant6400", "--algo locon --rank 8 --lr 5e-3 --steps 6400 --schedule constant"),
    ("style", "d48s6400", "--algo locon --rank 8 --lr 5e-3 --steps 6400 --data {style48}"),
]
# The chosen recipe is tinyworld.evaluate.IDENTITY_RECIPE and STYLE_RECIPE (used by gates.py and demo.py); the
# claim study's style adapters on block subsets train as row s12800 (bricks/6: --subset-steps 12800 in gates.py and
# blockwise.py).



def train_adapter(flags, data, blocks, out, device):
    t0 = time.time()
    train.main([*recipe_argv(data, blocks, out, flags, device), "--quiet"])
    return time.time() - t0


def score(sd, judge, adapter, captions, seed, pair):
    x = render_setting(sd, Setting("dev", ((adapter, None),)), captions, seed)
    r, _ = rates(judge, x, *pair)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/recipe")
    pair_arguments(p)
    p.add_argument("--n", type=int, default=64, help="development prompts per adapter")
    p.add_argument("--only", help="comma-separated recipes, as name or data:name (default: all)")
    p.add_argument("--style-blocks", choices=["both", "all", "in0,out3"], default="both",
                   help="the block sets a style recipe trains (default: all blocks, then in0,out3)")
    p.add_argument("--train-flags", default="", help="train.py flags added to every recipe (e.g. --eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    pair = held_pair(p, args.identity, args.style)
    out, only = Path(args.out), set(args.only.split(",")) if args.only else None
    out.mkdir(parents=True, exist_ok=True)
    data = pair_data(*pair, out)
    more = pair_data(*pair, out, 96, 48)  # more images of the same kind as the recipe's sets (seed 0), written once
    extra = {"prior": out / "prior", "identity48": data["identity"], "identity96": more["identity"],
             "style48": more["style"]}
    write_set(extra["prior"], 64, seed=DEV_SEED + 7, split="base")
    sd = minisd.load(TINY, device=args.device)
    judge = judges.load(TINY / "judge.safetensors", device=args.device)
    combo, _ = prompts("combo", args.n, DEV_SEED, *pair)
    styled, _ = prompts("style", args.n, DEV_SEED + 1, *pair)
    table = {}
    style_sets = ("all", "in0,out3") if args.style_blocks == "both" else (args.style_blocks,)
    jobs = [(split, name, flags, blocks, combo if split == "identity" else styled) for split, name, flags in RECIPES
            for blocks in (("all",) if split == "identity" else style_sets)]
    for split, name, flags, blocks, captions in jobs:
        if only and not {name, f"{split}:{name}"} & only:
            continue
        flags = f"{flags.format(**extra)} {args.train_flags}".strip()
        adapter = out / f"{split}_{name}_{blocks.replace(',', '_')}.safetensors"
        seconds = train_adapter(flags, data[split], blocks, adapter, args.device)
        r = score(sd, judge, adapter, captions, DEV_SEED, pair)
        table[f"{split} {blocks} {name}"] = {"flags": flags, "train seconds": round(seconds, 1), **r}
        print(f"{split:8s} {blocks:8s} {name:9s} identity {r['identity']:.2f} ({r['identity_sim']:.2f})  "
              f"style {r['style']:.2f} ({r['style_sim']:.2f})  {seconds:5.1f}s", flush=True)
        report = {"n": args.n, "dev seed": DEV_SEED, "identity": pair[0], "style": pair[1].name,
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "results": table}
        (out / "recipe.json").write_text(json.dumps(report, indent=1))  # after each recipe: a cut-short run keeps them


if __name__ == "__main__":
    main()
