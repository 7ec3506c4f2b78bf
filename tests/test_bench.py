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
