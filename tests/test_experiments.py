"""experiments/: blockwise.py and gates.py, their parts, and the smoke runs of blockwise.py and choose_eval.py."""
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyworld import CHARACTER, HELD_STYLE, IDENTITY, Scene, Style, judge, render
from tinyworld.evaluate import interval
from tinyfiles import images, tiny, train_argv  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import blockwise  # noqa: E402
import gates  # noqa: E402
import stats  # noqa: E402


def test_style_subsets_skip_blocks_lora_cannot_adapt():
    # SD 1.x (and minisd-tiny) have no attention at the lowest resolution: in3 and out0 hold only ResBlocks and
    # samplers, which LoRA-LierLa leaves alone, so "in3" adapts nothing and "in0,out0" the same layers as "in0"
    lora_subsets, locon_subsets = blockwise.style_subsets("full", "lora"), blockwise.style_subsets("full", "locon")
    assert len(locon_subsets) == 9 + 16 and "in3" in locon_subsets and "in3,out0" in locon_subsets
    assert "in3" not in lora_subsets and "out0" not in lora_subsets and "in0,out0" not in lora_subsets
    assert "in0,out3" in lora_subsets and len(lora_subsets) == 7 + 9


def test_renders_cover_the_protocol_settings():
    """Every setting at the main guidance; the claims' settings at the other guidances; on the full sweep the style
    weight curves of the all-block and the in0+out3 adapters."""
    small = blockwise.renders("small", "locon", [5.0, 2.0, 7.5])
    main = [r for r in small if r[1] == 5.0]
    assert [r[0] for r in main] == [t for t, *_ in blockwise.settings("small", "locon")]
    assert sorted(r[0] for r in small if r[1] == 2.0) == sorted(f"{t} g=2" for t in blockwise.GUIDED)
    assert all(r[5] == 1.0 and r[6] is None for r in small)
    full = {r[0]: r for r in blockwise.renders("full", "locon", [5.0])}
    assert full["id + style(in0,out3) x0.25"][2:] == ("in0,out3", None, True, 0.25, None)
    assert full["style only(in0)"][2:] == ("in0", None, False, 1.0, None)
    assert full["id to 1/2, style(all) from 1/2"][2:6] == ("all", None, True, 1.0)
    assert {t for t in full if " x" in t} == {f"id + style({s}) x{w}" for s in ("all", "in0,out3")
                                             for w in blockwise.STYLE_WEIGHTS}


def test_step_ranges_split_the_sampling_steps():
    """The step-range baseline over 30 steps: the identity on steps 1-15, the style on 16-30 (lora-block-weight's
    start=16); "from 1/3": the style from step 11."""
    split = blockwise.step_table(blockwise.STEP_RANGES["id to 1/2, style(all) from 1/2"], 30)
    assert split == {"identity": [True] * 15 + [False] * 15, "style": [False] * 15 + [True] * 15}
    assert blockwise.step_table(blockwise.STEP_RANGES["id + style(all) style from 1/3"], 30) == {
        "style": [False] * 10 + [True] * 20}


def test_training_uses_the_world_recipe_unless_told(tmp_path):
    """The adapters train with tinyworld.evaluate's recipes (those the gates checked); --steps / --lr override them,
    and train.py reads the overriding flag (argparse keeps the last)."""
    from types import SimpleNamespace

    import train
    from tinyworld.evaluate import IDENTITY_RECIPE, STYLE_RECIPE
    from tinyworld.world import HELD_STYLE
    args = SimpleNamespace(algos=["lora"], seeds=[0], sweep="small", full_seeds=1, small_seeds=1, te_rank=0, rank=8,
                           steps=None, lr=None, subset_steps=None, identity=IDENTITY, style=HELD_STYLE)
    parse = lambda argv: train.parse_args(argv + ["--ckpt", "x"])
    argvs = lambda: [argv for pair in blockwise.training_jobs(args, tmp_path, settings={}).values() for argv in pair]
    jobs = {Path(j[j.index("--out") + 1]).stem: parse(j) for j in argvs()}
    assert Path(jobs["identity_all"].data) == ROOT / "data" / "identity"  # the main pair trains on the shipped sets
    assert Path(jobs["style_all"].data) == ROOT / "data" / "style"
    recipe = lambda flags, key: float(flags.split(f"--{key} ")[1].split()[0])
    assert jobs["identity_all"].lr == recipe(IDENTITY_RECIPE, "lr") and jobs["style_all"].lr == recipe(STYLE_RECIPE, "lr")
    assert jobs["identity_all"].steps == recipe(IDENTITY_RECIPE, "steps") and jobs["style_all"].algo == "lora"
    args.steps, args.lr = 200, 5e-3
    jobs = [parse(j) for j in argvs()]
    assert all(a.steps == 200 and a.lr == 5e-3 and a.algo == "lora" for a in jobs)
    args.subset_steps = 12800  # --subset-steps: the style adapters on a block subset only, over --steps
    jobs = {Path(j[j.index("--out") + 1]).stem: parse(j) for j in argvs()}
    assert {k: a.steps for k, a in jobs.items()} == {"identity_all": 200, "style_all": 200, "style_in0+out3": 12800,
                                                     "style_in0": 12800, "style_out3": 12800, "style_mid": 12800}


def test_seeds_past_small_seeds_train_the_style_on_all_blocks_and_in0_out3_alone(tmp_path):
    """--small-seeds N: the first N of --seeds train --sweep's subsets (the first --full-seeds of them the full
    sweep's, the others the small sweep's), the seeds after them only what claims 1-3 and 3m read."""
    from types import SimpleNamespace
    args = SimpleNamespace(algos=["locon"], seeds=[3, 0, 1], sweep="full", full_seeds=1, small_seeds=2, te_rank=0,
                           rank=8, steps=None, lr=None, subset_steps=12800, identity=IDENTITY, style=HELD_STYLE)
    jobs = blockwise.training_jobs(args, tmp_path, settings={})
    trained = {seed: sorted(Path(j[j.index("--out") + 1]).stem for j in argvs) for (_, seed), argvs in jobs.items()}
    names = lambda subsets: sorted(["identity_all", "style_all"] + [f"style_{s.replace(',', '+')}" for s in subsets])
    assert trained[3] == names(blockwise.style_subsets("full", "locon")) and len(trained[3]) == 2 + 9 + 16
    assert trained[0] == names(["in0,out3", "in0", "out3", "mid"])
    assert trained[1] == names(["in0,out3"])


def test_a_kept_adapter_from_another_recipe_stops_the_run():
    """blockwise.py and gates.py keep adapters already under --out; one whose kohya metadata names other --steps or
    --lr than the run asks stops it in one line, naming the file (the shipped adapters: 1600 steps at lr 5e-3)."""
    import shlex

    from tinyworld.evaluate import STYLE_RECIPE, check_kept, style_recipe
    kept = ROOT / "weights" / "tiny" / "adapters" / "rings-8-0" / "style_all.safetensors"
    check_kept(kept, ["--data", "x", *shlex.split(STYLE_RECIPE)])  # the recipe it was trained with: kept
    check_kept(kept, ["--lr", "5e-3", "--steps", "9", "--steps", "1600"])  # the last flag counts, as in argparse
    for flags in (style_recipe("in0", subset_steps=12800), STYLE_RECIPE + " --lr 0.01"):
        with pytest.raises(SystemExit) as stop:
            check_kept(kept, shlex.split(flags))
        assert str(stop.value).startswith(f"{kept}: kept from a run with --")
    assert style_recipe("all", subset_steps=12800) == STYLE_RECIPE == style_recipe("in0")


def test_summary_is_a_t_interval_over_seed_means():
    per_seed = {0: {m: [1, 1, 0, 0] for m in blockwise.METRICS}, 1: {m: [1, 1, 1, 1] for m in blockwise.METRICS},
                2: {m: [1, 0, 0, 0] for m in blockwise.METRICS}}
    s = blockwise.summarize(per_seed)  # seed means 0.5, 1.0, 0.25: mean 0.5833, sd 0.3819, t(2) = 4.3027
    assert s["seeds"] == 3
    assert s["identity"][0] == pytest.approx(0.58333, abs=1e-4)
    assert s["identity"][1] == pytest.approx(4.302653 * 0.381881 / 3 ** 0.5, abs=1e-4)


