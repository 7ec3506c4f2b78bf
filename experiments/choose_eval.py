"""How well do lora/choose.py's methods choose the style adapter's blocks? Checked against an oracle in the tiny world.

The oracle trains style-only adapters (tinyworld STYLE_RECIPE) on every single coarse block and every in+out pair
(25 sets), per training seed, and scores identity (all blocks, IDENTITY_RECIPE) + style(set) with the world's judges
on "sks character ... zwx style" prompts and noise drawn for that seed (the same for every set of the seed: paired;
fresh for each seed: no prompt is shared by two seeds). Each method (experiments/choose_blocks.py on that
seed's identity and all-block style adapters and training images; the probe on 16 counterfactual scenes drawn for
the seed, tinyworld.world.write_pairs) chooses blocks under the same parameter budget; its choice is trained and
scored the same way. Per seed and method:
  regret    the oracle's best "both" among its sets within the budget - the method's "both"
  tau       Kendall tau-b between the method's block scores and the oracle's single-block "both"
  win rate  against the oracle's sets of the same size (singles, or in+out pairs): P(method > set), ties 1/2
"paper" is the fixed in0+out3 choice, for comparison.

    python experiments/choose_eval.py --seeds 0,1 --workers 2 --cuda-graph --out out/choose     # GPU; re-run to resume
    python experiments/choose_eval.py --identity 26 --style zigzag/8 --out out/choose_26       # a reserved pair
    python experiments/choose_eval.py --smoke --out /tmp/choose_smoke                          # CPU plumbing, < 60 s
    python experiments/choose_eval.py --seeds 0,1,2,3,4,5,6 --kept docs/blockwise/choose_oracle.json  # add seed 6

Resumable: trained adapters (adapters/), method choices (methods/) and scored settings (scores/) found under --out
are kept, and an adapter is trained only while a score or a choice that needs it is missing; --kept FILE takes the
scores and choices of an earlier results.json, so an oracle grows by seeds without its adapters (about 30 MB a
seed, not in git). --budget-s stops starting new work after that many seconds (re-run to continue). Writes results.json
(every image's scores, the choices, the metrics), results.md and the first seed's figures (fig_oracle_singles_seedS.png,
fig_oracle_pairs_seedS.png: the first 4 images of every set) once every setting is scored.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import lora.choose as choose  # noqa: E402
import stats  # noqa: E402
import minisd  # noqa: E402
from minisd.images import grid, save_png, to_pil  # noqa: E402
from blockwise import COARSE, INS, OUTS, run_jobs, train_job  # noqa: E402
from choose_blocks import NEEDS, parse_args as choose_args, run as choose_run  # noqa: E402
from tinyworld import judge as judges  # noqa: E402
from tinyworld.evaluate import (IDENTITY_RECIPE, STYLE_RECIPE, Setting, check_kept, held_pair, integers,  # noqa: E402
                                 pair_arguments, pair_data, prompts, rates, read_report, recipe_argv,
                                 render_setting, style_recipe, written_once)
from tinyworld.world import write_pairs  # noqa: E402

TINY = ROOT / "weights" / "tiny"
FAMILY = [*COARSE, *(f"{i},{o}" for i in INS for o in OUTS)]  # the oracle's style block sets
SMOKE_FAMILY = ["in0", "out3", "in0,out3"]
THUMBS = 4  # images per set kept for the figures
EVAL_SEED = 3000  # prompts and noise of training seed s: EVAL_SEED + 100 s (recipe.py uses 100, gates.py 1000 / 2000)
PROBE_SEED = 5000  # the probe's counterfactual scenes for training seed s: PROBE_SEED + 100 s
ADAPTERS = ("identity", "style")  # what a method that reads the seed's all-block adapters needs (choose_blocks.NEEDS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pair_arguments(p)
    p.add_argument("--seeds", type=integers, default="0", help="comma-separated training seeds")
    p.add_argument("--methods", default=None,
                   help="comma-separated lora/choose.py methods (default: all; --smoke: weights, the fast one)")
    p.add_argument("--budget", default="in0,out3", help="parameters, a fraction <= 1, or a block set whose size it is")
    p.add_argument("--rank", type=int, default=8, help="style adapter rank (the recipe's)")
    p.add_argument("--subset-steps", type=int, default=None, help="training steps of the style adapters on a block "
                   "subset (default: the recipe's, as the all-block one's; blockwise.py's flag)")
    p.add_argument("--n", type=int, default=64, help="evaluation prompts per setting")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=1,
                   help="parallel workers (processes; threads with --threads); one GPU is shared by all")
    p.add_argument("--threads", action="store_true", help="the workers are threads of this process, each on a CUDA "
                   "stream of its own: one process's streams run side by side on a GPU, processes take turns")
    p.add_argument("--cuda-graph", action="store_true", help="train with train.py --cuda-graph (GPU)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new work after this many seconds")
    p.add_argument("--kept", default=None, help="an earlier results.json whose scores and choices to keep (made "
                   "with the same pair, --n, --sample-steps, --budget, --rank, --subset-steps and recipe)")
    p.add_argument("--smoke", action="store_true", help="plumbing check: 3 sets, 2 steps, 4 images, CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/choose")
    args = p.parse_args(argv)
    args.identity, style = held_pair(p, args.identity, args.style)
    # ablation and fisher take minutes on a CPU: --smoke runs weights only unless asked
    methods = args.methods or ("weights" if args.smoke else ",".join(sorted(NEEDS)))
    args.style, args.methods = style, methods.split(",")
    if set(args.methods) - set(NEEDS):
        p.error(f"--methods: some of {', '.join(sorted(NEEDS))}, got {args.methods}")
    if args.smoke:
        args.n, args.sample_steps, args.device, args.workers = min(args.n, 2), 2, "cpu", 1
    args.family = SMOKE_FAMILY if args.smoke else FAMILY
    args.recipe = {"identity": IDENTITY_RECIPE, "style": STYLE_RECIPE}
    if args.smoke:
        args.recipe = {k: v + " --steps 1 --batch 1" for k, v in args.recipe.items()}
    return args


# --------------------------------------------------------------------------------------------------- files

def data_sets(args, out):
    """{"identity": folder, "style": folder}: the pair's 48 identity and 16 style images (--smoke: 4 each)."""
    return pair_data(args.identity, args.style, out, *((4, 4) if args.smoke else (48, 16)))


