"""The judges against a person's eye on generated images, blind to the setting.

    python experiments/eyecheck.py render            # 200 generated images, shuffled -> out/eyecheck/sheet*.png
    # look at reference.png, then label every image of the sheets in out/eyecheck/labels.txt, one line each:
    #     <number> <identity 0/1> <style 0/1>        e.g. "17 1 0": the identity member, not in rings
    python experiments/eyecheck.py score             # the judge's agreement with the labels -> eyecheck.json
    python experiments/eyecheck.py score --labels docs/eyecheck_labels.txt   # the labels of docs/world.md
    python experiments/eyecheck.py score --second-labels out/eyecheck/labels2.txt   # and a second labeller's
    python experiments/eyecheck.py render --style bricks/6 --adapters out/gates_bricks-6 --out out/eyecheck_bricks-6

`render` draws 40 images from each of the gates' five settings with the shipped adapters of --style
(weights/tiny/adapters/rings-8-0 by default; or a gates.py --out folder's, with --identity/--style its pair), on
prompts and noise of their own (seed 3000), shuffles them and numbers them on sheets of 50; which setting made which
image and what the judge read stay in key.json, for `score` only. reference.png shows, clean: the identity member in
four colours and styles (top row), four members one trait away from it (second row), and base subjects in the
held-out style (third row).
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minisd  # noqa: E402
from minisd.images import to_pil  # noqa: E402
from tinyworld import judge as judges  # noqa: E402
from tinyworld.evaluate import (Setting, held_pair, pair_arguments, prompts, render_setting,  # noqa: E402
                                shipped_adapters)
from tinyworld.world import CHARACTER, Scene, Style, member, render, traits  # noqa: E402

TINY = ROOT / "weights" / "tiny"
SEED, PER_SETTING, PER_SHEET, CELL = 3000, 40, 50, 128


def settings(folder):
    """The gates' five settings with the adapters of `folder`: a gates.py --out folder's (identity_all.safetensors
    beside the style adapters), a blockwise.py claim run's seed folder (adapters/<algo>/seed<s>, where the in0 + out3
    style is style_in0+out3.safetensors), or a shipped style's (the identity adapter one folder up)."""
    a = {name: folder / f"{name}.safetensors" for name in ("identity_all", "style_all", "style_in0_out3")}
    if not a["style_in0_out3"].exists() and (folder / "style_in0+out3.safetensors").exists():
        a["style_in0_out3"] = folder / "style_in0+out3.safetensors"
    a["identity"] = a["identity_all"] if a["identity_all"].exists() else folder.parent / "identity.safetensors"
    return [(Setting("identity only", ((a["identity"], None),)), "combo"),
            (Setting("style only (all)", ((a["style_all"], None),)), "style"),
            (Setting("style only (in0,out3)", ((a["style_in0_out3"], None),)), "style"),
            (Setting("identity + style (all)", ((a["identity"], None), (a["style_all"], None))), "combo"),
            (Setting("identity + style (in0,out3)", ((a["identity"], None), (a["style_in0_out3"], None))), "combo")]


def sheet(images, first):
    """PIL images -> one sheet, 10 a row, each at 2x with its number."""
    cols, rows = 10, -(-len(images) // 10)
    out = Image.new("RGB", (cols * CELL, rows * (CELL + 14)), "white")
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + 14)
        draw.text((x + 4, y + 1), str(first + i), fill="black")
        out.paste(im.resize((CELL, CELL), Image.NEAREST), (x, y + 14))
    return out


def reference(identity, style):
    body, eyes, mouth, top, legs = traits(identity)
    scene = lambda m, colour, style, subject=CHARACTER: Scene(subject, colour, "gray", style, member=m)
    ident = [scene(identity, c, s) for c, s in (("yellow", Style("flat")), ("pink", Style("striped", 8, 45)),
                                                 ("teal", Style("dotted", 8)), ("white", Style("wavy", 8)))]
    near = [member((b, eyes, mouth, top, legs)) for b in ("round", "box")] + [member((body, e, mouth, top, legs))
                                                                            for e in ("one", "two-wide")]
    others = [scene(m, "orange", Style("flat")) for m in near]
    styled = [scene(None, c, style, s) for c, s in (("blue", "heart"), ("green", "star"), ("purple", "circle"),
                                                     ("red", "square"))]
    return sheet([render(s)[0] for s in ident + others + styled], 0)


def render_all(out, device, folder, identity, style):
    sd = minisd.load(TINY, device=device)
    judge = judges.load(TINY / "judge.safetensors", device=device)
    images, key = [], []
    for k, (setting, split) in enumerate(settings(folder)):
        captions, _ = prompts(split, PER_SETTING, SEED + k, identity, style)
        x = render_setting(sd, setting, captions, SEED + k)
        s = judges.score(judge, x, identity, style)
        images += list(x)
        key += [{"setting": setting.title, "caption": c, "judge identity": bool(s["identity"][i]),
                 "judge style": bool(s["style"][i])} for i, c in enumerate(captions)]
    order = list(range(len(images)))
    random.Random(SEED).shuffle(order)
    pil = to_pil(torch.stack(images)[order])
    for n in range(0, len(pil), PER_SHEET):
        sheet(pil[n:n + PER_SHEET], n).save(out / f"sheet{n // PER_SHEET}.png")
    (out / "key.json").write_text(json.dumps([key[i] for i in order], indent=1))
    reference(identity, style).save(out / "reference.png")
    print(f"wrote {len(pil)} images on {-(-len(pil) // PER_SHEET)} sheets, reference.png and key.json to {out}")


