"""The gates before any claim about block-wise LoRA in the tiny world (measured, reported, and required by the
experiments before they draw a conclusion):

  G1  an identity-only adapter reads as the identity in >= 90 % of the evaluation prompts (style word included);
  G2  a style-only adapter reads as the style in >= 90 % of style prompts, for every block subset it is trained on;
  G3  VAE round trips of ground-truth identity-in-style renders read "both" >= 95 % (the generator's ceiling);
  G4  identity + style adapters, both on all blocks, read "both" in 20-70 % (room for conflict to show either way).

    python experiments/gates.py --device cuda            # one GPU, about a minute
    python experiments/gates.py --n 32 --device cpu      # 2-core CPU, about 10 minutes
    python experiments/gates.py --style-weights 0.25,0.5,0.75   # and identity + style(all) at weaker styles
    python experiments/gates.py --style bricks/6 --out out/gates_bricks-6   # another held-out pair
    python experiments/gates.py --style bricks/6 --subset-steps 12800 --out out/gates_bricks-6   # the claim study's

Writes <out>/gates.json (every image's scores, the recipe, the verdicts) and one grid per setting.
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
from tinyworld.evaluate import (IDENTITY_RECIPE, STYLE_RECIPE, Setting, check_kept, held_pair, interval,  # noqa: E402
                                 numbers, pair_arguments, pair_data, prompts, rates, recipe_argv, render_setting,
                                 round_trip_both, style_recipe)
from tinyworld.quality import grid  # noqa: E402

TINY = ROOT / "weights" / "tiny"


def train_adapter(data, blocks, out, flags, args):
    argv = recipe_argv(data, blocks, out, flags, args.device, args.seed)
    if out.exists():
        check_kept(out, argv)
    else:
        train.main([*argv, "--quiet"])
    return out


def verdicts(r, ceiling):
    return {"G1 identity-only identity >= 0.90": r["identity only"]["identity"] >= 0.9,
            "G2 style-only style >= 0.90 (all; in0,out3)": min(r["style only (all)"]["style"],
                                                                r["style only (in0,out3)"]["style"]) >= 0.9,
            "G3 VAE round trip both >= 0.95": ceiling >= 0.95,
            "G4 identity + style (all) both in [0.2, 0.7]": 0.2 <= r["identity + style (all)"]["both"] <= 0.7}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gates")
    pair_arguments(p)
    p.add_argument("--identity-flags", default=IDENTITY_RECIPE, help="train.py flags of the identity adapter")
    p.add_argument("--style-flags", default=STYLE_RECIPE, help="train.py flags of the style adapters")
    p.add_argument("--subset-steps", type=int, default=None, help="training steps of the in0,out3 style adapter "
                   "(default: --style-flags' own; experiments/blockwise.py takes the same flag for every block subset)")
    p.add_argument("--n", type=int, default=64, help="evaluation prompts per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style-weights", type=numbers, default=[], help="comma-separated global weights of the "
                   "all-block style adapter next to the identity: extra rows (e.g. 0.25,0.5,0.75) for G4 at a weaker "
                   "style; no verdict reads them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    identity_id, style_id = held_pair(p, args.identity, args.style)
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = lambda split, blocks: (args.identity_flags if split == "identity"
                                   else style_recipe(blocks, args.style_flags, args.subset_steps))
    data = pair_data(identity_id, style_id, out)
    a = lambda split, blocks: train_adapter(data[split], blocks,
                                            out / f"{split}_{blocks.replace(',', '_')}.safetensors",
                                            flags(split, blocks), args)
    identity, style_all, style_bw = a("identity", "all"), a("style", "all"), a("style", "in0,out3")
    sd = minisd.load(TINY, device=args.device)
    judge = judges.load(TINY / "judge.safetensors", device=args.device)
    combo, _ = prompts("combo", args.n, 1000 + args.seed, identity_id, style_id)
    styled, _ = prompts("style", args.n, 2000 + args.seed, identity_id, style_id)
    settings = [(Setting("identity only", ((identity, None),)), combo),
                (Setting("style only (all)", ((style_all, None),)), styled),
                (Setting("style only (in0,out3)", ((style_bw, None),)), styled),
                (Setting("identity + style (all)", ((identity, None), (style_all, None))), combo),
                (Setting("identity + style (in0,out3)", ((identity, None), (style_bw, None))), combo)]
    settings += [(Setting(f"identity + style (all) x{w:g}", ((identity, None), (style_all, None, w))), combo)
                 for w in args.style_weights]
    results, images = {}, {}
    for setting, captions in settings:
        x = render_setting(sd, setting, captions, seed=args.seed)
        r, s = rates(judge, x, identity_id, style_id)
        r["both 95% interval"] = interval(s["both"])
        r["per image"] = {k: s[k].tolist() for k in ("identity", "style", "identity_sim", "style_sim")}
        results[setting.title], images[setting.title] = r, x
        grid(x, 8).save(out / f"{setting.title.replace(' ', '_').replace('(', '').replace(')', '')}.png")
        print(f"{setting.title:30s} identity {r['identity']:.2f}  style {r['style']:.2f}  both {r['both']:.2f}",
              flush=True)
    ceiling = round_trip_both(judge, sd.vae.float(), identity=identity_id, style=style_id)
    report = {"recipe": {**vars(args), "style": style_id.name}, "vae round trip both": ceiling, "settings": results,
              "gates": verdicts(results, ceiling), "seconds": round(time.time() - t0),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    (out / "gates.json").write_text(json.dumps(report, indent=1))
    for gate, ok in report["gates"].items():
        print(f"{'met    ' if ok else 'NOT MET'} {gate}")
    print(f"VAE round trip both: {ceiling:.2f}; {time.time() - t0:.0f}s; wrote {out / 'gates.json'}")


if __name__ == "__main__":
    main()
