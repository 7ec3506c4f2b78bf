"""Render prompts with adapters loaded and let the judges score the images: the measurement demo.py, the gates and
the experiments share.

Evaluation prompts are captions of a split for the experiment's identity member and held-out style, drawn with a
seed; the same seed gives the same prompts and the same starting noise for every setting (paired comparisons).
"""
import argparse
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import lora
from . import judge as judges
from .world import HELD_MEMBERS, HELD_STYLE, HELD_STYLES, IDENTITY, dataset, held_style, render, write_set

# The adapter recipe (train.py flags, at --batch 4 --seed 0), chosen on development prompts by experiments/recipe.py
# (docs/world.md): identity on data/identity's 48 images; style on data/style, the same flags for every block set
# unless --subset-steps says otherwise (style_recipe).
# 96 identity images at lr 5e-3 read 0.94 against this one's 0.91 on the development prompts, but a second run of
# that recipe stopped on a NaN loss at step 298 (bf16 on the GPU).
IDENTITY_RECIPE = "--algo locon --rank 8 --lr 3e-3 --steps 1600"
STYLE_RECIPE = "--algo locon --rank 8 --lr 5e-3 --steps 1600"


def style_recipe(blocks, flags=STYLE_RECIPE, subset_steps=None):
    """train.py flags of a style adapter on `blocks`: the recipe, with --steps subset_steps on a proper block subset
    when given (a later flag wins). Fewer blocks learn a style more slowly: on bricks/6's development prompts the
    in0+out3 adapter reads 0.39 at the recipe's 1600 steps and 0.88 at 12800, while the all-block one reads 0.88 at
    1600 and fails past 3200 (docs/world.md)."""
    return f"{flags} --steps {subset_steps}" if subset_steps and blocks != "all" else flags


def recipe_argv(data, blocks, out, flags, device, seed=0):
    """train.py's argv for one adapter of the world: images `data`, block set, output file, recipe flags (a
    recipe's own --data comes later and wins)."""
    return ["--data", str(data), "--blocks", blocks, "--out", str(out), "--batch", "4", "--seed", str(seed),
            "--device", device, *shlex.split(flags)]


def check_kept(path, argv):
    """Stop, in one line, if the kept adapter file `path` was trained with another --steps or --lr than train.py's
    `argv` asks (its kohya ss_* metadata; argparse reads argv, so the last flag wins as in train.py): a file from
    another recipe must not stand in for this one silently."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--steps", type=int)
    flags.add_argument("--lr", type=float)
    want = vars(flags.parse_known_args(argv)[0])
    for name, key, kind in (("steps", "ss_max_train_steps", int), ("lr", "ss_learning_rate", float)):
        if want[name] is not None and key in meta and want[name] != kind(meta[key]):
            raise SystemExit(f"{path}: kept from a run with --{name} {meta[key]}, this one asks {want[name]}; "
                             "delete it or use another --out")


def read_report(path, keys, flag):
    """An experiment script's JSON report (a dict with `keys`), or a stop in one line naming the flag and the file."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{flag} {path}: not a readable JSON report ({e})") from None
    if not isinstance(report, dict) or not all(isinstance(report.get(k), dict) for k in keys):
        raise SystemExit(f"{flag} {path}: not the report this flag takes (it needs {', '.join(keys)})")
    return report


def pair_arguments(parser):
    """--identity ID --style NAME: the held-out pair a script runs with (default: the main pair)."""
    parser.add_argument("--identity", type=int, default=IDENTITY, help=f"held-out member id, one of {HELD_MEMBERS}")
    parser.add_argument("--style", default=HELD_STYLE.name,
                        help="held-out style: " + ", ".join(s.name for s in HELD_STYLES))


def integers(text):
    """"0,1,2" -> [0, 1, 2]: an argparse type (argparse turns a ValueError into one line naming the flag)."""
    return [int(w) for w in text.split(",") if w.strip()]


def numbers(text):
    """"0.25,0.5" -> [0.25, 0.5]: an argparse type, like integers."""
    return [float(w) for w in text.split(",") if w.strip()]


