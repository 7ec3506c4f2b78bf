"""The main job: block-wise LoRA on minisd-tiny, shown in one labelled grid, on a CPU in about a minute.

    python demo.py              # the shipped adapters -> out/demo/grid.png
    python demo.py --train      # train the three adapters first (one GPU: about 2 minutes; a 2-core CPU: an hour)

The adapters (weights/tiny/adapters, trained with --train's recipe, tinyworld.evaluate.IDENTITY_RECIPE/STYLE_RECIPE):
1. an identity adapter (the held-out character member "sks", 48 images in several base styles) on all blocks;
2. a style adapter (the held-out style "zwx", rings, 16 images of other subjects) on all blocks;
3. the same style adapter trained block-wise, only on the paper's upper blocks in0 + out3.
Then "the sks character in zwx style" with the identity alone, the style alone (all blocks), identity + style (all
blocks) and identity + style (in0, out3), side by side, scored by the world's judges (tinyworld/judge.py: is it the
member? is it the style?).
"""
import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import minisd
from minisd.images import save_png, to_pil
import train
from tinyworld import judge as judges
from tinyworld.evaluate import IDENTITY_RECIPE, STYLE_RECIPE, Setting, rates, recipe_argv, render_setting

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "weights" / "tiny"
PROMPTS = ["a large yellow sks character on a gray background, zwx style",
           "a large white sks character on a blue background, zwx style",
           "a large pink sks character on a black background, zwx style",
           "a large teal sks character on a white background, zwx style"]


ADAPTERS = {"identity": ("identity", "all"), "style_all": ("style", "all"), "style_in0_out3": ("style", "in0,out3")}


def adapter_files(args):
    """{name: file}: the shipped adapters, or with --train the same recipe trained again into --out."""
    if not args.train:
        return {name: TINY / "adapters" / f"{name}.safetensors" for name in ADAPTERS}
    recipe = {"identity": IDENTITY_RECIPE, "style": STYLE_RECIPE}
    files = {}
    for name, (data, blocks) in ADAPTERS.items():
        files[name] = Path(args.out) / f"{name}.safetensors"
        train.main(recipe_argv(ROOT / "data" / data, blocks, files[name], recipe[data], args.device))
    return files


def labelled_grid(columns, scores, path):
    """columns: {title: (B, 3, 64, 64)} -> one image, a column per setting, with its title and scores above."""
    cell, head = 128, 44
    sheet = Image.new("RGB", (cell * len(columns), head + cell * len(next(iter(columns.values())))), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (title, images) in enumerate(columns.items()):
        draw.text((c * cell + 4, 2), title, fill="black")
        draw.text((c * cell + 4, 16), f"identity {scores[title][0]:.0%}", fill=(0, 90, 0))
        draw.text((c * cell + 4, 28), f"style    {scores[title][1]:.0%}", fill=(0, 0, 140))
        for r, im in enumerate(to_pil(images)):
            sheet.paste(im.resize((cell, cell), Image.NEAREST), (c * cell, head + r * cell))
    save_png(sheet, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--train", action="store_true", help="train the adapters (the recipe above) instead of loading them")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a = adapter_files(args)
    torch.set_flush_denormal(True)  # the tiny model's small activations otherwise hit slow denormal arithmetic
    sd = minisd.load(TINY, device=args.device)
    judge = judges.load(TINY / "judge.safetensors", device=args.device)
    settings = [Setting("identity only", ((a["identity"], None),)),
                Setting("style only (all)", ((a["style_all"], None),)),
                Setting("+ style, all blocks", ((a["identity"], None), (a["style_all"], None))),
                Setting("+ style, in0+out3", ((a["identity"], None), (a["style_in0_out3"], None)))]
    columns, scores = {}, {}
    for setting in settings:
        images = render_setting(sd, setting, PROMPTS, args.seed, args.sample_steps, args.guidance)
        r, _ = rates(judge, images)
        columns[setting.title], scores[setting.title] = images, (r["identity"], r["style"])
    labelled_grid(columns, scores, out / "grid.png")
    for title, (ident, style) in scores.items():
        print(f"{title:22s} identity {ident:4.0%}  style {style:4.0%}")
    print(f"wrote {out / 'grid.png'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