def test_claims_compare_the_paper_settings_image_by_image():
    """Claim 3 from hand-made outcomes (in0+out3 "both" beats all-block on 2 more images of 4 in each seed), claim 4
    averaging the upper and the lower singles per image over the seeds that have them all, and claims whose
    settings the sweep lacks left out."""
    both = lambda *seeds: {s: {"both": v, "identity": v} for s, v in enumerate(seeds)}
    rows = {"id + style(in0,out3)": both([1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 0, 0]),
            "id + style(all)": both([1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]),
            "id + style(in0)": both([1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]),
            "id + style(out3)": both([1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]),
            "id + style(mid)": both([0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])}
    tested = blockwise.claims(rows, n_boot=500)
    assert [c[0] for c in tested] == ["3", "4"]  # no identity-only and no inference-weights settings
    c3, c4 = tested[next(iter(tested))], tested[list(tested)[1]]
    assert c3["mean"] == pytest.approx(0.5) and c3["verdict"] == "holds" and c3["seeds"] == 4
    assert c4["seeds"] == 3  # seed 3 trained no single block (--small-seeds): claim 4 pairs the seeds that did
    assert c4["mean"] == pytest.approx((0.375 - 0 + 0.75 - 0.25 + 0.25 - 0) / 3)  # (in0 + out3) / 2 - mid
    lines = blockwise.claims_markdown(tested, {"G1": True, "G2": False})
    assert len(lines) == 4 and all("not judged (gate)" in line for line in lines[2:])
    # gates met, but 4 seeds are fewer than the protocol's 8: the interval's reading is shown, not judged
    assert "| not judged: 4 of " in blockwise.claims_markdown(tested, {"G1": True})[2]
    assert "seeds (interval alone: holds) |" in blockwise.claims_markdown(tested, {"G1": True})[2]


def test_claims_read_back_from_json_keep_their_interval():
    """The bootstrap's draws follow the seeds' order, and a report read back from JSON keys its seeds by string
    ("10" sorts before "2"): eleven seeds give the same interval with int and with str keys."""
    rng = np.random.default_rng(0)
    rows = {t: {s: {"both": rng.integers(0, 2, 8).tolist()} for s in range(11)}
            for t in ("id + style(in0,out3)", "id + style(all)")}
    as_json = json.loads(json.dumps(rows))
    assert list(as_json["id + style(all)"])[:3] == ["0", "1", "2"]
    mine, read_back = blockwise.claims(rows, n_boot=300), blockwise.claims(as_json, n_boot=300)
    swapped = {t: {s: per[str((int(s) + 5) % 11)] for s in per} for t, per in as_json.items()}  # seeds relabelled
    interval = lambda tested: [(r["low"], r["high"]) for r in tested.values()]
    assert interval(read_back) == interval(mine)
    assert interval(blockwise.claims(swapped, n_boot=300)) != interval(mine)  # so the order is what the test holds


def test_claim_3_at_matched_style_strength_takes_the_nearest_weight():
    """With the full sweep's trade-off rows, claim 3 is also compared against the all-block style adapter at the
    weight whose style rate (mean over seeds) is nearest the in0+out3 adapter's. G2 does not bind that row (issue 18's
    gate: "or the comparison is made at matched style strength") and G4 is read on its own baseline (G4m); every
    other gate binds it."""
    rate = lambda style, both: {s: {"style": style, "both": both, "identity": both} for s in range(2)}
    rows = {"id + style(in0,out3)": rate([1, 1, 0, 0], [1, 0, 1, 0]),  # style 0.5
            "id + style(all)": rate([1, 1, 1, 1], [0, 0, 0, 0]),  # 1.0
            "id + style(all) x0.5": rate([1, 1, 1, 0], [1, 0, 0, 0]),  # 0.75
            "id + style(all) x0.25": rate([1, 0, 0, 0], [0, 0, 0, 0])}  # 0.25: as near as 0.75; the first listed wins
    assert blockwise.matched_weight(rows) == "id + style(all) x0.25"
    rows["id + style(all) x0.75"] = rate([1, 1, 0, 0], [0, 0, 0, 0])  # 0.5: the nearest
    tested = blockwise.claims(rows, n_boot=200)
    matched = tested[blockwise.MATCHED]
    assert matched["b"] == ["id + style(all) x0.75"] and matched["mean"] == pytest.approx(0.5)
    gates = {"G1": True, "G2 style only": False, "G4 identity + style (all)": False, "G4m matched": True}
    lines = blockwise.claims_markdown(tested, gates)
    assert "not judged (gate)" in lines[2] and "(b: id + style(all) x0.75)" in lines[3]
    assert "not judged (gate)" not in lines[3]  # neither G2 nor G4 at weight 1 binds it; 2 seeds do
    assert "not judged (gate)" in blockwise.claims_markdown(tested, {**gates, "G4m matched": False})[3]
    assert "not judged (gate)" in blockwise.claims_markdown(tested, {**gates, "G1": False})[3]
    assert blockwise.binds("G4m matched", "3 style on in0+out3 ...") is False
    assert blockwise.matched_weight({k: v for k, v in rows.items() if " x" not in k}) is None  # no trade-off rows


def test_gates_are_read_on_the_runs_own_seeds():
    """G1, G2 and G4 come from the run's own means over seeds; G3 and any problem with gates.py's report from the
    report; a row the run lacks (style only on in0+out3 in the small sweep) is a gate not met."""
    summary = {"identity only": {"identity": (0.93, 0.02)}, "style only": {"style": (0.91, 0.03)},
               "style only(in0,out3)": {"style": (0.95, 0.02)}, "id + style(all)": {"both": (0.19, 0.04)}}
    reported = {"G1 identity-only identity >= 0.90": False, "G3 VAE round trip both >= 0.95": True}
    g = blockwise.run_gates(summary, reported)
    assert [ok for name, ok in g.items() if name.startswith(("G1", "G2", "G3", "G4"))] == [True, True, False, True]
    assert len(g) == 4  # gates.py's own G1 reading is replaced, not added
    summary["id + style(all)"]["both"] = (0.2, 0.04)
    assert all(blockwise.run_gates(summary, reported).values())
    del summary["style only(in0,out3)"]
    assert not blockwise.run_gates(summary, reported)["G2 style only: style >= 0.90 (all; in0,out3)"]
    missing = blockwise.run_gates(summary, {"out/gates.json missing: run python experiments/gates.py": False})
    assert list(missing)[-1].startswith("out/gates.json missing") and not all(missing.values())
    summary["id + style(all) x0.5"] = {"both": (0.35, 0.05)}  # claim 3m's baseline: G4 read on it too (G4m)
    g = blockwise.run_gates(summary, reported, matched="id + style(all) x0.5")
    assert g["G4m id + style(all) x0.5: both in [0.2, 0.7]"] is True


def test_wilson_interval_by_hand():
    # 8 hits of 10, z = 1.96: centre (0.8 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.71679, half-width
    # 1.96 * sqrt(0.016 + 1.96^2 / 400) / 1.38416 = 0.22658, by hand
    lo, hi = interval([True] * 8 + [False] * 2)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)


def test_silhouette_iou_of_a_ground_truth_render():
    me = Scene(CHARACTER, "red", "gray", Style("flat"), "small", "left", member=IDENTITY)
    image, mask = render(me)
    x = judge.to_tensor([image])
    assert blockwise.silhouette_iou(x, [me], mask[None])[0] > 0.9  # the character's own pixels
    empty = torch.full_like(x, 128 / 255)  # just the gray background
    assert blockwise.silhouette_iou(empty, [me], mask[None])[0] == 0
    moved = Scene(CHARACTER, "red", "gray", Style("flat"), "small", "right", member=IDENTITY)
    assert blockwise.silhouette_iou(x, [moved], render(moved)[1][None])[0] < 0.5  # right shape, wrong place


