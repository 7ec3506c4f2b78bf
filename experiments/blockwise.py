"""The paper's experiments in miniature (Block-wise LoRA, arXiv 2403.07500), on minisd-tiny, scored by the world's
judges (tinyworld/judge.py) instead of by eye.

    python experiments/blockwise.py --algos locon --steps 100 --lr 5e-3     # CPU: small sweep, one seed: 19 min, below
    python experiments/blockwise.py --sweep full --seeds 0,1,2,3,4,5,6,7 --guidance 5,2,7.5 --workers 2 --cuda-graph
    python experiments/blockwise.py --smoke --out /tmp/blockwise_smoke      # the test suite's plumbing check
    python experiments/blockwise.py --style bricks/6 --gates out/gates_bricks-6/gates.json --out out/bw_bricks-6
    python experiments/blockwise.py ... --seeds 0,1,2,3,4,5,6,7 --kept docs/blockwise/bricks6_results.json  # seed 7

For each adapter algorithm (LoRA, LoCon) and seed: an identity adapter ("sks character", data/identity) on all
blocks; style adapters ("zwx style", data/style) on all blocks and block-wise on subsets of the paper's coarse blocks
{in0..in3, mid, out0..out3} (full sweep: every single block and every in+out pair, the paper's in0+out3 among them;
past --small-seeds seeds, in0+out3 alone, what claims 1-3 read), trained with the world's recipe (tinyworld.evaluate,
the one the gates checked) unless --steps / --lr say otherwise.
Every setting of a seed renders the same "sks character in zwx style" prompts (drawn for that seed) with the same
noise, and is scored:
  identity  the judge reads the identity member              style   it reads the held-out style
  both      both at once in one image                          prompt  it reads the background the prompt asked for
  iou       pixels that differ from the asked background vs the character's true silhouette (position, size, shape)
  identity_sim, style_sim   the judges' similarities (continuous)
Settings: identity alone; style alone; identity + style(all) (the paper's conflict); the same with the style adapter's
blocks weighted at inference (lora-block-weight presets, and its in0+out3 blocks only: block-wise inference); identity
+ style trained block-wise on each subset; full sweep: style alone on each subset and style weights 0.25-1.5 of the
all-block and in0+out3 adapters. The first --guidance renders every setting, the others the claims' settings.
Means over seeds with 95% t-intervals (one seed: over images), and the paper's four claims as paired comparisons with
the protocol's bootstrap, power and verdict (experiments/stats.py, docs/blockwise.md).

On two 2-core CPU machines the first command took 18 min 58 s and 18 min 27 s: 6 LoCon adapters of 100 steps
(49-111 s each), then 13 settings x 16 images rendered and scored.
A demonstration of the pipeline and its report, one seed of weak adapters; not a result.

Writes under --out: adapters/ and evals/ (kept: a rerun skips trained adapters and scored (algo, seed) pairs, and
trains nothing for a scored pair, so --budget-s splits the protocol into runs of any length and evals/ alone carries
it to another machine; a pair is scored as soon as its own adapters are trained, a scoring cut off keeps the
settings it had scored, and a run cut off (--budget-s, or SIGTERM/Ctrl-C: its adapters in training save their step)
reports over the pairs scored so far; --kept FILE writes the evals/ of an earlier results.json made with the same
settings, so a published report carries the run to a new machine),
results.json, results.md,
fig_conflict_*.png, fig_blocks_*.png and (full sweep) fig_tradeoff_*.png. Its claims read "not judged (gate)" unless
every gate is met: G1, G2 and G4 on this run's own seeds, G3 from experiments/gates.py's report for the same pair
and recipe (claim 3 at matched style strength reads G4 on its own baseline and not G2).
"""
import argparse
import concurrent.futures as cf
import functools
import json
import math
import multiprocessing
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
import stats  # noqa: E402
import train  # noqa: E402
import minisd  # noqa: E402
from tinyworld import judge as judges  # noqa: E402
from tinyworld.evaluate import (IDENTITY_RECIPE, STYLE_RECIPE, check_kept, held_pair, integers, numbers,  # noqa: E402
                                 pair_arguments, pair_data, read_report, style_recipe)
from tinyworld.world import BACKGROUNDS, HELD_STYLE, IDENTITY, dataset, held_style, render  # noqa: E402

TINY = ROOT / "weights" / "tiny"
INS, OUTS = ("in0", "in1", "in2", "in3"), ("out0", "out1", "out2", "out3")
COARSE = INS + ("mid",) + OUTS
LBW = ("OUTD", "OUTS", "INS", "IND", "MIDD")  # lora-block-weight presets tried on the all-block style adapter
METRICS = ("identity", "style", "both", "prompt", "iou", "identity_sim", "style_sim")
STYLE_WEIGHTS = (0.25, 0.5, 0.75, 1.5)  # full sweep: trade-off curves of the all-block and in0+out3 style adapters
# rendered at every --guidance (the claims' settings); the other settings at the first only
GUIDED = ("identity only", "id + style(all)", "id + style(all) @in0,out3", "id + style(in0,out3)")