def adapter_path(out, seed, data, blocks):
    return out / "adapters" / f"seed{seed}" / f"{data}_{blocks.replace(',', '-')}.safetensors"


def score_path(out, seed, blocks):
    return out / "scores" / f"seed{seed}" / f"{blocks.replace(',', '-')}.json"


def method_path(out, seed, method):
    return out / "methods" / f"seed{seed}" / f"{method}.json"


def pairs_folder(args, out, seed):
    """The probe's counterfactual scenes for this seed (16 of them; --smoke: 2), written once under out/data."""
    name = f"pairs_{args.identity}_{args.style.file_name}_seed{seed}"
    return written_once(out / "data" / name, lambda part: write_pairs(part, 2 if args.smoke else 16,
                                                                       PROBE_SEED + 100 * seed, args.identity,
                                                                       args.style))


def keep(path, out, args):
    """Write the scores and method choices of an earlier results.json under out (files already there win), after
    checking that it was made with this run's pair and settings; say which of its seeds this run's report leaves
    out (it covers --seeds only)."""
    report = read_report(path, ("args", "per image", "choices"), "--kept")
    same = ("identity", "style", "n", "sample_steps", "budget", "rank", "subset_steps", "recipe")
    if diff := [k for k in same if report["args"].get(k) != (args.style.name if k == "style" else vars(args)[k])]:
        sys.exit(f"--kept {path}: made with other {', '.join(diff)} than this run")
    seed_and_set = lambda key: (int(key.split()[0].removeprefix("seed")), key.split()[1])  # "seed3 in0,out3"
    files = {score_path(out, *seed_and_set(key)): r for key, r in report["per image"].items()}
    files |= {method_path(out, int(s), m): c for m, cs in report["choices"].items() if m != "paper"
              for s, c in cs.items()}
    for file, content in files.items():
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(content))
    if left := sorted(set(report["args"]["seeds"]) - set(args.seeds)):
        print(f"this report leaves out seeds {left} of --kept {path} (name them in --seeds to keep them)", flush=True)