def test_gate_verdicts():
    r = {"identity only": {"identity": 0.95}, "style only (all)": {"style": 0.93},
         "style only (in0,out3)": {"style": 0.89}, "identity + style (all)": {"both": 0.45}}
    v = gates.verdicts(r, ceiling=0.97)
    assert list(v.values()) == [True, False, True, True]  # G2 needs every block subset at 0.90
    r["identity + style (all)"]["both"] = 0.75  # too little conflict to show
    assert not gates.verdicts(r, ceiling=0.94)["G4 identity + style (all) both in [0.2, 0.7]"]


def test_a_held_out_pair_gets_its_own_sets_and_bad_ids_one_line(tmp_path, capsys):
    """gates.py and choose_eval.py take --identity ID --style NAME: the main pair at the shipped size reads data/;
    another pair gets sets of its member and style written once (seed 0); an id that is not held out is refused."""
    import argparse

    from tinyworld.evaluate import held_pair, pair_data
    from tinyworld.world import HELD_STYLE, RESERVED_MEMBERS
    assert pair_data(IDENTITY, HELD_STYLE, tmp_path) == {"identity": ROOT / "data" / "identity",
                                                         "style": ROOT / "data" / "style"}
    p = argparse.ArgumentParser()
    member, style = held_pair(p, RESERVED_MEMBERS[0], "bricks/6")
    assert style == Style("bricks", 6)
    sets = pair_data(member, style, tmp_path, 2, 3)
    assert sorted(p.name for p in sets["style"].glob("*.png")) == ["000.png", "001.png", "002.png"]
    assert all("sks character" in t.read_text() for t in sets["identity"].glob("*.txt"))
    assert all(t.read_text().endswith("zwx style\n") for t in sets["style"].glob("*.txt"))
    assert not list(tmp_path.glob("data/*.part"))
    first = sets["identity"] / "000.png"
    first.write_bytes(b"kept")  # an existing set is reused, not rewritten
    assert pair_data(member, style, tmp_path, 2, 3) == sets and first.read_bytes() == b"kept"
    for bad in ((IDENTITY, "rings/7"), (-1, "rings/8")):
        with pytest.raises(SystemExit):
            held_pair(p, *bad)
        assert capsys.readouterr().err.strip().splitlines()[-1].split(": error: ")[1].startswith(
            "--style rings/7" if bad[1] == "rings/7" else "--identity -1")


def test_a_bad_comma_list_is_one_line_naming_its_flag(capsys):
    """--seeds and --guidance (blockwise.py, choose_eval.py; gates.py's --style-weights has the same type) are read
    by argparse: a bad item stops the script in one line naming the flag, before any work; so does a negative
    --full-seeds or --small-seeds."""
    import choose_eval
    for parse, flag, value, kind in ((blockwise.parse_args, "--seeds", "0,x", "integers"),
                                     (blockwise.parse_args, "--guidance", "5,a", "numbers"),
                                     (choose_eval.parse_args, "--seeds", "1;2", "integers")):
        with pytest.raises(SystemExit):
            parse([flag, value])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.endswith(f"argument {flag}: invalid {kind} value: '{value}'"), last
    with pytest.raises(SystemExit):  # a count of seeds
        blockwise.parse_args(["--small-seeds", "-1"])
    assert capsys.readouterr().err.strip().endswith("--small-seeds counts seeds: 0 or more, got -1")
    args = blockwise.parse_args(["--seeds", "0,1,7", "--guidance", "5,2,7.5"])
    assert args.seeds == [0, 1, 7] and args.guidance == [5.0, 2.0, 7.5]
    assert args.full_seeds == args.small_seeds == 3  # every seed trains --sweep's subsets unless told


def test_a_bad_report_file_is_one_line_naming_its_flag(tmp_path):
    """blockwise.py --gates and choose_eval.py --kept read an earlier run's JSON: one that does not parse, or is
    another script's report, stops the run in one line naming the flag and the file (a missing gates report is a
    gate not met, as before)."""
    import choose_eval
    (tmp_path / "cut.json").write_text('{"recipe": {"identity": 5')  # a report cut off mid-write
    with pytest.raises(SystemExit, match=r"^--gates .*cut.json: not a readable JSON report \("):
        blockwise.read_gates(tmp_path / "cut.json")
    gates_report = ROOT / "docs" / "blockwise" / "bricks6_gates.json"
    with pytest.raises(SystemExit, match=r"^--kept .*bricks6_gates.json: not the report this flag takes \(it needs "
                                         r"args, per image, choices\)$"):
        choose_eval.keep(gates_report, tmp_path, None)
    assert list(blockwise.read_gates(tmp_path / "none.json").values()) == [False]


def test_the_claims_read_the_gates_of_their_own_pair(tmp_path):
    """blockwise.py --identity/--style: a gates report counts only for the pair it was made with (one made before
    gates.py took pairs, with recipe flags where the ids are now, is the main pair's)."""
    from tinyworld.world import HELD_STYLE
    met = {"G1": True, "G2": True}
    path = tmp_path / "gates.json"
    for name in ("bricks/6/0", "bricks/6"):  # the style's full name, or as --style took it
        path.write_text(json.dumps({"recipe": {"identity": IDENTITY, "style": name}, "gates": met}))
        assert blockwise.read_gates(path, IDENTITY, Style("bricks", 6)) == met
    other = blockwise.read_gates(path, IDENTITY, HELD_STYLE)
    assert list(other.values()) == [False] and "style bricks/6" in next(iter(other))
    path.write_text(json.dumps({"recipe": {"identity": "--algo locon", "style": "--algo locon"}, "gates": met}))
    assert blockwise.read_gates(path, IDENTITY, HELD_STYLE) == met
    assert list(blockwise.read_gates(path, IDENTITY, Style("bricks", 6)).values()) == [False]
    path.write_text(json.dumps({"recipe": {"identity": IDENTITY, "style": "bricks/6/0", "subset_steps": 12800},
                                "gates": met}))  # and only for the block subsets' training length it was made with
    assert blockwise.read_gates(path, IDENTITY, Style("bricks", 6), subset_steps=12800) == met
    other = blockwise.read_gates(path, IDENTITY, Style("bricks", 6))
    assert list(other.values()) == [False] and "--subset-steps 12800" in next(iter(other))


def test_a_settings_global_weight_scales_its_adapter(tmp_path):
    """tinyworld.evaluate.render_setting's (file, block weights, weight): weight 0 renders the base model's images,
    weight 0.5 those of the adapter loaded at 0.5 by hand (gates.py --style-weights); a file named as blockwise.py
    names its block subsets (style_in0+out3.safetensors: '+' is no adapter-name character) renders too."""
    import lora
    import minisd
    from tinyworld.evaluate import Setting, prompts, render_setting
    sd = minisd.load(ROOT / "weights" / "tiny")
    style = ROOT / "weights" / "tiny" / "adapters" / "rings-8-0" / "style_all.safetensors"
    captions = prompts("combo", 2, 0)[0]
    sample = lambda: sd.sample(captions, steps=2, guidance=5.0, seed=0, progress=False)
    base = sample()
    lora.load(style, sd.unet, name="by_hand", weight=0.5)
    by_hand = sample()
    lora.remove(sd.unet, "by_hand")
    render = lambda w: render_setting(sd, Setting("style", ((style, None, w),)), captions, 0, steps=2)
    rel = lambda a, b: (torch.dist(a.double(), b.double()) / b.double().norm()).item()
    assert rel(render(0.0), base) < 1e-5 and rel(render(0.5), by_hand) < 1e-5 and rel(by_hand, base) > 1e-2
    assert not lora.adapter_names(sd.unet)  # the model is left as it was
    subset = tmp_path / "style_in0+out3.safetensors"
    shutil.copy(style, subset)
    assert rel(render_setting(sd, Setting("style", ((subset, None, 0.5),)), captions, 0, steps=2), by_hand) < 1e-5