def style_subsets(sweep, algo):
    """Block subsets the style adapter is trained on, besides "all". With LoRA (attention, feed-forward and proj
    layers only) in3 and out0 have nothing to adapt (no attention at the 8x8 level): subsets that adapt nothing or
    the same layers as an earlier subset are left out."""
    pairs = [f"{i},{o}" for i in INS for o in OUTS]
    subsets = ["in0,out3", "in0", "out3", "mid"] if sweep == "small" else [*COARSE, *pairs]
    seen, kept = set(), []
    for s in subsets:
        layers = frozenset(path for path, _, _ in lora.network.target_paths(_tiny_unet(), lora.rank_table(s, rank=1),
                                                                            lora.network.ALGOS[algo]))
        if layers and layers not in seen:
            seen.add(layers)
            kept.append(s)
    return kept


@functools.lru_cache(maxsize=1)
def _tiny_unet():
    return minisd.load(TINY).unet


# full sweep: the training-free step-range baseline (lora-block-weight's start/stop; K-LoRA: content early, style
# late) on the all-block adapters, as {adapter: (start, stop)} in fractions of the sampling steps (None: open)
STEP_RANGES = {"id + style(all) style from 1/3": {"style": (1 / 3, None)},
               "id to 1/2, style(all) from 1/2": {"identity": (None, 1 / 2), "style": (1 / 2, None)}}


def step_table(ranges, steps):
    """{adapter: [on at step i]} of STEP_RANGES' fractions over `steps` sampling steps: a fraction f is step
    round(f steps) + 1 (1-based, as lora.blocks.step_mask counts), so 1/2 of 30 splits steps 1-15 from 16-30."""
    step = lambda f: None if f is None else round(f * steps) + 1
    return {name: lora.blocks.step_mask(step(start), step(stop), steps) for name, (start, stop) in ranges.items()}


def settings(sweep, algo):
    """[(title, style adapter or None, its inference block weights or None, identity on?, its global weight, step
    ranges or None)]."""
    rows = [("identity only", None, None, True), ("style only", "all", None, False),
            ("id + style(all)", "all", None, True)]
    rows += [(f"id + style(all) @{p}", "all", p, True) for p in LBW]
    rows += [("id + style(all) @in0,out3", "all", "in0=1,out3=1", True)]
    rows += [(f"id + style({s})", s, None, True) for s in style_subsets(sweep, algo)]
    rows = [(*r, 1.0, None) for r in rows]
    if sweep == "full":
        rows += [(f"style only({s})", s, None, False, 1.0, None) for s in style_subsets(sweep, algo)]
        rows += [(f"id + style({s}) x{w}", s, None, True, w, None) for s in ("all", "in0,out3") for w in STYLE_WEIGHTS]
        rows += [(title, "all", None, True, 1.0, ranges) for title, ranges in STEP_RANGES.items()]
    return rows


# The paper's four claims as paired comparisons: (claim, metric, settings a, settings b, the paper's sign of a - b).
# A list of settings is averaged image by image; a setting the sweep lacks is left out, a claim with none left too.
UPPER, LOWER = ["id + style(in0)", "id + style(out3)"], ["id + style(in3)", "id + style(mid)", "id + style(out0)"]
CLAIMS = [
    ("1 identity drops when an all-block style adapter joins", "identity", ["id + style(all)"], ["identity only"], -1),
    ("2 training on in0+out3 beats weighting them at inference", "both", ["id + style(in0,out3)"],
     ["id + style(all) @in0,out3"], +1),
    ("3 style on in0+out3 keeps both better than on all blocks", "both", ["id + style(in0,out3)"],
     ["id + style(all)"], +1),
    ("4 the upper blocks (in0, out3) carry more than the lowest (in3, mid, out0)", "both", UPPER, LOWER, +1),
]


# Claim 3 again at matched style strength (the gates' alternative to G2: issue 18): the all-block style adapter at
# the weight (1 or a trade-off row's) whose style rate, over the claim's seeds, is nearest the in0+out3 adapter's.
MATCHED = "3m the same at matched style strength"


def matched_weight(rows, a="id + style(in0,out3)", b="id + style(all)"):
    """The title of b at the global weight (1 or one of STYLE_WEIGHTS) whose mean style rate is nearest a's, or None
    if the sweep lacks a or b's trade-off rows (the full sweep's)."""
    titles = [t for t in [b] + [f"{b} x{w}" for w in STYLE_WEIGHTS] if t in rows]
    if a not in rows or len(titles) < 2:
        return None
    style = lambda t: np.mean([np.mean(v["style"]) for v in rows[t].values()])
    return min(titles, key=lambda t: abs(style(t) - style(a)))


def claims(rows, n_boot=10_000):
    """{claim: stats.compare of its settings} for one algorithm's {title: {seed: {metric: values}}}; a claim on the
    identity also gets its retention (among the images where setting b got the identity right)."""
    out, matched = {}, matched_weight(rows)
    at_matched_style = [(MATCHED, "both", ["id + style(in0,out3)"], [matched], +1)] if matched else []
    for claim, metric, a, b, sign in CLAIMS + at_matched_style:
        a, b = [t for t in a if t in rows], [t for t in b if t in rows]
        if not a or not b:
            continue
        # in numeric order: the bootstrap's draws follow the seeds' order, and a report read back from JSON has
        # string keys, which would put "10" before "2"
        seeds = sorted(set.intersection(*(set(rows[t]) for t in a + b)), key=int)
        mean_of = lambda titles: {s: np.mean([rows[t][s][metric] for t in titles], axis=0) for s in seeds}
        r = stats.compare(mean_of(a), mean_of(b), sign, n_boot=n_boot)
        if metric == "identity":
            r["retention"] = stats.retention(mean_of(a), mean_of(b))
        out[claim] = {"metric": metric, "a": a, "b": b, **r}
    return out