def held_pair(parser, identity, style):
    """(member id, Style) of a --identity ID --style NAME pair, or parser.error naming the flag."""
    if identity not in HELD_MEMBERS:
        parser.error(f"--identity {identity}: not a held-out member; one of {HELD_MEMBERS}")
    held = held_style(style)
    if held is None:
        parser.error(f"--style {style}: not a held-out style; one of {', '.join(s.name for s in HELD_STYLES)}")
    return identity, held


def shipped_adapters(style):
    """weights/tiny/adapters/bricks-6-0: the folder of a held-out style's shipped adapters (demo.py's); the identity
    adapter they pair with, identity.safetensors, is one folder up."""
    return Path(__file__).resolve().parent.parent / "weights" / "tiny" / "adapters" / style.file_name


def pair_data(identity, style, out, n_identity=48, n_style=16):
    """{"identity": folder, "style": folder}: the shipped data/ sets for the main pair at their size, else sets of
    that size written for the pair under out/data (seed 0, as the shipped ones)."""
    root = Path(__file__).resolve().parent.parent
    if identity == IDENTITY and style == HELD_STYLE and (n_identity, n_style) == (48, 16):
        return {"identity": root / "data" / "identity", "style": root / "data" / "style"}
    folders = {}
    for split, n in (("identity", n_identity), ("style", n_style)):
        folders[split] = written_once(Path(out) / "data" / f"{split}_{identity}_{style.file_name}_{n}",
                                      lambda part: write_set(part, n, seed=0, split=split, identity=identity,
                                                             style=style))
    return folders


def written_once(folder, write):
    """folder, after write(part) has filled a folder beside it that is then renamed, unless folder exists already:
    a run cut short leaves no half-written set."""
    if not folder.is_dir():
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        write(part)
        part.rename(folder)
    return folder


@dataclass(frozen=True)
class Setting:
    """Adapters used together: ((file, inference block weights or None[, global weight, default 1]), ...)."""
    title: str
    adapters: tuple


def prompts(split, n, seed, identity=IDENTITY, style=HELD_STYLE):
    """(captions, scenes) of n random scenes of a split ("combo": the identity in the held-out style)."""
    data = dataset(n, seed, split, identity, style)
    return [c for _, c, _ in data], [s for _, _, s in data]


def render_setting(sd, setting, captions, seed, steps=30, guidance=5.0, batch=32):
    """(n, 3, H, W) in [0, 1]: the captions rendered with the setting's adapters loaded; the model is left as it was."""
    names = []
    for i, (path, blocks, *weight) in enumerate(setting.adapters):
        name = f"a{i}_{lora.formats.name_of(path)}"
        lora.load(path, sd.unet, sd.text_encoder, name=name, weight=weight[0] if weight else 1.0,
                  block_weights=blocks or None)
        names.append(name)
    try:
        return torch.cat([sd.sample(captions[i:i + batch], steps=steps, guidance=guidance, seed=seed + i,
                                    progress=False) for i in range(0, len(captions), batch)])
    finally:
        for name in names:
            lora.remove(sd.unet, name, sd.text_encoder)


def rates(judge, images, identity=IDENTITY, style=HELD_STYLE):
    """{identity, style, both: hit rate; identity_sim, style_sim: mean similarity} of generated images."""
    s = judges.score(judge, images, identity, style)
    out = {k: float(s[k].float().mean()) for k in ("identity", "style", "both")}
    out.update({k: float(s[k].mean()) for k in ("identity_sim", "style_sim")})
    return out, s


def round_trip_both(judge, vae, n=128, seed=5, identity=IDENTITY, style=HELD_STYLE):
    """The "both" rate of VAE round-tripped ground-truth renders of the identity in the style: the ceiling a perfect
    generator reaches through this VAE."""
    x = judges.to_tensor([render(s)[0] for s in prompts("combo", n, seed, identity, style)[1]])
    return float(judges.score(judge, judges.round_trip(vae, x), identity, style)["both"].float().mean())


def interval(hits, z=1.96):
    """Wilson 95 % interval of a hit rate (a list or tensor of booleans)."""
    h = np.asarray(hits, float)
    n, p = len(h), h.mean()
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