def shipped_meta(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata(), list(f.keys())


def demo_args(**kw):
    import argparse
    return argparse.Namespace(**{"train": False, "out": "unused", "device": "cpu", **kw})


def last_value(argv, flag):
    """The value of a flag's last occurrence in an argv, the one argparse keeps."""
    return argv[len(argv) - argv[::-1].index(flag)]


@pytest.mark.parametrize("style", ["bricks/6/0", "rings/8/0"])
def test_the_shipped_adapters_are_the_recipe_on_the_shipped_data(style):
    """weights/tiny/adapters were trained by `demo.py --train`: their kohya metadata name the recipe's steps (the
    style's subset steps for in0 + out3), lr and rank, the image counts of the sets the pair trains on and the block
    sets (in0 + out3 only for the block-wise style adapter)."""
    import re
    import shlex

    import demo
    from tinyworld.evaluate import IDENTITY_RECIPE, shipped_adapters, style_recipe
    from tinyworld.world import held_style
    files = demo.adapter_files(demo_args(), held_style(style))
    counts = {"identity": 48, "style": 16}  # tinyworld.evaluate.pair_data's sets (data/ holds rings/8's)
    assert [len(list((ROOT / "data" / split).glob("*.png"))) for split in counts] == list(counts.values())
    assert files["identity"] == ROOT / "weights" / "tiny" / "adapters" / "identity.safetensors"
    for name, (split, blocks) in demo.ADAPTERS.items():
        flags = shlex.split(IDENTITY_RECIPE if split == "identity"
                            else style_recipe(blocks, subset_steps=demo.STYLES[style]))
        meta, keys = shipped_meta(files[name])
        assert files[name].parent == (shipped_adapters(held_style(style)) if split == "style"
                                      else ROOT / "weights" / "tiny" / "adapters")
        assert (meta["ss_steps"], float(meta["ss_learning_rate"]), meta["ss_network_dim"]) == \
            tuple(t(last_value(flags, f)) for t, f in ((str, "--steps"), (float, "--lr"), (str, "--rank")))
        assert int(meta["ss_num_train_images"]) == counts[split]
        found = {re.match(r"lora_unet_(down_blocks_\d|mid_block|up_blocks_\d)", k).group(1) for k in keys}
        everywhere = {f"down_blocks_{i}" for i in range(4)} | {"mid_block"} | {f"up_blocks_{i}" for i in range(4)}
        assert found == ({"down_blocks_0", "up_blocks_3"} if blocks == "in0,out3" else everywhere), (name, found)
    assert demo.STYLES == {"bricks/6/0": 12800, "rings/8/0": None}


@pytest.mark.parametrize("style, chosen", [("bricks/6/0", "in0,out3"), ("rings/8/0", "in1")])
def test_the_shipped_chosen_adapter_is_on_the_blocks_its_shipped_scores_choose(style, chosen):
    """The chosen style adapter was trained by `demo.py --train` on the rank table choose_blocks.py wrote beside the
    style adapters: the table is the greedy choice from the shipped block scores within in0 + out3's parameters, and
    the adapter adapts exactly those blocks with the style's recipe; for bricks/6 the tool chose in0 + out3, whose
    adapter the demo then uses (no second copy ships)."""
    import demo
    from lora.choose import choose_blocks
    from tinyworld.evaluate import shipped_adapters
    from tinyworld.world import held_style
    folder = shipped_adapters(held_style(style))
    scores = json.loads((folder / "style_chosen_blocks.scores.json").read_text())
    assert scores["budget"] == demo.budget_of_in0_out3() == 97536  # 35,840 (in0) + 61,696 (out3)
    blocks, spec = choose_blocks(scores["scores"], scores["params"], scores["budget"])
    assert json.loads((folder / "style_chosen_blocks.json").read_text()) == {"dims": spec}
    assert ",".join(blocks) == chosen
    file = demo.adapter_files(demo_args(), held_style(style))[demo.CHOSEN]
    assert demo.coarse_blocks(file) == chosen
    assert (file.name == "style_in0_out3.safetensors") == (chosen == "in0,out3")
    assert (folder / "style_chosen.safetensors").exists() == (chosen != "in0,out3")
    meta, _ = shipped_meta(file)
    steps = demo.STYLES[style] or 1600
    assert (meta["ss_steps"], meta["ss_learning_rate"], meta["ss_num_train_images"]) == (str(steps), "0.005", "16")


def test_demo_train_runs_the_styles_recipe_and_trains_the_chosen_blocks_only_when_new(tmp_path, monkeypatch):
    """demo.py --train: the identity and style adapters with the style's step counts (bricks/6: 12800 on in0 +
    out3), choose_blocks.py --out a table beside them, and a fourth adapter only when the table is not in0 + out3's."""
    import choose_blocks
    import demo
    import train
    from tinyworld.world import held_style
    for table, trained in (("in0=8,out3=8", 3), ("in1=8", 4)):
        runs = []
        monkeypatch.setattr(train, "main", lambda argv: runs.append(argv))
        monkeypatch.setattr(choose_blocks, "main", lambda argv: Path(argv[argv.index("--out") + 1]).write_text(
            json.dumps({"dims": table})))
        out = tmp_path / table
        files = demo.adapter_files(demo_args(train=True, out=str(out)), held_style("bricks/6"))
        assert [(last_value(a, "--blocks"), last_value(a, "--steps")) for a in runs] == [
            ("all", "1600"), ("all", "1600"), ("in0,out3", "12800"),
            *([(str(out / "style_chosen_blocks.json"), "12800")] if trained == 4 else [])]
        assert [Path(last_value(a, "--out")).name for a in runs[:3]] == [
            "identity.safetensors", "style_all.safetensors", "style_in0_out3.safetensors"]
        assert files["identity"] == out / "identity.safetensors"
        chosen = "style_chosen.safetensors" if trained == 4 else "style_in0_out3.safetensors"
        assert files[demo.CHOSEN] == out / chosen
        data = out / "data"
        assert [last_value(a, "--data") for a in runs] == [
            str(data / "identity_501_bricks-6-0_48"), *[str(data / "style_501_bricks-6-0_16")] * (trained - 1)]


@pytest.mark.parametrize("style, titles", [
    ("bricks/6", ("identity only", "style only (all)", "+ style, all blocks", "+ style, in0+out3 (chosen)")),
    ("rings/8", ("identity only", "style only (all)", "+ style, all blocks", "+ style, in0+out3",
                 "+ style, in1 (chosen)"))])
def test_demo_writes_its_grid_with_the_shipped_adapters(tmp_path, capsys, style, titles):
    """A column per setting: for bricks/6 the tool chose in0 + out3, so that column is also the chosen one."""
    import demo
    from PIL import Image
    demo.main(["--out", str(tmp_path), "--style", style, "--sample-steps", "2", "--device", "cpu"])
    printed = [line.split(" identity ")[0].strip() for line in capsys.readouterr().out.splitlines()[:-1]]
    assert Image.open(tmp_path / "grid.png").size == (len(titles) * 128, 56 + 4 * 128)  # settings x 4 prompts
    assert tuple(printed) == titles


def test_demo_refuses_a_style_without_shipped_adapters(capsys):
    import demo
    with pytest.raises(SystemExit):
        demo.main(["--style", "zigzag/8"])
    assert "argument --style: 'zigzag/8': one of bricks/6/0, rings/8/0" in capsys.readouterr().err


def test_eyecheck_reads_the_shipped_a_gates_or_a_claim_seed_folder(tmp_path, capsys):
    """eyecheck.py --adapters: a gates.py --out folder (identity_all.safetensors beside the style adapters) or a
    blockwise.py seed folder (the in0 + out3 style named style_in0+out3.safetensors), or by default the shipped
    adapters of --style (the identity one folder up); the five settings are the gates'. A style with no shipped
    adapters and no --adapters stops in one line."""
    import eyecheck
    shipped = eyecheck.settings(ROOT / "weights" / "tiny" / "adapters" / "rings-8-0")
    assert [s.title for s, _ in shipped] == ["identity only", "style only (all)", "style only (in0,out3)",
                                            "identity + style (all)", "identity + style (in0,out3)"]
    assert shipped[0][0].adapters[0][0] == ROOT / "weights" / "tiny" / "adapters" / "identity.safetensors"
    assert all(path.exists() for setting, _ in shipped for path, _ in setting.adapters)
    (tmp_path / "identity_all.safetensors").touch()
    assert eyecheck.settings(tmp_path)[0][0].adapters[0][0] == tmp_path / "identity_all.safetensors"
    assert eyecheck.settings(tmp_path)[2][0].adapters[0][0] == tmp_path / "style_in0_out3.safetensors"  # gates.py's
    (tmp_path / "style_in0+out3.safetensors").touch()  # a blockwise.py seed folder's name for it
    assert eyecheck.settings(tmp_path)[2][0].adapters[0][0] == tmp_path / "style_in0+out3.safetensors"
    with pytest.raises(SystemExit):
        eyecheck.main(["render", "--style", "zigzag/8", "--out", str(tmp_path / "eye")])
    assert "--style zigzag/8/0: no shipped adapters" in capsys.readouterr().err


def test_eyecheck_agreement_and_kappa_by_hand(tmp_path):
    import eyecheck
    # eye 1 1 0 0 0, judge 1 0 0 0 1: agree 3/5; chance 0.4*0.4 + 0.6*0.6 = 0.52; kappa (0.6-0.52)/0.48 = 1/6
    r = eyecheck.agreement([1, 1, 0, 0, 0], [1, 0, 0, 0, 1])
    assert r["agreement"] == pytest.approx(0.6) and r["kappa"] == pytest.approx(1 / 6)
    assert r["table [eye no/yes][judge no/yes]"] == [[2, 1], [1, 1]]
    (tmp_path / "l.txt").write_text("# a comment\n0 1 0\n1 0 1\n")
    assert eyecheck.read_labels(tmp_path / "l.txt", 2) == {0: (True, False), 1: (False, True)}
    (tmp_path / "l.txt").write_text("0 1 0\n")
    with pytest.raises(ValueError, match="2 images, 1 labels; missing \\[1\\]"):
        eyecheck.read_labels(tmp_path / "l.txt", 2)
    (tmp_path / "l.txt").write_text("0 yes 0\n1 0 0\n")
    with pytest.raises(ValueError, match="l.txt:1: expected"):
        eyecheck.read_labels(tmp_path / "l.txt", 2)


def test_eyecheck_score_names_a_missing_file_in_one_line(tmp_path, capsys):
    """score without a render's key.json, or with a --labels / --second-labels file that is not there, stops in one
    line naming the flag and the file."""
    import eyecheck
    (tmp_path / "l.txt").write_text("0 1 0\n")
    score = lambda argv: eyecheck.main(["score", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit):
        score(["--labels", str(tmp_path / "l.txt")])  # no render yet: no key.json
    assert capsys.readouterr().err.strip().endswith(f"--out: no file {tmp_path / 'key.json'} (run render first)")
    (tmp_path / "key.json").write_text(json.dumps([{"setting": "a", "judge identity": 1, "judge style": 0}]))
    for flag, argv in (("--labels", ["--labels", str(tmp_path / "2.txt")]),
                       ("--second-labels", ["--labels", str(tmp_path / "l.txt"), "--second-labels",
                                            str(tmp_path / "2.txt")])):
        with pytest.raises(SystemExit):
            score(argv)
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"{flag}: no file {tmp_path / '2.txt'}")


@pytest.mark.parametrize("run, labeller, identity, style, both", [
    ("lora_seed3", "", (0.79, 0.55), (0.77, 0.53), (19, 12, 10, 16)),
    ("lora_seed4", "", (0.80, 0.58), (0.82, 0.64), (19, 18, 10, 14)),
    ("lora_seed5", "", (0.78, 0.52), (0.81, 0.62), (17, 18, 7, 10)),
    ("locon_seed8", "", (0.84, 0.65), (0.83, 0.65), (23, 32, 6, 5)),
    ("lora_seed3", "2", (0.81, 0.61), (0.81, 0.63), (21, 12, 20, 16)),  # the second labeller's
    ("lora_seed4", "2", (0.83, 0.66), (0.83, 0.66), (24, 18, 13, 14)),
    ("lora_seed5", "2", (0.81, 0.59), (0.88, 0.76), (20, 18, 11, 10)),
    ("locon_seed8", "2", (0.88, 0.74), (0.84, 0.66), (25, 32, 8, 5))])
def test_the_published_claim_eye_checks_recompute(tmp_path, run, labeller, identity, style, both):
    """docs/blockwise.md's eye checks on the claim run's adapters: each published key (setting and judge reading per
    image) and each labeller's blind labels give the agreement, kappa and "both" counts (eye, judge) of the
    block-wise and the all-block pair that the doc states."""
    import eyecheck
    shutil.copy(ROOT / "docs" / f"eyecheck_key_bricks6_{run}.json", tmp_path / "key.json")
    eyecheck.score(tmp_path, ROOT / "docs" / f"eyecheck_labels{labeller}_bricks6_{run}.txt")
    report = json.loads((tmp_path / "eyecheck.json").read_text())
    for what, (agree, kappa) in (("identity", identity), ("style", style)):
        assert (round(report[what]["agreement"], 2), round(report[what]["kappa"], 2)) == (agree, kappa), what
    rates = report["both"]["per setting, eye / judge"]
    pairs = ("identity + style (in0,out3)", "identity + style (all)")
    assert tuple(round(40 * rates[p][k]) for p in pairs for k in (0, 1)) == both  # of 40 images a setting


@pytest.mark.parametrize("run, identity, style", [("lora_seed3", (0.89, 0.74), (0.89, 0.78)),
                                                   ("lora_seed4", (0.92, 0.80), (0.89, 0.78)),
                                                   ("lora_seed5", (0.94, 0.85), (0.87, 0.74)),
                                                   ("locon_seed8", (0.96, 0.90), (0.91, 0.81))])
def test_the_two_labellers_agree_as_published(tmp_path, run, identity, style):
    """docs/blockwise.md: the two labellers' agreement and kappa with each other, image by image (score
    --second-labels)."""
    import eyecheck
    shutil.copy(ROOT / "docs" / f"eyecheck_key_bricks6_{run}.json", tmp_path / "key.json")
    first, second = (ROOT / "docs" / f"eyecheck_labels{n}_bricks6_{run}.txt" for n in ("", "2"))
    eyecheck.main(["score", "--out", str(tmp_path), "--labels", str(first), "--second-labels", str(second)])
    report = json.loads((tmp_path / "eyecheck.json").read_text())["labellers"]
    for what, stated in (("identity", identity), ("style", style)):
        assert (round(report[what]["agreement"], 2), round(report[what]["kappa"], 2)) == stated


def test_eyecheck_score_reads_both_per_setting_by_hand(tmp_path):
    """score: agreement and per-setting rates for the identity, the style and "both" (an image with both, by eye
    and by the judge), from a key and labels written here."""
    import eyecheck
    key = [{"setting": "a", "judge identity": True, "judge style": True},
           {"setting": "a", "judge identity": True, "judge style": False},
           {"setting": "b", "judge identity": False, "judge style": True},
           {"setting": "b", "judge identity": True, "judge style": True}]
    (tmp_path / "key.json").write_text(json.dumps(key))
    (tmp_path / "labels.txt").write_text("0 1 1\n1 1 1\n2 0 1\n3 1 0\n")
    eyecheck.score(tmp_path, tmp_path / "labels.txt")
    report = json.loads((tmp_path / "eyecheck.json").read_text())
    # both, eye: 1 1 0 0; judge: 1 0 0 1 -> a: eye 1.0, judge 0.5; b: eye 0.0, judge 0.5; agreement 2/4
    assert report["both"]["per setting, eye / judge"] == {"a": [1.0, 0.5], "b": [0.0, 0.5]}
    assert report["both"]["agreement"] == pytest.approx(0.5)
    assert report["identity"]["per setting, eye / judge"] == {"a": [1.0, 1.0], "b": [0.5, 0.5]}
    assert report["style"]["per setting, eye / judge"] == {"a": [1.0, 0.5], "b": [0.5, 1.0]}


def test_blockwise_smoke_writes_its_report_and_resumes(tmp_path, capsys):
    """experiments/blockwise.py end to end on the CPU (2 training steps, 2 images per setting): every small-sweep
    setting scored image by image, the claims table, and no verdict while the gates are not known. A run whose
    --budget-s is spent starts nothing; a rerun keeps what was trained and scored, and the settings that a scoring cut
    off had scored; --kept carries a report's scores to another folder, and a report over other seeds names the kept
    pairs it leaves out."""
    argv = ["--smoke", "--out", str(tmp_path), "--gates", str(tmp_path / "no-gates.json")]
    blockwise.main(argv + ["--budget-s", "1e-9"])
    assert "run again to continue" in capsys.readouterr().out and not (tmp_path / "adapters").exists()
    blockwise.main(argv)
    report = json.loads((tmp_path / "results.json").read_text())
    titles = [t for t, *_ in blockwise.settings("small", "locon")]
    assert list(report["summary"]["locon"]) == titles
    assert all(len(report["per_image"]["locon"][t]["0"]["both"]) == 2 for t in titles)
    assert {c[0] for c in report["claims"]["locon"]} == {"1", "2", "3", "4"}
    assert report["rendered on"] == [f"cpu ({os.cpu_count()} cores)"]
    table = (tmp_path / "results.md").read_text()
    assert "not judged (gate)" in table and "holds |" not in table.replace("alone: holds", "")
    assert sorted(p.name for p in (tmp_path / "adapters" / "locon" / "seed0").glob("*.safetensors")) == sorted(
        f"{d}_{b.replace(',', '+')}.safetensors" for d, b in [("identity", "all"), ("style", "all")]
        + [("style", s) for s in blockwise.style_subsets("small", "locon")])
    capsys.readouterr()
    blockwise.main(argv)
    assert "training 0 adapters" in (said := capsys.readouterr().out) and "scoring 0 (algo, seed) pairs" in said
    assert json.loads((tmp_path / "results.json").read_text())["per_image"] == report["per_image"]
    evals = tmp_path / "evals"  # a scoring cut off after three settings: the rerun renders only the others
    record = json.loads((evals / "locon_seed0.json").read_text())
    kept = dict(list(record["results"].items())[:3])
    kept[titles[0]] = {**kept[titles[0]], "iou": [-1.0, -1.0]}  # no render gives that: kept, not redone
    (evals / "locon_seed0.partial.json").write_text(json.dumps({**record, "results": kept, "device": "NVIDIA H200"}))
    (evals / "locon_seed0.safetensors").rename(evals / "locon_seed0.partial.safetensors")
    (evals / "locon_seed0.json").unlink()
    blockwise.main(argv)
    assert "training 0 adapters" in (said := capsys.readouterr().out) and "scoring 1 (algo, seed) pairs" in said
    resumed = json.loads((evals / "locon_seed0.json").read_text())["results"]
    assert resumed.keys() == record["results"].keys() and all(resumed[t] == kept[t] for t in kept)
    for t in resumed.keys() - kept.keys():  # rendered again: the same images, within float rounding
        for metric, values in resumed[t].items():
            np.testing.assert_allclose(np.asarray(values, float), np.asarray(record["results"][t][metric], float),
                                       rtol=0, atol=1e-4, err_msg=f"{t} {metric}")
    assert sorted(p.name for p in evals.iterdir()) == ["locon_seed0.json", "locon_seed0.safetensors"]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["rendered on"] == ["NVIDIA H200", f"cpu ({os.cpu_count()} cores)"]  # begun on one, ended here
    shutil.rmtree(tmp_path / "adapters")  # another machine with evals/ alone: the same report, nothing trained
    blockwise.main(argv)
    assert "training 0 adapters" in (said := capsys.readouterr().out) and "scoring 0 (algo, seed) pairs" in said
    assert json.loads((tmp_path / "results.json").read_text())["per_image"] == report["per_image"]
    blockwise.main(argv + ["--seeds", "0,1", "--budget-s", "1e-9"])  # seed 1 not begun: a report over seed 0
    assert "over the pairs scored so far" in capsys.readouterr().out
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["scored"] == {"locon": [0]} and partial["per_image"] == report["per_image"]
    blockwise.main(argv + ["--guidance", "5,2", "--budget-s", "1e-9"])  # the kept scores are not taken as these
    said = capsys.readouterr().out
    assert "locon_seed0.json: scored with other settings (guidance [5.0] -> [5.0, 2.0]); redone" in said
    # --kept: the report alone carries the run to a machine with neither evals/ nor adapters, and stops in one
    # line if it was made with other settings
    assert partial["devices"] == {"locon": {"0": f"NVIDIA H200, cpu ({os.cpu_count()} cores)"}}
    elsewhere = ["--smoke", "--out", str(tmp_path / "elsewhere"), "--gates", str(tmp_path / "no-gates.json"),
                 "--kept", str(tmp_path / "results.json")]
    with pytest.raises(SystemExit, match="results.json: made with other guidance than this run"):
        blockwise.main(elsewhere + ["--guidance", "5,2"])
    blockwise.main(elsewhere + ["--seeds", "1", "--budget-s", "1e-9"])  # a report of other seeds says what it drops
    assert "this report leaves out these pairs of --kept" in (said := capsys.readouterr().out)
    assert said.rstrip().endswith("them): locon [0]"), said
    blockwise.main(elsewhere + ["--budget-s", "1e-9"])
    assert "training 0 adapters" in (said := capsys.readouterr().out) and "scoring 0 (algo, seed) pairs" in said
    assert "leaves out" not in said
    moved = json.loads((tmp_path / "elsewhere" / "results.json").read_text())
    assert all(moved[k] == partial[k] for k in ("scored", "per_image", "claims", "rendered on", "devices"))
    assert not list((tmp_path / "elsewhere").glob("fig_*.png"))  # a kept pair has no images to draw


def test_the_tradeoff_figure_puts_each_weight_at_its_rates(tmp_path):
    """fig_tradeoff: each style weight's point at (style rate, identity rate) of the plot, in its adapter's colour;
    the all-block curve ordered by weight, so its line runs from 0.25 to 1.5."""
    rows = {}
    for i, w in enumerate(("x0.25", "x0.5", "x0.75", "", "x1.5")):
        for blocks, style in (("all", 0.2 * i), ("in0,out3", 0.1 * i)):
            title = f"id + style({blocks})" + (f" {w}" if w else "")
            rows[title] = {"identity": (1 - style, 0.0), "style": (style, 0.0), "both": (0.1, 0.0)}
    points = blockwise.tradeoff_figure(rows, tmp_path / "t.png", size=(300, 200), margin=20)
    image = np.asarray(Image.open(tmp_path / "t.png"))
    # x = 20 + style * 260, y = 180 - identity * 160 (the plot's box inside a 20-pixel margin)
    assert points["id + style(all) x0.25"] == (20, 20) and points["id + style(all) x1.5"] == (228, 148)
    assert points["id + style(in0,out3)"] == (98, 68)  # weight 1: style 0.3, identity 0.7
    assert tuple(image[68, 98]) == (30, 80, 200) and tuple(image[148, 228]) == (200, 40, 40)
    assert list(points)[:5] == [f"id + style(all) x{w}" for w in (0.25, 0.5, 0.75)] + ["id + style(all)",
                                                                                      "id + style(all) x1.5"]


def test_a_pair_is_scored_as_soon_as_its_adapters_are_trained():
    """blockwise.py's jobs: each (algo, seed)'s evaluation waits for its own adapters only, and starts before later
    pairs' training (the first ready job in the list), on one worker or several; a spent deadline starts nothing."""
    from types import SimpleNamespace
    todo = {("locon", 0): [["a"], ["b"]], ("locon", 1): [["c"]], ("lora", 0): []}
    jobs, needs = blockwise.pair_jobs(todo, SimpleNamespace(cuda_graph=False), Path("out"), {}, ["cpu"], 1)
    assert [(fn.__name__, arg[0]) for fn, arg in jobs] == [("train_job", ["a"]), ("train_job", ["b"]),
                                                           ("eval_job", "locon"), ("train_job", ["c"]),
                                                           ("eval_job", "locon"), ("eval_job", "lora")]
    assert needs == [(), (), (0, 1), (), (3,), ()]
    names = ["a", "b", "eval ab", "c", "eval c", "eval"]
    for workers in (1, 3):
        events, lock, c_scored = [], threading.Lock(), threading.Event()

        def record(job, stop=None):
            with lock:
                events.append(("start", job))
            if job == "a" and workers > 1:  # c's pair is trained and scored while a still trains
                assert c_scored.wait(timeout=60)
            if job == "eval c":
                c_scored.set()
            with lock:
                events.append(("end", job))
        assert blockwise.run_jobs(record, names, workers, threads=True, needs=needs)
        for i, name in enumerate(names):
            started = events.index(("start", name))
            assert all(events.index(("end", names[j])) < started for j in needs[i]), (workers, events)
        assert workers > 1 or [name for kind, name in events if kind == "start"] == names
    assert not blockwise.run_jobs(record, names, 2, threads=True, deadline=time.time() - 1, needs=needs)


def test_a_signal_stops_threaded_train_jobs_at_a_checkpoint(tiny, images, tmp_path, capsys):
    """blockwise.py --threads under a time limit (`timeout` sends SIGTERM): the worker threads cannot take the
    signal, so run_jobs takes it for them; each running train job saves a checkpoint after its step and ends, no
    other job starts, the run reports it and the signal's handler is given back."""
    import train
    jobs = [(train_argv(tiny, images, tmp_path / f"{seed}.safetensors", "--steps", 1000, "--seed", seed), "cpu", 1,
             False) for seed in (1, 2, 3)]
    locks = [tmp_path / f".{seed}.safetensors.lock" for seed in (1, 2)]

    def send_when_both_run():
        t0 = time.time()
        while not all(lock.exists() for lock in locks) and time.time() - t0 < 60:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_when_both_run)
    sender.start()
    assert not blockwise.run_jobs(blockwise.train_job, jobs, workers=2, threads=True)
    sender.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM: the running jobs stopped where they were (a train job at a checkpoint), 1 others not started; " \
           "run again to continue" in capsys.readouterr().out
    for seed in (1, 2):
        out = tmp_path / f"{seed}.safetensors"
        state = torch.load(train.state_files(out)[-1], weights_only=False)
        assert not out.exists() and 1 <= state["step"] < 1000
    assert not list(tmp_path.glob("3*")) and not (tmp_path / ".3.safetensors.lock").exists()