def renders(sweep, algo, guidances):
    """[(title, guidance, style, block weights, identity on?, style weight)]: every setting at the first guidance, the
    GUIDED ones at the others too, titled "... g=2"."""
    return [(t if g == guidances[0] else f"{t} g={g:g}", g, *rest) for g in guidances
            for t, *rest in settings(sweep, algo) if g == guidances[0] or t in GUIDED]


def adapter_file(out, algo, seed, data, blocks):
    return out / "adapters" / algo / f"seed{seed}" / f"{data}_{blocks.replace(',', '+')}.safetensors"


# ----------------------------------------------------------------------------------------------- training

SAVE_EVERY = 1600  # a train job's checkpoints: a run killed outright loses at most this many steps (SIGTERM saves)


def train_job(job, stop=None):
    """One adapter, in a worker: train.main with the recipe's flags, in float32 on any device (the tiny model's
    results then do not depend on where it ran), resumed from its newest checkpoint if an earlier run left one
    (a job's own --save-every wins over SAVE_EVERY); a finished adapter keeps no checkpoints. A worker thread's
    run takes the pool's `stop` (run_jobs): on a signal it saves a checkpoint after its step and ends quietly."""
    argv, device, threads, cuda_graph = job
    torch.set_num_threads(threads)
    out = Path(argv[argv.index("--out") + 1])
    resume = ["--resume"] if train.state_files(out) else []
    graph = cuda_graph and "--te-rank" not in argv  # the graph path keeps the text encoder frozen
    flags = ["--save-every", str(SAVE_EVERY)] + argv + ["--device", device, "--mixed-precision", "no", "--quiet"]
    if train.main(flags + resume + (["--cuda-graph"] if graph else []), stop) is None:
        return None  # stopped by the pool's `stop` after its checkpoint: the next run resumes from it
    prune_checkpoints(out, keep=0)
    return str(out)


def prune_checkpoints(adapter, keep=1):
    """Delete train.py's checkpoints beside an adapter file (<stem>-stepN.state.pt and .safetensors) but the newest
    `keep`: an unfinished adapter resumes from its newest, a finished one needs none (and the folder stays small
    enough to carry to the next machine)."""
    states = train.state_files(Path(adapter))
    for state in states[:max(0, len(states) - keep)]:
        state.with_name(state.name.removesuffix(".state.pt") + ".safetensors").unlink(missing_ok=True)
        state.unlink()


def training_jobs(args, out, settings):
    """{(algo, seed): train.py argv for each of its adapters not found under out}, for the pairs not scored yet (a
    scored pair needs none: its evals/ alone carry the run across machines)."""
    jobs, data_sets = {}, pair_data(args.identity, args.style, out)
    for algo in args.algos:
        for seed in args.seeds:
            kept = kept_settings(out, algo, seed)
            if kept == settings:
                continue
            if kept is not None:  # a CPU's default --n is 16, a GPU's 64: say why a scored pair is done again
                changed = ", ".join(f"{k} {kept.get(k)} -> {v}" for k, v in settings.items() if kept.get(k) != v)
                print(f"{eval_path(out, algo, seed)}: scored with other settings ({changed}); redone", flush=True)
            # the block subsets first: with --subset-steps they are the pair's long jobs, and starting them first
            # lets the short ones fill the workers' gaps, so the pair is scored sooner
            adapters = [("style", s) for s in seed_subsets(args, seed, algo)] + [("identity", "all"), ("style", "all")]
            jobs[algo, seed] = []
            for data, blocks in adapters:
                path = adapter_file(out, algo, seed, data, blocks)
                te = ["--te-rank", str(args.te_rank)] if data == "identity" and args.te_rank else []
                flags = IDENTITY_RECIPE if data == "identity" else STYLE_RECIPE  # the gates' recipe
                flags += f" --steps {args.steps}" if args.steps else ""  # a later flag wins
                flags += f" --lr {args.lr}" if args.lr else ""
                flags = style_recipe(blocks, flags, args.subset_steps) if data == "style" else flags
                argv = ["--data", str(data_sets[data]), "--blocks", blocks, *shlex.split(flags), "--algo", algo,
                        "--rank", str(args.rank), "--batch", "4", "--seed", str(seed), "--out", str(path)] + te
                if path.exists():
                    check_kept(path, argv)
                else:
                    prune_checkpoints(path)  # a run cut off left its checkpoints: the newest is resumed
                    jobs[algo, seed].append(argv)
    return jobs


def seed_subsets(args, seed, algo):
    """The block subsets a seed's style adapters train on besides all: the first --small-seeds of --seeds those of
    --sweep (the first --full-seeds of them; the small sweep's after), the others in0,out3 alone. Claims 1-3 and 3m
    read only the all-block and in0+out3 adapters; claim 4's single blocks (three 12800-step adapters a seed with
    --subset-steps 12800) stay at --small-seeds seeds (docs/blockwise.md: each claim stops at its own count)."""
    i = args.seeds.index(seed)
    if i >= args.small_seeds:
        return ["in0,out3"]
    return style_subsets(args.sweep if i < args.full_seeds else "small", algo)


