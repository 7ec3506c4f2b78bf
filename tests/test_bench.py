"""The benchmarks compare like with like: on the tiny config (CPU, --tiny: the code paths, not timings), the peft
peer adapts the same modules with the same ranks as minisd (LoRA and LoCon), both stacks compute the same
function, and every result lands in the JSON."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_module():
    sys.path.insert(0, str(BENCH))
    yield lambda name: __import__(name)
    sys.path.remove(str(BENCH))


def test_training_bench_adapts_the_same_modules_in_both_stacks(bench_module, tmp_path, single_thread):
    out = tmp_path / "training.json"
    bench_module("training").main(["--tiny", "--device", "cpu", "--batches", "1", "--variants", "diffusers-eager,minisd-eager",
                                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert not result["errors"]
    for algo in ("lora", "locon"):
        counts = result["adapters"][algo]
        assert counts["adapted_layers_minisd"] == counts["adapted_layers_peft"] > 0
        assert counts["trainable_minisd"] == counts["trainable_peft"]  # the same ranks, conv rank included
    assert result["adapters"]["locon"]["adapted_layers_minisd"] > result["adapters"]["lora"]["adapted_layers_minisd"]
    rows = [r for r in result["rows"] if r["section"] == "train"]
    assert {(r["algo"], r["impl"]) for r in rows} == {(a, i) for a in ("lora", "locon") for i in ("diffusers-eager", "minisd-eager")}
    assert all(r["loss"] > 0 and r["ms"] > 0 for r in rows)


def test_sampling_bench_pipelines_agree(bench_module, tmp_path, single_thread):
    out = tmp_path / "sampling.json"
    bench_module("sampling").main(["--tiny", "--device", "cpu", "--dtypes", "fp32", "--batches", "2", "--steps", "2",
                                   "--sections", "step,pipeline", "--out", str(out)])
    result = json.loads(out.read_text())
    assert not result["errors"]
    check = next(r for r in result["rows"] if r["section"] == "check" and "eager_vs_diffusers_images" in r)
    assert check["eager_vs_diffusers_images"] < 1e-4 and check["latents_finite"]
    step = next(r for r in result["rows"] if r["section"] == "check" and "step_eps_minisd_vs_diffusers" in r)
    assert step["step_eps_minisd_vs_diffusers"] < 1e-4
    assert {r["impl"] for r in result["rows"] if r["section"] == "pipeline"} == {"diffusers-eager", "minisd-eager"}


def test_ddp_bench_scaling_is_against_one_gpu_in_the_same_mode(bench_module, tmp_path):
    """bench/ddp.py's ratios: vs_first_run against the first run of a per-GPU batch, scaling against the one-GPU run
    of the same batch and mode (eager or --cuda-graph); hand-computed from made-up rows."""
    import argparse
    rows = [dict(gpus=g, cuda_graph=c, batch_per_gpu=b, images_per_s=v) for g, c, b, v in
            [(1, False, 8, 50.0), (1, True, 8, 100.0), (2, False, 8, 60.0), (2, True, 8, 196.0), (2, True, 16, 240.0)]]
    args = argparse.Namespace(tiny=True, steps=10, warmup=2, out=str(tmp_path / "ddp.json"))
    bench_module("ddp").save(rows, args)
    saved = json.loads(Path(args.out).read_text())["rows"]
    assert [r["vs_first_run"] for r in saved] == [1.0, 2.0, 1.2, 3.92, 1.0]
    assert [r["scaling"] for r in saved] == [1.0, 1.0, 1.2, 1.96, None]  # batch 16 has no one-GPU run


SMOKE = ["layers", "overhead", "sampling", "training", "groupnorm", "layout", "kernel_profile", "ddp", "user", "first_call"]


def test_every_bench_script_has_a_smoke_test():
    assert sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "common") == sorted(SMOKE)


@pytest.mark.parametrize("name", SMOKE)
def test_bench_script_smoke_mode_runs(name, bench_module, tmp_path, single_thread):
    """Each benchmark's --smoke mode (tiny config on the CPU, one call per timing, no peer runs) writes result rows
    and no errors: a benchmark broken by a change of the code it measures fails here, not on a GPU."""
    out = tmp_path / f"{name}.json"
    bench_module(name).main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] and not result.get("errors"), result.get("errors")
    if name == "user":  # train.py's start-up line, read back part by part, and the imports before it
        train = next(r for r in result["rows"] if r["section"] == "train")
        assert train["startup_s"] > 0 and set(train["startup_parts"]) >= {"model", "first step"}
        assert next(r for r in result["rows"] if r["section"] == "import")["wall_s"] > 0


def test_user_bench_table_puts_medians_side_by_side(bench_module):
    """bench/user.py's markdown: one line per case, the median of the reps, '-' where a side did not run."""
    rows = [dict(section="sample", impl="minisd", n=1, wall_s=w, first_image_s=f, peak_gpu_mib=m)
            for w, f, m in ((3.0, 2.0, 1000), (5.0, 4.0, 3000))]
    rows += [dict(section="sample", impl="diffusers", n=1, wall_s=7.0, first_image_s=6.5, peak_gpu_mib=2500),
             dict(section="check", n=1, first_image_max_abs_diff=1),
             dict(section="load", impl="minisd", dtype="fp16", wall_s=0.25),
             dict(section="train", impl="minisd", steps=150, batch=8, wall_s=100.0, steady_images_s=40.0)]
    lines = bench_module("user").markdown(rows).splitlines()
    assert lines[2:] == ["| sample.py --n 1 | 4.00 | 7.00 | 3.00 | 6.50 | 2000.00 | 2500.00 | - | - |",
                         "| load fp16 | 0.25 | - | - | - | - | - | - | - |",
                         "| DreamBooth-LoRA 150 steps, batch 8 | 100.00 | - | - | - | - | - | 40.00 | - |"]


def test_user_bench_steady_rate_skips_the_first_tenth(bench_module):
    """Steps per second between the first report at or past a tenth of the run and the last: 900 steps in 225 s."""
    steady = bench_module("user").steady
    assert steady([(0, 0), (1, 9.0), (99, 24.0), (100, 25), (1000, 250)], 1000) == 4.0
    assert steady([(1, 9.0), (2, 9.1)], 2) is None and steady([], 1000) is None  # a warm-up run; no progress bar