def needed(args, out, seed, data, blocks, sets):
    """Is this adapter still needed: a missing score of one of the seed's sets uses it, or (the all-block adapters,
    which ablation and weights read) the choice of a method that reads them is missing?"""
    unscored = {b for b in sets if not score_path(out, seed, b).exists()}
    unchosen = any(not method_path(out, seed, m).exists() for m in args.methods if set(ADAPTERS) & set(NEEDS[m]))
    if blocks == "all" and unchosen:
        return True
    return bool(unscored) if data == "identity" else blocks in unscored


def train_all(args, out, data, wanted, deadline):
    """Train the (seed, data, blocks) adapters not found under out (one found there but trained with another recipe
    stops the run)."""
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    threads = 1 if gpus else max(1, (os.cpu_count() or 1) // args.workers)

    def argv(seed, d, blocks):
        recipe = style_recipe(blocks, args.recipe[d], args.subset_steps) if d == "style" else args.recipe[d]
        return recipe_argv(data[d], blocks, adapter_path(out, seed, d, blocks), recipe, args.device, seed)
    for seed, d, blocks in wanted:
        if adapter_path(out, seed, d, blocks).exists():
            check_kept(adapter_path(out, seed, d, blocks), argv(seed, d, blocks))
    jobs = [(argv(seed, d, blocks), args.device, threads, args.cuda_graph) for seed, d, blocks in wanted
            if not adapter_path(out, seed, d, blocks).exists()]
    print(f"training {len(jobs)} adapters", flush=True)
    return run_jobs(train_job, jobs, args.workers, args.threads, deadline)


# ------------------------------------------------------------------------------------------ choices and scores

def method_choice(args, out, data, seed, method, sd):
    """A method's scores and choice for one seed (cached in methods/)."""
    path = method_path(out, seed, method)
    if path.exists():
        return json.loads(path.read_text())
    argv = ["--identity", str(adapter_path(out, seed, "identity", "all")),
            "--style", str(adapter_path(out, seed, "style", "all")), "--identity-data", str(data["identity"]),
            "--style-data", str(data["style"]), "--method", method, "--budget", str(args.budget_params),
            "--rank", str(args.rank), "--algo", "locon", "--seed", str(seed), "--device", args.device]
    argv += ["--pairs", str(pairs_folder(args, out, seed))] if method == "probe" else []
    argv += ["--images", "2", "--draws", "1"] if args.smoke else []
    r = choose_run(choose_args(argv), sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    return r


def score_job(job, stop=None):
    """Render and judge identity + style(blocks) for a list of (seed, blocks); each result is written at once, and
    on run_jobs' stop the rest are left for the next run."""
    items, out, args = job
    torch.set_num_threads(1 if args.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // args.workers))
    torch.set_flush_denormal(True)
    sd = minisd.load(TINY, device=args.device)
    judge = judges.load(TINY / "judge.safetensors", device=args.device)
    captions = {}  # per training seed, drawn once for all its sets
    for seed, blocks in items:
        if stop and stop.signal:
            return
        eval_seed = EVAL_SEED + 100 * seed  # noise seeds eval_seed + i, i < n: disjoint for n <= 100
        if seed not in captions:
            captions[seed] = prompts("combo", args.n, eval_seed, args.identity, args.style)[0]
        setting = Setting(blocks, ((adapter_path(out, seed, "identity", "all"), None),
                                   (adapter_path(out, seed, "style", blocks), None)))
        images = render_setting(sd, setting, captions[seed], eval_seed, steps=args.sample_steps)
        r, s = rates(judge, images, args.identity, args.style)
        r["per image"] = {k: s[k].tolist() for k in ("identity", "style", "both", "identity_sim", "style_sim")}
        score_path(out, seed, blocks).parent.mkdir(parents=True, exist_ok=True)
        write_thumbs(out, seed, blocks, images)
        score_path(out, seed, blocks).write_text(json.dumps(r))
        print(f"seed {seed} identity + style({blocks}): both {r['both']:.2f}", flush=True)


def thumb_path(out, seed, blocks):
    return score_path(out, seed, blocks).with_suffix(".png")


def write_thumbs(out, seed, blocks, images):
    """The first THUMBS images of a scored setting, one row of a PNG beside its scores (for the figures)."""
    save_png(grid(to_pil(images[:THUMBS]), THUMBS), thumb_path(out, seed, blocks))


def figures(out, seed, scored, family):
    """Paper-style grids of one seed's oracle: identity + style on each single block, and on each in+out pair; a
    column per set with its identity, style and "both" rates over all its images, the first THUMBS images below."""
    from demo import labelled_grid
    read = lambda b: torch.from_numpy(np.array(Image.open(thumb_path(out, seed, b)).convert("RGB"))).permute(2, 0, 1)
    for name, sets in (("singles", [b for b in family if "," not in b]), ("pairs", [b for b in family if "," in b])):
        sets = [b for b in sets if thumb_path(out, seed, b).exists()]
        if sets:
            columns = {b: torch.stack(read(b).float().div(255).chunk(THUMBS, dim=2)) for b in sets}
            rates = {b: {k: scored[seed, b][k] for k in ("identity", "style", "both")} for b in sets}
            labelled_grid(columns, rates, out / f"fig_oracle_{name}_seed{seed}.png")


def score_all(args, out, wanted, deadline):
    todo = [(seed, b) for seed, b in wanted if not score_path(out, seed, b).exists()]
    print(f"scoring {len(todo)} settings", flush=True)
    per = max(1, -(-len(todo) // (args.workers * 3)))  # about three chunks per worker
    jobs = [(todo[i:i + per], out, args) for i in range(0, len(todo), per)]
    return run_jobs(score_job, jobs, args.workers, args.threads, deadline)


# ------------------------------------------------------------------------------------------------- metrics

def kendall_tau(x, y):
    """Kendall tau-b of two equally long lists: (concordant - discordant) / sqrt((n0 - ties_x)(n0 - ties_y))."""
    n, c, d, tx, ty = len(x), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            c, d = c + (sx * sy > 0), d + (sx * sy < 0)
            tx, ty = tx + (sx == 0), ty + (sy == 0)
    n0 = n * (n - 1) / 2
    denom = ((n0 - tx) * (n0 - ty)) ** 0.5
    return float((c - d) / denom) if denom else None


def evaluate_choice(blocks, scores, both, params, budget, family):
    """One method's metrics on one seed; both = {set: "both" rate}, params = {block: parameters}."""
    size = lambda s: sum(params[b] for b in s.split(","))
    fits = [s for s in family if size(s) <= budget]
    best = max(fits, key=lambda s: both[s]) if fits else None
    mine, key = both[",".join(blocks)], ",".join(blocks)
    same = [s for s in family if len(s.split(",")) == len(blocks) and s != key]
    singles = [b for b in COARSE if b in family and scores and b in scores]
    return {"blocks": key, "params": size(key), "both": mine, "oracle best": best,
            "oracle both": both[best] if best else None, "regret": both[best] - mine if best else None,
            "tau": kendall_tau([scores[b] for b in singles], [both[b] for b in singles]) if len(singles) > 1 else None,
            "win rate": float(np.mean([(mine > both[s]) + 0.5 * (mine == both[s]) for s in same])) if same else None}


def mean_of(rows, key):
    """(mean over seeds, seeds, low, high): the 95 % interval from resampling seeds (none with fewer than 2)."""
    vals = [r[key] for r in rows if r[key] is not None]
    if len(vals) < 2:
        return (float(vals[0]) if vals else None, len(vals), None, None)
    return (float(np.mean(vals)), len(vals), *stats.bootstrap_interval({i: np.array([v]) for i, v in enumerate(vals)}))


def versus_paper(choice, paper, scored, seeds):
    """stats.compare of a method's chosen set against the paper's in0+out3, image by image on "both" (same prompts
    and noise within a seed); the paper's direction is the method doing better."""
    per_image = lambda c: {s: scored[s, ",".join(c[s]["blocks"])]["per image"]["both"] for s in seeds}
    return stats.compare(per_image(choice), per_image(paper), +1)


def markdown(report):
    a = report["args"]
    lines = [f"Choosing blocks against the oracle: identity {a['identity']}, style {a['style']}, seeds {a['seeds']}, "
             f"budget {report['budget']:.0f} parameters ({a['budget']}), {a['n']} prompts per setting, "
             f"style adapters on block sets trained {a.get('subset_steps') or 'the recipe'} steps, "
             f"this run (what was not kept already): {report['seconds']} s on {report['device']}.", "",
             "| method | seed | chosen | params | both | oracle best (both) | regret | tau | win rate |",
             "|---" * 9 + "|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"
    for method, per_seed in report["metrics"].items():
        for seed, m in per_seed.items():
            lines.append(f"| {method} | {seed} | {m['blocks']} | {m['params']} | {f(m['both'])} | {m['oracle best']} "
                         f"({f(m['oracle both'])}) | {f(m['regret'])} | {f(m['tau'])} | {f(m['win rate'])} |")
    mean = lambda m: f(m[0]) if m[2] is None else f"{f(m[0])} [{f(m[2])}, {f(m[3])}]"
    lines += ["", "Means over seeds with 95 % intervals (resampling seeds); \"both\" against the paper's in0+out3 is "
              "paired image by image (experiments/stats.py):", "",
              "| method | regret | tau | win rate | both - paper's (interval) | verdict |", "|---|---|---|---|---|---|"]
    for method, (reg, tau, win) in report["means"].items():
        v = report["versus paper"].get(method)
        vs = f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}] | {stats.judgement(v)}" if v else "- | -"
        lines.append(f"| {method} | {mean(reg)} | {mean(tau)} | {mean(win)} | {vs} |")
    lines += ["", "Oracle, \"both\" per set and seed:", "", "| set | " + " | ".join(map(str, a["seeds"])) + " |",
              "|---" * (len(a["seeds"]) + 1) + "|"]
    for s in a["family"]:
        lines.append(f"| {s} | " + " | ".join(f(report["both"][str(seed)][s]) for seed in a["seeds"]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.budget_s if args.budget_s else None
    data = data_sets(args, out)
    if args.kept:
        keep(args.kept, out, args)
    base = [(s, "identity", "all") for s in args.seeds]
    base += [(s, "style", b) for s in args.seeds for b in ["all", *args.family]]
    base = [(s, d, b) for s, d, b in base if needed(args, out, s, d, b, args.family)]
    if not train_all(args, out, data, base, deadline):
        return
    sd = minisd.load(TINY, device=args.device)
    params = choose.block_parameters(sd.unet, args.rank, "locon")
    spec = args.budget
    args.budget_params = sum(params[b] for b in spec.split(",")) if spec[:1].isalpha() else spec
    budget = choose.resolve_budget(args.budget_params, params)
    choices = {m: {s: method_choice(args, out, data, s, m, sd) for s in args.seeds} for m in args.methods}
    choices["paper"] = {s: {"blocks": ["in0", "out3"], "scores": None} for s in args.seeds}
    del sd
    chosen = {(s, ",".join(c[s]["blocks"])) for c in choices.values() for s in args.seeds}
    sets = {s: [b for ss, b in chosen if ss == s] for s in args.seeds}
    more = dict.fromkeys(job for s, b in sorted(chosen) for job in ((s, "identity", "all"), (s, "style", b)))
    more = [(s, d, b) for s, d, b in more if needed(args, out, s, d, b, sets[s])]
    if not train_all(args, out, data, more, deadline):
        return
    wanted = sorted({(s, b) for s in args.seeds for b in args.family} | chosen)
    if not score_all(args, out, wanted, deadline):
        return
    scored = {(s, b): json.loads(score_path(out, s, b).read_text()) for s, b in wanted}
    both = {s: {b: scored[s, b]["both"] for ss, b in wanted if ss == s} for s in args.seeds}
    metrics = {m: {s: evaluate_choice(c[s]["blocks"], c[s]["scores"], both[s], params, budget, args.family)
                   for s in args.seeds} for m, c in choices.items()}
    means = {m: [mean_of(list(rows.values()), k) for k in ("regret", "tau", "win rate")] for m, rows in metrics.items()}
    versus = {m: versus_paper(choices[m], choices["paper"], scored, args.seeds) for m in args.methods}
    report = {"args": {**vars(args), "style": args.style.name}, "budget": budget, "params": params,
              "seconds": round(time.time() - t0), "device": torch.cuda.get_device_name(0)
              if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
              "choices": {m: {str(s): c for s, c in cs.items()} for m, cs in choices.items()},
              "both": {str(s): v for s, v in both.items()}, "metrics": metrics, "means": means,
              "versus paper": versus,
              "per image": {f"seed{s} {b}": r for (s, b), r in scored.items()}}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(json.loads(json.dumps(report, default=str)))  # the report as its JSON reads back
    (out / "results.md").write_text(table)
    figures(out, args.seeds[0], scored, args.family)
    print(table)
    print(f"wrote {out}/results.md, results.json, fig_oracle_*.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