def pair_jobs(todo, args, out, settings, devices, threads):
    """run_jobs' (fn, arg) jobs and their needs: each pair's adapters, then its evaluation, which waits for them. A
    pair is scored as soon as its adapters exist, so a run cut off by --budget-s leaves scored pairs (whose evals/
    carry them: their adapters need not travel) rather than many adapters and no scores."""
    jobs, needs = [], []
    for (algo, seed), argvs in todo.items():
        first = len(jobs)
        for argv in argvs:
            jobs.append((train_job, (argv, devices[len(jobs) % len(devices)], threads, args.cuda_graph)))
            needs.append(())
        jobs.append((eval_job, (algo, seed, out, settings, devices[len(jobs) % len(devices)], threads)))
        needs.append(tuple(range(first, len(jobs) - 1)))
    return jobs, needs


def call(job, stop=None):
    """A (fn, arg) job of pair_jobs (a module-level function: process workers pickle it)."""
    fn, arg = job
    return fn(arg, stop)


# --------------------------------------------------------------------------------------------- evaluation

def eval_scenes(n, seed, identity=IDENTITY, style=HELD_STYLE):
    """n held-out "sks character in zwx style" scenes of training seed `seed` (the same for every setting of the
    seed, fresh for each seed), their captions and true silhouettes."""
    scenes = [s for _, _, s in dataset(n, seed=2024 + 100 * seed, split="combo", identity=identity, style=style)]
    return scenes, [s.caption() for s in scenes], np.stack([render(s)[1] for s in scenes])


def silhouette_iou(images, scenes, masks, threshold=60.0):
    """IoU of {pixels further than `threshold` (RGB, 0-255) from the prompt's background colour} with the character's
    true silhouette: high only if the character has the right place, size and outline, whatever its colours."""
    rgb = images.permute(0, 2, 3, 1).numpy() * 255
    bg = np.array([BACKGROUNDS[s.background] for s in scenes], np.float32)[:, None, None]
    fg = np.linalg.norm(rgb - bg, axis=-1) > threshold
    return (fg & masks).sum((1, 2)) / np.maximum((fg | masks).sum((1, 2)), 1)


def eval_path(out, algo, seed):
    return out / "evals" / f"{algo}_seed{seed}.json"


def eval_settings(args):
    """What an (algo, seed)'s evaluation depends on besides its adapters: a kept one with other settings is redone."""
    return {"sweep": args.sweep, "n": args.n, "sample_steps": args.sample_steps, "guidance": args.guidance,
            "identity": args.identity, "style": args.style.name, "subset_steps": args.subset_steps}


def kept_settings(out, algo, seed):
    """The settings a kept evaluation of (algo, seed) was made with, or None."""
    path = eval_path(out, algo, seed)
    return json.loads(path.read_text())["settings"] if path.exists() else None


def eval_job(job, stop=None):
    """Every setting of one (algo, seed) at the first guidance, the GUIDED settings at the others too ("... g=2"),
    written under out/evals/: {title: {metric: per-image values}} (JSON, written last) and the first images of each
    (safetensors). The settings scored so far are kept after each one (a CPU takes minutes a setting), so a run cut
    off continues where it stopped: every setting renders from the same seed and noise, in any order."""
    algo, seed, out, settings, device, threads = job
    sweep, n, steps, guidances = (settings[k] for k in ("sweep", "n", "sample_steps", "guidance"))
    pair = settings["identity"], held_style(settings["style"])
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # the tiny model's small activations otherwise hit slow denormal arithmetic
    sd = minisd.load(TINY, device=device)
    judge = judges.load(TINY / "judge.safetensors", device=device)
    scenes, prompts, masks = eval_scenes(n, seed, *pair)
    path = eval_path(out, algo, seed)
    results, thumbs, devices = read_partial(path, settings)
    for title, guidance, style, block_weights, with_identity, weight, ranges in renders(sweep, algo, guidances):
        if stop and stop.signal:
            return  # the settings scored so far are kept
        if title in results or style and not adapter_file(out, algo, seed, "style", style).exists():
            continue  # scored before the run was cut off, or a seed that ran the small sweep only
        names = []
        if with_identity:
            lora.load(adapter_file(out, algo, seed, "identity", "all"), sd.unet, sd.text_encoder, name="identity")
            names.append("identity")
        if style:
            lora.load(adapter_file(out, algo, seed, "style", style), sd.unet, name="style", weight=weight,
                      block_weights=block_weights)
            names.append("style")
        switch = lambda a, on: lora.enable(sd.unet, a, on)
        gates = minisd.fast.StepGates(step_table(ranges, steps), switch) if ranges else None
        images = sd.sample(prompts, steps=steps, guidance=guidance, seed=1000 + seed, progress=False,
                           cuda_graph=device.startswith("cuda"), on_step=gates).float().cpu()
        for name in names:
            lora.remove(sd.unet, name, sd.text_encoder)
        s = judges.score(judge, images, *pair)
        identity, style_ok, pred = s["identity"].numpy(), s["style"].numpy(), s["read"]
        results[title] = {"identity": identity.tolist(), "style": style_ok.tolist(),
                          "both": (identity & style_ok).tolist(),
                          "prompt": [p == s.background for p, s in zip(pred["background"], scenes)],
                          "iou": silhouette_iou(images, scenes, masks).tolist(),
                          "identity_sim": s["identity_sim"].tolist(), "style_sim": s["style_sim"].tolist()}
        thumbs[title] = (images[:4] * 255).round().to(torch.uint8).contiguous()  # the VAE may give channels_last
        devices.add(machine(device))
        write_eval(path.with_suffix(".partial.json"), settings, devices, results, thumbs)
    write_eval(path, settings, devices, results, thumbs)  # its presence says the (algo, seed) is done
    for part in (path.with_suffix(".partial.json"), path.with_suffix(".partial.safetensors")):
        part.unlink(missing_ok=True)


