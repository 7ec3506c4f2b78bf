"""experiments/blockwise.py's building blocks, and the shipped VAE's reach (tinyworld.tune_vae)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minisd
from tinyworld import classify
from tinyworld.world import Scene, render

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import blockwise  # noqa: E402


def test_style_subsets_skip_blocks_lora_cannot_adapt():
    # SD 1.x (and minisd-tiny) have no attention at the lowest resolution: in3 and out0 hold only ResBlocks and
    # samplers, which LoRA-LierLa leaves alone, so "in3" adapts nothing and "in0,out0" the same layers as "in0"
    lora_subsets, locon_subsets = blockwise.style_subsets("full", "lora"), blockwise.style_subsets("full", "locon")
    assert len(locon_subsets) == 9 + 16 and "in3" in locon_subsets and "in3,out0" in locon_subsets
    assert "in3" not in lora_subsets and "out0" not in lora_subsets and "in0,out0" not in lora_subsets
    assert "in0,out3" in lora_subsets and len(lora_subsets) == 7 + 9


def test_summary_is_a_t_interval_over_seed_means():
    per_seed = {0: {m: [1, 1, 0, 0] for m in blockwise.METRICS}, 1: {m: [1, 1, 1, 1] for m in blockwise.METRICS},
                2: {m: [1, 0, 0, 0] for m in blockwise.METRICS}}
    s = blockwise.summarize(per_seed)  # seed means 0.5, 1.0, 0.25: mean 0.5833, sd 0.3819, t(2) = 4.30
    assert s["seeds"] == 3
    assert s["identity"][0] == pytest.approx(0.58333, abs=1e-4)
    assert s["identity"][1] == pytest.approx(4.30 * 0.381881 / 3 ** 0.5, abs=1e-4)


def test_silhouette_iou_of_a_ground_truth_render():
    robot = Scene("robot", None, "gray", "flat", "small", "left")
    image, mask = render(robot)
    x = classify.to_tensor([image])
    assert blockwise.silhouette_iou(x, [robot], mask[None])[0] > 0.9  # the character's own pixels
    empty = torch.full_like(x, 128 / 255)  # just the gray background
    assert blockwise.silhouette_iou(empty, [robot], mask[None])[0] == 0
    moved = Scene("robot", None, "gray", "flat", "small", "right")
    assert blockwise.silhouette_iou(x, [moved], render(moved)[1][None])[0] < 0.5  # right shape, wrong place


def test_the_shipped_vae_encodes_the_held_out_character_and_style():
    # minisd-tiny's VAE was first trained on base scenes only and could not; tune_vae taught it (README)
    sd = minisd.load(ROOT / "weights" / "tiny")
    judge = classify.load(ROOT / "weights" / "tiny" / "classifier.safetensors")
    from tinyworld.tune_vae import reconstruction_accuracy
    acc = reconstruction_accuracy(sd.vae, judge, n=32)
    assert acc["identity"] >= 0.9 and acc["style"] >= 0.9 and acc["base"] >= 0.9, acc
    assert acc["combo"] >= 0.6, acc  # never in the tuning data
    assert np.isfinite(list(acc.values())).all()