def test_choose_eval_smoke_writes_its_report_and_resumes(tmp_path, capsys):
    import choose_eval
    choose_eval.main(["--smoke", "--methods", "weights,probe", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["metrics"]) == {"weights", "probe", "paper"}
    assert report["metrics"]["paper"]["0"]["blocks"] == "in0,out3"
    pairs = tmp_path / "data" / f"pairs_{IDENTITY}_{HELD_STYLE.file_name}_seed0"  # the probe's scenes
    assert sorted(p.name for p in (pairs / "without_style").iterdir()) == ["000.png", "001.png"]
    assert report["choices"]["probe"]["0"]["details"]["style"]
    assert set(report["both"]["0"]) >= set(choose_eval.SMOKE_FAMILY)
    assert all(len(r["per image"]["both"]) == 2 for r in report["per image"].values())
    assert "| weights | 0 |" in (tmp_path / "results.md").read_text()
    # the method's "both" against the paper's in0+out3, from the two sets' per-image scores
    key = lambda m: f"seed0 {report['metrics'][m]['0']['blocks']}"
    mine, paper = (report["per image"][key(m)]["per image"]["both"] for m in ("weights", "paper"))
    assert report["versus paper"]["weights"]["mean"] == pytest.approx(sum(mine) / 2 - sum(paper) / 2)
    # the figures: a 128-pixel column per set (in0 and out3; the pair in0,out3), a 56-pixel head, 4 rows of images
    from PIL import Image
    assert Image.open(tmp_path / "fig_oracle_singles_seed0.png").size == (2 * 128, 56 + 4 * 128)
    assert Image.open(tmp_path / "fig_oracle_pairs_seed0.png").size == (128, 56 + 4 * 128)
    capsys.readouterr()
    choose_eval.main(["--smoke", "--methods", "weights,probe", "--out", str(tmp_path)])  # all found: nothing redone
    assert "training 0 adapters" in capsys.readouterr().out


def test_choose_eval_trains_the_all_block_adapters_only_for_the_methods_that_read_them(tmp_path):
    """The all-block identity and style adapters are trained for a missing choice of ablation or weights (they read
    the files), not of fisher or probe (the base model and images only), once every set is scored."""
    import choose_eval
    for methods, needed in (("fisher,probe", False), ("probe,weights", True), ("ablation", True)):
        args = choose_eval.parse_args(["--methods", methods, "--out", str(tmp_path)])
        assert all(choose_eval.needed(args, tmp_path, 0, data, "all", []) is needed for data in ("identity", "style"))


def close(a, b):
    """Equal JSON values, floats to 1e-9 relative (NaN equal to NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_choose_eval_recompiles_the_published_oracle_from_its_kept_scores(tmp_path, capsys):
    """--kept docs/blockwise/choose_oracle.json: the published report again, every metric the same, with none of its
    adapters here (nothing trained or scored); a results.json made with other settings is refused in one line, and
    a run over fewer seeds names those its report leaves out."""
    import choose_eval
    published = ROOT / "docs" / "blockwise" / "choose_oracle.json"
    kept = json.loads(published.read_text())
    argv = ["--seeds", ",".join(map(str, kept["args"]["seeds"])), "--kept", str(published), "--device", "cpu",
            "--budget-s", "1e-9", "--out", str(tmp_path)]  # anything left to train or score: it stops at once
    choose_eval.main(argv)
    assert "training 0 adapters" in (said := capsys.readouterr().out) and "scoring 0 settings" in said
    report = json.loads((tmp_path / "results.json").read_text())
    assert not (tmp_path / "adapters").exists()
    for key in ("choices", "both", "metrics", "means", "versus paper", "per image"):
        assert close(report[key], kept[key]), key  # numpy's sums may round otherwise on another CPU
    assert "leaves out" not in said
    with pytest.raises(SystemExit, match=r"--kept .*choose_oracle.json: made with other n than this run"):
        choose_eval.main([*argv, "--n", "32", "--out", str(tmp_path / "other")])
    choose_eval.main([*argv, "--seeds", "0,1", "--out", str(tmp_path / "fewer")])  # a report of fewer seeds
    assert f"leaves out seeds {kept['args']['seeds'][2:]} of --kept" in capsys.readouterr().out
    longer = tmp_path / "longer.json"  # the block sets' adapters trained longer (--subset-steps): other scores
    longer.write_text(json.dumps({**kept, "args": {**kept["args"], "subset_steps": 12800}}))
    with pytest.raises(SystemExit, match=r"--kept .*longer.json: made with other subset_steps than this run"):
        choose_eval.main([*argv, "--kept", str(longer), "--out", str(tmp_path / "longer")])


def test_choose_eval_trains_the_block_sets_for_subset_steps(tmp_path, monkeypatch):
    """choose_eval.py --subset-steps: the oracle's style adapters on a block set train that long; the all-block style
    adapter (which the methods read) and the identity keep the recipe, as in blockwise.py and gates.py."""
    import choose_eval
    import train
    started = []
    monkeypatch.setattr(choose_eval, "run_jobs", lambda fn, jobs, *rest: started.extend(jobs) or True)
    args = choose_eval.parse_args(["--style", "bricks/6", "--subset-steps", "12800", "--device", "cpu"])
    wanted = [(0, "style", "in0,out3"), (0, "style", "all"), (0, "identity", "all")]
    choose_eval.train_all(args, tmp_path, {"identity": tmp_path / "i", "style": tmp_path / "s"}, wanted, None)
    steps = [train.parse_args(argv + ["--ckpt", "x"]).steps for argv, *_ in started]
    assert steps == [12800, 1600, 1600]


@functools.lru_cache(maxsize=1)
def published_bricks_report():
    """docs/blockwise/bricks6_results.json (9.6 MB), read once for the tests that recompute from it (none changes
    it)."""
    return json.loads((ROOT / "docs" / "blockwise" / "bricks6_results.json").read_text())


@pytest.mark.parametrize("algo, seeds, subset_seeds, claim3, claim3m, needed, gates", [
    ("locon", 20, 12, 0.521, 0.521, (12, 17), [True, False, False, False, True]),  # docs/blockwise.md: +0.52, 12-17
    ("lora", 16, 8, 0.051, 0.058, (7, 16), [False, False, True, True, True]),  # +0.05; +0.06 at weight 0.75
])
def test_the_published_bricks_claims_recompute_from_their_per_image_scores(algo, seeds, subset_seeds, claim3, claim3m,
                                                                           needed, gates):
    """docs/blockwise/bricks6_results.json (the claim study: twenty LoCon seeds, sixteen LoRA ones): each
    algorithm's summary and claims table come again from its per-image scores, and its gates (G1, G2, G4, G4m, G3)
    are read on the run's own rows as docs/blockwise.md gives them."""
    published = published_bricks_report()
    rows = published["per_image"][algo]
    assert published["scored"][algo] == list(range(seeds))
    for title, per_seed in rows.items():
        mine = blockwise.summarize(per_seed)
        assert all(close(mine[m][0], published["summary"][algo][title][m][0]) for m in blockwise.METRICS), title
    tested = blockwise.claims(rows)
    assert list(tested) == list(published["claims"][algo])
    for claim, r in tested.items():
        kept = published["claims"][algo][claim]
        assert close([r["mean"], r["low"], r["high"]], [kept["mean"], kept["low"], kept["high"]]), claim
    assert tested[blockwise.CLAIMS[2][0]]["mean"] == pytest.approx(claim3, abs=1e-3)
    assert tested[blockwise.MATCHED]["mean"] == pytest.approx(claim3m, abs=1e-3)
    seeds_needed = [tested[c]["seeds_needed"] for c in tested]  # the protocol's re-estimate of the run's length
    assert (min(seeds_needed), max(seeds_needed)) == needed
    summary = {t: blockwise.summarize(v) for t, v in rows.items()}
    matched = tested[blockwise.MATCHED]["b"][0]
    read = blockwise.run_gates(summary, {"G3 VAE round trip both >= 0.95": True}, matched)
    assert list(read.values()) == gates
    section = blockwise.markdown(published).split(f"### {algo}\n")[1].split("\n### ")[0]
    counts = f"{seeds} seeds with the style on all blocks and in0+out3, the first {subset_seeds} of them"
    assert (counts in section) == (subset_seeds < seeds)  # results.md: which seeds trained every subset, per algo


@pytest.mark.parametrize("seed, in1, paper, discordant, p", [(0, 0.38, 0.56, (6, 18), 0.023),
                                                               (1, 0.42, 0.69, (8, 25), 0.005)])
def test_the_probe_cells_on_the_bricks_recompute_from_their_scores(seed, in1, paper, discordant, p):
    """docs/blockwise.md's cells of the bricks oracle that test the probe's in1: "both" of identity + style on in1
    (trained and rendered on the CPU) against in0 + out3 in the claim run's published per-image scores (same prompts
    and noise), the discordant images and McNemar's p; a cell that rendered in0 + out3 on the CPU too gives the
    H200's scores image by image."""
    cell = json.loads((ROOT / "docs" / "blockwise" / f"bricks_in1_seed{seed}.json").read_text())["results"]
    published = published_bricks_report()
    claim = published["per_image"]["locon"]["id + style(in0,out3)"][str(seed)]
    a, b = np.array(cell["id + style(in1)"]["both"], bool), np.array(claim["both"], bool)
    assert (round(a.mean(), 2), round(b.mean(), 2)) == (in1, paper)
    assert (int((a & ~b).sum()), int((~a & b).sum())) == discordant
    assert stats.mcnemar_p(a, b) == pytest.approx(p, abs=1e-3)
    if "id + style(in0,out3)" in cell:
        assert all(cell["id + style(in0,out3)"][m] == claim[m] for m in ("identity", "style", "both"))


def test_the_block_choices_on_the_bricks_seeds_follow_from_their_scores():
    """docs/blockwise/bricks6_methods.json (the four methods on the claim study's seeds 6 and 7): each recorded choice
    is lora.choose's greedy one from the recorded scores within in0 + out3's parameters; ablation's choices there and
    on seeds 0 and 1 (docs/blockwise.md's table: in0 + out3, out3) read +0.03 "both" against the paper's in0 + out3
    in the claim run's published per-image scores."""
    from lora import choose
    methods = json.loads((ROOT / "docs" / "blockwise" / "bricks6_methods.json").read_text())
    params = methods["params"]
    for seed, per_method in methods["seeds"].items():
        for method, r in per_method.items():
            assert choose.choose_blocks(r["scores"], params, params["in0"] + params["out3"])[1] == r["chosen"], seed
    blocks = lambda dims: ",".join(d.split("=")[0] for d in dims.split(","))
    recorded = {s: blocks(m["ablation"]["chosen"]) for s, m in methods["seeds"].items()}
    ablation = {"0": "in0,out3", "1": "out3", **recorded}
    assert ablation == {"0": "in0,out3", "1": "out3", "6": "in0,out3", "7": "out3"}
    rows = published_bricks_report()["per_image"]["locon"]
    diffs = stats.differences({s: rows[f"id + style({b})"][s]["both"] for s, b in ablation.items()},
                              {s: rows["id + style(in0,out3)"][s]["both"] for s in ablation})
    assert stats.mean_difference(diffs) == pytest.approx(0.031, abs=1e-3)  # docs/blockwise.md: +0.03


def test_a_train_job_cut_off_resumes_from_its_newest_checkpoint(tiny, images, tmp_path):
    """blockwise.py's and choose_eval.py's train jobs checkpoint as they go: a job whose call was cut off (here: its
    checkpoints at steps 2 and 4 of 6 left, no adapter) resumes from the newest, writes the adapter an uncut run
    writes, and leaves no checkpoints behind."""
    from safetensors.torch import load_file
    import train
    job = lambda out: (train_argv(tiny, images, out, "--steps", 6, "--save-every", 2), "cpu", 1, False)
    blockwise.train_job(job(tmp_path / "whole.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir() if "-step" in p.name) == []
    cut = tmp_path / "cut" / "a.safetensors"
    train.main(job(cut)[0])  # train.py alone keeps its checkpoints (steps 2 and 4)
    cut.unlink()  # the call's time limit came before the adapter was written
    blockwise.prune_checkpoints(cut)
    assert [p.name for p in train.state_files(cut)] == ["a-step000004.state.pt"]
    blockwise.train_job(job(cut))
    assert not [p for p in cut.parent.iterdir() if "-step" in p.name]
    whole, resumed = load_file(tmp_path / "whole.safetensors"), load_file(cut)
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-7)
    # the same from a checkpoint whose weights were halved: another adapter, so the job did start from it
    halved = tmp_path / "halved" / "a.safetensors"
    train.main(job(halved)[0])
    halved.unlink()
    state_file = train.state_files(halved)[-1]
    state = torch.load(state_file, weights_only=False)
    state["adapter"] = {k: v / 2 for k, v in state["adapter"].items()}
    torch.save(state, state_file)
    blockwise.train_job(job(halved))
    down = next(name for name in whole if name.endswith("lora_down.weight"))
    assert not torch.allclose(load_file(halved)[down], whole[down], rtol=1e-3, atol=1e-5)


def test_threaded_workers_train_what_one_after_another_trains(tiny, images, tmp_path):
    """--workers 2 --threads (blockwise.py, choose_eval.py): two train.py runs at once in one process (on CUDA each on
    a stream of its own) write the adapters that the same runs write one after another."""
    from safetensors.torch import load_file

    def train(folder, **kw):
        jobs = [(train_argv(tiny, images, folder / f"{seed}.safetensors", "--steps", 3, "--seed", seed), "cpu", 1,
                 False) for seed in (1, 2)]
        assert blockwise.run_jobs(blockwise.train_job, jobs, **kw)
        return [load_file(folder / f"{seed}.safetensors") for seed in (1, 2)]
    alone = train(tmp_path / "alone", workers=1, threads=False)
    together = train(tmp_path / "together", workers=2, threads=True)
    down = next(name for name in alone[0] if name.endswith("lora_down.weight"))
    assert alone[0].keys() == together[0].keys() and not torch.equal(alone[0][down], alone[1][down])  # two seeds
    for a, b in zip(alone, together):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