def write_eval(path, settings, devices, results, thumbs):
    """An evaluation's JSON and first images, each replaced whole (the images first: a JSON names no setting whose
    images are missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(thumbs, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path.with_suffix(".safetensors"))
    record = {"settings": settings, "device": ", ".join(sorted(devices)), "results": results}
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").replace(path)


def read_partial(path, settings):
    """(results, first images, devices) of the settings an evaluation cut off had scored, if it was made with these
    settings; else nothing."""
    part = path.with_suffix(".partial.json")
    record = json.loads(part.read_text()) if part.exists() else {}
    if record.get("settings") != settings:
        return {}, {}, set()
    thumbs = load_file(part.with_suffix(".safetensors"))
    return record["results"], {t: thumbs[t] for t in record["results"]}, devices_of(record.get("device", "unrecorded"))


def devices_of(joined):
    """The devices an evaluation was rendered on, from the string write_eval joins them into with ", " (one, unless
    a scoring cut off was finished elsewhere)."""
    return set(joined.split(", "))


def machine(device):
    """The name a report gives a device ("cuda:0" or "cpu")."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"


def read_evals(out, scored):
    """({algo: {title: {seed: results}}}, {(algo, seed): {title: first images}}, {algo: {seed: the device(s) it was
    rendered on}} (an evaluation written before they were recorded: "unrecorded")) from out/evals/, for the
    {algo: [seeds]} scored."""
    raw, thumbs, devices = {}, {}, {}
    for algo, seeds in scored.items():
        for seed in seeds:
            path = eval_path(out, algo, seed)
            record = json.loads(path.read_text())
            for title, r in record["results"].items():
                raw.setdefault(algo, {}).setdefault(title, {})[seed] = r
            thumbs[algo, seed] = load_file(path.with_suffix(".safetensors"))
            devices.setdefault(algo, {})[seed] = record.get("device", "unrecorded")  # write_eval's joined names
    return raw, thumbs, devices


def keep(path, out, settings):
    """Write the evaluations of an earlier report (its results.json) under out/evals/ for the (algo, seed) pairs it
    scored and out has not, after checking that it was made with this run's settings: a published report carries
    the run to a machine without its evals/. A report holds no images, so a kept pair draws no figure grid. Returns
    the report's {algo: [seeds]} scored."""
    report = read_report(path, ("args", "scored", "per_image"), "--kept")
    made = {k: report["args"].get(k) for k in settings}
    if diff := [k for k in settings if made[k] != settings[k]]:
        sys.exit(f"--kept {path}: made with other {', '.join(diff)} than this run")
    for algo, seeds in report["scored"].items():
        for seed in seeds:
            file = eval_path(out, algo, seed)
            if not file.exists():
                results = {title: per_seed[str(seed)] for title, per_seed in report["per_image"][algo].items()
                           if str(seed) in per_seed}
                device = report.get("devices", {}).get(algo, {}).get(str(seed), "unrecorded")
                write_eval(file, settings, devices_of(device), results, {})
    return report["scored"]


def summarize(per_seed):
    """{seed: {metric: values}} -> {metric: (mean, 95% half-width)}: Student t interval over seed means, or over
    images when there is one seed; and "seeds": how many."""
    summary = {"seeds": len(per_seed)}
    for m in METRICS:
        if len(per_seed) > 1:
            means = np.array([np.mean(v[m]) for v in per_seed.values()])
        else:
            means = np.asarray(next(iter(per_seed.values()))[m], np.float64)
        n = len(means)
        half = stats.t_quantile(0.975, n - 1) * means.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
        summary[m] = (float(means.mean()), float(half))
    return summary


# ---------------------------------------------------------------------------------------------------- main

def run_gates(summary, reported, matched=None):
    """One algorithm's gates: G1, G2 and G4 read on this run's own adapters and prompts, as means over its seeds (one
    training's reading is noisy: the same identity recipe read 0.84 and 0.94), with G3 (the VAE round trip: no
    training in it) and any problem with the report (missing, another pair or recipe) from gates.py's; and G4m, G4
    on claim 3m's baseline (the all-block style at the `matched` weight's row) when there is one."""
    mean = lambda title, metric: summary[title][metric][0] if title in summary else float("nan")  # nan: not met
    own = {"G1 identity only: identity >= 0.90": mean("identity only", "identity") >= 0.9,
           "G2 style only: style >= 0.90 (all; in0,out3)": all(mean(t, "style") >= 0.9 for t in
                                                               ("style only", "style only(in0,out3)")),
           "G4 identity + style (all): both in [0.2, 0.7]": 0.2 <= mean("id + style(all)", "both") <= 0.7}
    if matched:
        own[f"G4m {matched}: both in [0.2, 0.7]"] = 0.2 <= mean(matched, "both") <= 0.7
    return {**own, **{g: ok for g, ok in reported.items() if not g.startswith(("G1", "G2", "G4"))}}


def binds(gate, claim):
    """Whether a gate holds back a claim's verdict: claim 3m, compared at matched style strength (issue 18's
    alternative to G2), reads G4 on its own baseline (G4m) instead of the all-block adapter at weight 1; G4m binds
    only 3m."""
    return not gate.startswith(("G2", "G4 ")) if claim == MATCHED else not gate.startswith("G4m")