def read_labels(path, n):
    """labels.txt -> {number: (identity, style)}; every image labelled once, each label 0 or 1."""
    labels = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit() or not set(parts[1:]) <= {"0", "1"}:
            raise ValueError(f"{path}:{line_no}: expected '<number> <0/1> <0/1>', got {line!r}")
        labels[int(parts[0])] = (parts[1] == "1", parts[2] == "1")
    missing = sorted(set(range(n)) - set(labels))
    if missing or len(labels) != n:
        raise ValueError(f"{path}: {n} images, {len(labels)} labels; missing {missing[:10]}")
    return labels


def agreement(eye, judge):
    """Agreement, Cohen's kappa and the 2x2 table of two lists of booleans."""
    eye, judge = np.asarray(eye, bool), np.asarray(judge, bool)
    table = [[int(np.sum(~eye & ~judge)), int(np.sum(~eye & judge))],
             [int(np.sum(eye & ~judge)), int(np.sum(eye & judge))]]
    p_obs = float(np.mean(eye == judge))
    p_chance = float(eye.mean() * judge.mean() + (1 - eye.mean()) * (1 - judge.mean()))
    kappa = (p_obs - p_chance) / (1 - p_chance) if p_chance < 1 else 1.0
    return {"agreement": p_obs, "kappa": kappa, "table [eye no/yes][judge no/yes]": table}


def label_reads(labels):
    """read_labels' {number: (identity, style)} -> {"identity": [...], "style": [...]} in image order."""
    return {what: [labels[i][k] for i in range(len(labels))] for k, what in enumerate(("identity", "style"))}


def score(out, labels_file, second_labels=None):
    """The judge's agreement with the labels per question, and the rates per setting by eye and by the judge; with
    second_labels (another labeller's, as blind), also the two labellers' agreement with each other."""
    key = json.loads((out / "key.json").read_text())
    by_setting = {}  # setting -> image numbers
    for i, row in enumerate(key):
        by_setting.setdefault(row["setting"], []).append(i)
    eye_reads = label_reads(read_labels(labels_file, len(key)))
    judge_reads = {what: [row[f"judge {what}"] for row in key] for what in ("identity", "style")}
    for reads in (eye_reads, judge_reads):  # "both": the identity in the style, what the claims compare
        reads["both"] = [i and s for i, s in zip(reads["identity"], reads["style"])]
    report = {}
    for what in ("identity", "style", "both"):
        eye, judge = eye_reads[what], judge_reads[what]
        report[what] = agreement(eye, judge)
        report[what]["per setting, eye / judge"] = {
            title: [float(np.mean([eye[i] for i in idx])), float(np.mean([judge[i] for i in idx]))]
            for title, idx in by_setting.items()}
        r = report[what]
        print(f"{what:8s} agreement {r['agreement']:.2f}  kappa {r['kappa']:.2f}  "
              f"{r['table [eye no/yes][judge no/yes]']}")
    if second_labels:
        second = label_reads(read_labels(second_labels, len(key)))
        report["labellers"] = {}
        for what in ("identity", "style"):
            r = report["labellers"][what] = agreement(eye_reads[what], second[what])
            print(f"{what:8s} labeller to labeller: agreement {r['agreement']:.2f}  kappa {r['kappa']:.2f}")
    (out / "eyecheck.json").write_text(json.dumps(report, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["render", "score"])
    p.add_argument("--out", default="out/eyecheck")
    p.add_argument("--labels", help="the labels file (default: <out>/labels.txt)")
    p.add_argument("--second-labels", help="score: a second labeller's labels of the same sheets, to compare")
    p.add_argument("--adapters", help="folder of the adapters to render with: a gates.py --out folder or a "
                   "blockwise.py seed folder (then --identity/--style its pair); default the shipped ones of --style, "
                   "weights/tiny/adapters/<style>")
    pair_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    identity, style = held_pair(p, args.identity, args.style)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.adapters) if args.adapters else shipped_adapters(style)
    if args.step == "score":
        labels = Path(args.labels) if args.labels else out / "labels.txt"
        second = Path(args.second_labels) if args.second_labels else None
        for flag, path in (("--labels", labels), ("--second-labels", second), ("--out", out / "key.json")):
            if path and not path.is_file():
                p.error(f"{flag}: no file {path}" + (" (run render first)" if flag == "--out" else ""))
        score(out, labels, second)
    elif not folder.is_dir():
        p.error(f"--style {style.name}: no shipped adapters ({folder}); pass --adapters a gates.py --out folder")
    else:
        render_all(out, args.device, folder, identity, style)


if __name__ == "__main__":
    main()
