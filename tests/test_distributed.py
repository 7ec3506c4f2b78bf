"""train.py under torchrun (DistributedDataParallel): two CPU processes (gloo) give the result of one process with
the whole batch, since every process draws the global batch and keeps its slice."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyfiles import images, tiny  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one_process_with_the_whole_batch(tiny, images, tmp_path):
    argv = ["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--data", str(images),
            "--prompt", "a box", "--resolution", "16", "--seed", "3", "--steps", "3", "--lr", "1e-2",
            "--te-rank", "2", "--device", "cpu", "--quiet"]  # --te-rank: its gradients are averaged by hand
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, str(ROOT / "train.py"), *argv, "--batch", "2", "--out", str(tmp_path / "one.safetensors")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py"),
           *argv, "--batch", "1", "--out", str(tmp_path / "two.safetensors")]
    for cmd in (one, two):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    ups = [k for k in a if "lora_up" in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm() / torch.cat([a[k].flatten() for k in ups]).norm()
    assert 0 < torch.cat([a[k].flatten() for k in ups]).norm() and diff < 1e-4, diff
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # rank 0 alone writes
        ["one.safetensors", "one-loss.csv", "one-loss.png", "two.safetensors", "two-loss.csv", "two-loss.png"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_cuda_graph_follow_one_gpu_with_the_whole_batch(tiny, images, tmp_path):
    """--cuda-graph under torchrun: the gradients are averaged by one all-reduce between two graph replays. Other
    batch splits pick other (TF32) conv kernels, so the runs agree closely, not bitwise: much closer than a one-GPU run
    at half the batch (about what each of two processes without the all-reduce would train)."""
    argv = ["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--data", str(images),
            "--prompt", "a box", "--resolution", "16", "--seed", "3", "--steps", "5", "--lr", "1e-2",
            "--mixed-precision", "no", "--cuda-graph", "--quiet"]
    runs = {"one": [sys.executable, str(ROOT / "train.py"), *argv, "--batch", "2"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(ROOT / "train.py"), *argv, "--batch", "1"],
            "half": [sys.executable, str(ROOT / "train.py"), *argv, "--batch", "1"]}
    w = {}
    for name, cmd in runs.items():
        run = subprocess.run(cmd + ["--out", str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        f = load_file(tmp_path / f"{name}.safetensors")
        w[name] = torch.cat([f[k].double().flatten() for k in sorted(f) if "lora_up" in k])
    rel = lambda a, b: ((w[a] - w[b]).norm() / w[b].norm()).item()
    assert w["one"].norm() > 0 and rel("two", "one") < 2e-2 and rel("two", "one") < rel("half", "one") / 5, \
        (rel("two", "one"), rel("half", "one"))