def read_gates(path, identity=IDENTITY, style=HELD_STYLE, subset_steps=None):
    """{gate: met} from experiments/gates.py's report for this pair and --subset-steps, or {the problem: False} (a
    report without the pair's ids is the main pair's: gates.py wrote none before it took others). run_gates takes
    its G3 and any problem for the claims."""
    if not Path(path).is_file():
        return {f"{path} missing: run python experiments/gates.py": False}
    report = read_report(path, ("recipe", "gates"), "--gates")
    ran = report["recipe"].get("identity"), report["recipe"].get("style")
    ran = ran if isinstance(ran[0], int) else (IDENTITY, HELD_STYLE.name)
    if ran[0] != identity or held_style(ran[1]) != style:
        return {f"{path} is for identity {ran[0]}, style {ran[1]}: run gates.py with this pair": False}
    if report["recipe"].get("subset_steps") != subset_steps:
        return {f"{path} has --subset-steps {report['recipe'].get('subset_steps')}: run gates.py with "
                f"--subset-steps {subset_steps}": False}
    return report["gates"]


def run_jobs(fn, jobs, workers, threads=False, deadline=None, needs=None):
    """fn over the jobs on `workers` processes of one pool (each pays its imports and start-up once), or on threads
    of this process (threads: on CUDA each on streams of its own; one process's streams run side by side on a GPU,
    processes take turns). A job starts once the jobs its `needs` entry names (indices of earlier jobs) are done; of
    the jobs ready, the first in the list. Every worker stays busy while jobs are ready; no job starts after
    `deadline` (a time.time()). False if some were left. On one worker or on threads, SIGINT or SIGTERM (a time
    limit's) starts no more jobs and asks the running ones to stop at their next safe point, fn(job, stop): a train
    job saves a checkpoint after its step, a second signal stops at once (a process worker's train.py takes the
    signal itself)."""
    needs = needs or [()] * len(jobs)
    todo, done = list(range(len(jobs))), set()
    stop = train.StopRequest() if threads or workers <= 1 else None

    def next_ready():
        if deadline and time.time() > deadline or stop and stop.signal:
            return None
        return next((i for i in todo if done.issuperset(needs[i])), None)
    try:
        if workers <= 1:
            while (i := next_ready()) is not None:
                todo.remove(i)
                fn(jobs[i], stop)
                done.add(i)
        elif threads:
            with cf.ThreadPoolExecutor(workers, initializer=own_streams) as pool:
                keep_busy(lambda i: pool.submit(fn, jobs[i], stop), workers, next_ready, todo, done)
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                keep_busy(lambda i: pool.submit(fn, jobs[i]), workers, next_ready, todo, done)
    finally:
        if stop:
            stop.restore()
    if stop and stop.signal:
        print(f"{signal.Signals(stop.signal).name}: the running jobs stopped where they were (a train job at a "
              f"checkpoint), {len(todo)} others not started; run again to continue", flush=True)
        return False
    if todo:
        print(f"--budget-s reached: {len(todo)} jobs left; run again to continue", flush=True)
    return not todo


def keep_busy(submit, workers, next_ready, todo, done):
    """run_jobs' pool loop: up to `workers` jobs running, the next ready one started as each ends."""
    running = {}
    while True:
        while len(running) < workers and (i := next_ready()) is not None:
            todo.remove(i)
            running[submit(i)] = i
        if not running:
            return
        finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        for job in finished:
            job.result()  # a failed job raises here, with its traceback
            done.add(running.pop(job))


def own_streams():
    """A worker thread's start: on every CUDA device its work goes to a stream of its own (for the thread's whole
    life: cuBLAS keeps a workspace per stream it ran on)."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.set_stream(torch.cuda.Stream(i))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pair_arguments(p)
    p.add_argument("--sweep", choices=["small", "full"], default="small",
                   help="small: style on all, in0+out3, in0, out3, mid; "
                        "full: all, every single block, every in+out pair")
    p.add_argument("--algos", default="lora,locon", help="comma-separated: lora, locon")
    p.add_argument("--seeds", type=integers, default="0", help="comma-separated training seeds")
    p.add_argument("--full-seeds", type=int, default=None,
                   help="with --sweep full: only the first N seeds train every subset, the others the small sweep's")
    p.add_argument("--small-seeds", type=int, default=None, help="only the first N seeds train --sweep's subsets, "
                   "the others the style on all blocks and in0+out3 alone (what claims 1-3 and 3m read)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per adapter (default: the world's recipe, tinyworld.evaluate, as the gates)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--subset-steps", type=int, default=None, help="training steps of the style adapters on a block "
                   "subset (default: as the all-block one's; gates.py --subset-steps must have said the same)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--te-rank", type=int, default=0, help="text-encoder rank of the identity adapter (0: U-Net only)")
    p.add_argument("--n", type=int, default=None, help="images (prompts) per setting and seed (default: 64 on a GPU, "
                   "as the protocol asks; 16 on a CPU)")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=numbers, default="5", help="comma-separated: every setting at the first, "
                   "identity only, id + style(all) (plain and @in0,out3) and id + style(in0,out3) at the others "
                   "(protocol: 5,2,7.5)")
    p.add_argument("--workers", type=int, default=max(1, torch.cuda.device_count()),
                   help="parallel workers (processes; threads with --threads), spread over the GPUs (default: "
                   "one per GPU, else 1)")
    p.add_argument("--threads", action="store_true", help="the workers are threads of this process, each on CUDA "
                   "streams of its own: one process's streams run side by side on a GPU, processes take turns")
    p.add_argument("--cuda-graph", action="store_true", help="train with train.py --cuda-graph (GPU)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new work after this many seconds; run "
                   "again to continue (trained adapters and scored (algo, seed) pairs are kept)")
    p.add_argument("--out", default="out/blockwise")
    p.add_argument("--gates", default="out/gates/gates.json", help="experiments/gates.py's report for this recipe")
    p.add_argument("--kept", default=None, help="an earlier results.json (made with the same settings) whose scored "
                   "(algo, seed) pairs to keep instead of scoring them again")
    p.add_argument("--smoke", action="store_true", help="the test suite's plumbing check: LoCon, small sweep, 2 "
                   "training steps, 2 images of 2 sampling steps per setting, on the CPU")
    args = p.parse_args(argv)
    args.identity, args.style = held_pair(p, args.identity, args.style)
    if args.smoke:
        args.algos, args.sweep, args.steps, args.n, args.sample_steps, args.workers = "locon", "small", 2, 2, 2, 1
    args.algos = [a.strip() for a in args.algos.split(",")]
    if set(args.algos) - {"lora", "locon"}:
        p.error(f"--algos: lora and/or locon, got {args.algos}")
    for flag, count in (("--full-seeds", args.full_seeds), ("--small-seeds", args.small_seeds)):
        if count is not None and count < 0:
            p.error(f"{flag} counts seeds: 0 or more, got {count}")
    args.full_seeds = len(args.seeds) if args.full_seeds is None else args.full_seeds
    args.small_seeds = len(args.seeds) if args.small_seeds is None else args.small_seeds
    return args


def main(argv=None):
    args = parse_args(argv)
    out, t0 = Path(args.out), time.time()
    gpus = 0 if args.smoke else torch.cuda.device_count()
    devices = [f"cuda:{i % gpus}" for i in range(args.workers)] if gpus else ["cpu"] * args.workers
    threads = max(1, (os.cpu_count() or 1) // args.workers) if not gpus else 1
    gates = read_gates(args.gates, args.identity, args.style, args.subset_steps)
    args.n = args.n or (64 if gpus else 16)

    deadline = t0 + args.budget_s if args.budget_s else None
    settings = eval_settings(args)
    kept = keep(args.kept, out, settings) if args.kept else {}
    todo = training_jobs(args, out, settings)
    print(f"training {sum(map(len, todo.values()))} adapters and scoring {len(todo)} (algo, seed) pairs on "
          f"{args.workers} worker(s) ({', '.join(sorted(set(devices)))})", flush=True)
    jobs, needs = pair_jobs(todo, args, out, settings, devices, threads)
    finished = run_jobs(call, jobs, args.workers, args.threads, deadline, needs)
    scored = {a: [s for s in args.seeds if kept_settings(out, a, s) == settings] for a in args.algos}
    left = {a: sorted(set(seeds) - set(scored.get(a, []))) for a, seeds in kept.items()}
    if any(left.values()):
        print(f"this report leaves out these pairs of --kept {args.kept} (name them in --algos and --seeds to keep "
              "them): " + "; ".join(f"{a} {seeds}" for a, seeds in left.items() if seeds), flush=True)
    if not any(scored.values()):
        return
    raw, thumbs, rendered = read_evals(out, scored)
    rendered_on = sorted(set().union(*(devices_of(pair) for pairs in rendered.values() for pair in pairs.values())))
    table = {algo: {title: summarize(per_seed) for title, per_seed in rows.items()} for algo, rows in raw.items()}
    tested = {algo: claims(rows) for algo, rows in raw.items()}

    report = {"args": {**vars(args), "style": args.style.name}, "scored": scored, "gates": gates,
              "run gates": {algo: run_gates(summary, gates, tested[algo].get(MATCHED, {}).get("b", [None])[0])
                            for algo, summary in table.items()},
              "seconds": round(time.time() - t0),
              "device": machine(devices[0]), "rendered on": rendered_on, "devices": rendered,
              "summary": table, "claims": tested, "per_image": raw}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    figures(thumbs, table, scored, out)
    print(markdown(report))
    print(f"{'done' if finished else 'stopped'} in {time.time() - t0:.0f}s; wrote {out}/results.md, results.json, "
          f"fig_*.png" + ("" if finished else " over the pairs scored so far"))


def markdown(report):
    a = report["args"]
    lines = [f"Block-wise LoRA on minisd-tiny, identity {a.get('identity', IDENTITY)} in "
             f"{a.get('style', HELD_STYLE.name)}: {a['sweep']} sweep, seeds {a['seeds']} (scored: "
             + "; ".join(f"{algo} {seeds}" for algo, seeds in report["scored"].items()) + "), "
             f"{a['n']} images per setting and seed, rank {a['rank']}, {a['steps'] or 'recipe'} steps "
             f"({a.get('subset_steps') or 'the same'} on block subsets) "
             f"at lr {a['lr'] or 'recipe'}, {a['sample_steps']} DDIM steps, guidance {a['guidance']}; "
             f"rendered on {', '.join(report.get('rendered on', ['unrecorded']))}; this run {report['seconds']} s on "
             f"{report['device']}.", "",
             "gates.py's report: " + "; ".join(f"{g}: {'met' if ok else 'NOT MET'}" for g, ok in
                                               report["gates"].items()), ""]
    for algo, rows in report["summary"].items():
        gates = report["run gates"][algo]
        counts = [s["seeds"] for s in rows.values()]
        if min(counts) < max(counts):  # --small-seeds: the later seeds train the style on all blocks and in0+out3
            lines += [f"### {algo}", "", f"{max(counts)} seeds with the style on all blocks and in0+out3, the first "
                      f"{min(counts)} of them with every subset of the sweep.", ""]
        else:
            lines += [f"### {algo}", ""]
        lines += ["Gates (G1, G2, G4 on this run's seeds): " + "; ".join(
                  f"{g}: {'met' if ok else 'NOT MET'}" for g, ok in gates.items()), "",
                  "| setting | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
        for title, s in rows.items():
            cells = " | ".join(f"{s[m][0]:.2f} ± {s[m][1]:.2f}" for m in METRICS)
            lines.append(f"| {title} | {s['seeds']} | {cells} |")
        lines += ["", *claims_markdown(report["claims"].get(algo, {}), gates), ""]
    return "\n".join(lines)


def claims_markdown(tested, gates):
    """The claims table: a - b with its paired-bootstrap interval, verdict (only when every gate that binds the claim
    is met and the run has the protocol's seeds: stats.judgement), the observed sigma_s and p_d, the power to see
    0.10 at them, and the seeds that power 0.8 would need."""
    lines = ["| claim | metric: a - b | 95% interval | verdict | seeds × images | σ_s | p_d | power (0.10) "
             "| seeds for 0.8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for claim, r in tested.items():
        judged = all(ok for g, ok in gates.items() if binds(g, claim))
        extra = f"; retention {r['retention']:.2f}" if "retention" in r else ""
        extra += f" (b: {r['b'][0]})" if claim == MATCHED else ""
        lines.append(f"| {claim} | {r['metric']}: {r['mean']:+.3f}{extra} | [{r['low']:+.3f}, {r['high']:+.3f}] | "
                     f"{stats.judgement(r) if judged else 'not judged (gate)'} | {r['seeds']} × {r['images']} | "
                     f"{r['sigma_s']:.3f} | {r['p_d']:.2f} | "
                     + (f"{r['power']:.2f} | {r['seeds_needed'] or '> 100'} |" if r["seeds"] > 1 else "- | - |"))
    return lines


def figures(thumbs, table, scored, out):
    """Paper-style grids for each algorithm's first scored seed that has its images (one kept from a report with
    --kept has none): the conflict and its inference-time fixes (Fig. 2-3), the block sweep (Fig. 4); and (full
    sweep) the trade-off curves over all its seeds."""
    from demo import labelled_grid
    for algo, seeds in ((algo, seeds) for algo, seeds in scored.items() if seeds):
        if f"id + style(all) x{STYLE_WEIGHTS[0]}" in table[algo]:  # the full sweep's weight rows
            tradeoff_figure(table[algo], out / f"fig_tradeoff_{algo}.png")
        seed = next((s for s in seeds if thumbs[algo, s]), None)
        if seed is None:
            continue
        # weight 1 at the main guidance only
        th = {t: v for t, v in thumbs[algo, seed].items() if " x" not in t and " g=" not in t}
        score = {t: {k: table[algo][t][k][0] for k in ("identity", "style", "both")} for t in th}
        conflict = [t for t in th if not t.startswith("id + style(") or t.startswith("id + style(all)")
                    or t == "id + style(in0,out3)"]
        blocks = ["id + style(all)"] + [t for t in th if t.startswith("id + style(") and "all" not in t]
        for name, titles in (("conflict", conflict), ("blocks", blocks)):
            labelled_grid({t.replace("id + ", "+"): th[t].float() / 255 for t in titles},
                          {t.replace("id + ", "+"): score[t] for t in titles}, out / f"fig_{name}_{algo}.png")


def tradeoff_figure(rows, path, size=(480, 360), margin=48):
    """The trade-off curves (claim 3m): identity rate against style rate of identity + style at each style weight,
    for the all-block and the in0+out3 style adapters, means over seeds, drawn with PIL. Returns {title: (x, y)},
    the pixel of each point."""
    from PIL import Image, ImageDraw
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pixel = lambda style, identity: (margin + style * (w - 2 * margin), h - margin - identity * (h - 2 * margin))
    d.rectangle([pixel(0, 1), pixel(1, 0)], outline=(160, 160, 160))
    for v in (0, 0.5, 1):
        d.text((pixel(v, 0)[0] - 8, h - margin + 6), f"{v:g}", fill="black")
        d.text((margin - 24, pixel(0, v)[1] - 6), f"{v:g}", fill="black")
    d.text((w // 2 - 40, h - 18), "style rate", fill="black")
    d.text((4, 4), "identity rate; labels: style weight (both)", fill="black")
    points = {}
    for blocks, colour in (("all", (200, 40, 40)), ("in0,out3", (30, 80, 200))):
        titles = [t for weight in sorted(STYLE_WEIGHTS + (1,))
                  if (t := f"id + style({blocks})" + (f" x{weight}" if weight != 1 else "")) in rows]
        xy = [pixel(rows[t]["style"][0], rows[t]["identity"][0]) for t in titles]
        d.line(xy, fill=colour, width=2)
        for t, (x, y) in zip(titles, xy):
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            d.text((x + 6, y - 6), f"{t.split(' x')[1] if ' x' in t else '1'} ({rows[t]['both'][0]:.2f})", fill=colour)
            points[t] = (round(x), round(y))
        legend = pixel(0.03, 0.12)
        d.text((legend[0], legend[1] + (0 if blocks == "all" else 14)), f"style on {blocks}", fill=colour)
    im.save(path, format="PNG")
    return points


if __name__ == "__main__":
    main()
