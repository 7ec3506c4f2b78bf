"""A small multi-head CNN that reads a tiny-world image back: subject, style, colour and background.

The subject head knows the held-out character and the style head the held-out style, so it scores identity and
style fidelity of generated images. It trains on fresh ground-truth renders of every subject x style pair, lightly
augmented (colour jitter, blur, noise) to tolerate the blur and drift of generated images.

    python -m tinyworld.classify --out weights/tiny/classifier.safetensors
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .world import BACKGROUNDS, COLOURS, HELDOUT_STYLE, HELDOUT_SUBJECT, SPLITS, STYLES, SUBJECTS, dataset, render, \
    scene_for

LABELS = {"subject": (*SUBJECTS, HELDOUT_SUBJECT), "style": (*STYLES, HELDOUT_STYLE),
          "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}


class Classifier(nn.Module):
    """A 4x4 stride-2 stem (64 -> 32 px), three conv-BN-ReLU-maxpool stages (-> 4 px), global average pool,
    one linear layer per head. ~0.2 M parameters."""

    def __init__(self, widths=(32, 64, 96, 128)):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(widths[-1], len(v)) for k, v in LABELS.items()})

    def forward(self, images):
        """images (B, 3, 64, 64) in [0, 1] -> {head: logits (B, classes)}."""
        h = self.features(images * 2 - 1).mean((2, 3))
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images):
    """PIL images -> (B, 3, 64, 64) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 255


def targets(scenes):
    """{head: class indices}; colour is -1 (ignored) for the held-out character, which has fixed colours."""
    return {"subject": torch.tensor([LABELS["subject"].index(s.subject) for s in scenes]),
            "style": torch.tensor([LABELS["style"].index(s.style) for s in scenes]),
            "colour": torch.tensor([-1 if s.colour is None else LABELS["colour"].index(s.colour) for s in scenes]),
            "background": torch.tensor([LABELS["background"].index(s.background) for s in scenes])}


def augment(x, gen):
    """Per-image brightness/contrast/channel jitter, a light blur on half the batch, pixel noise."""
    B = len(x)
    u = lambda *shape: torch.rand(*shape, generator=gen)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.85 + 0.3 * u(B, 1, 1, 1)) + mean * (0.92 + 0.16 * u(B, 3, 1, 1)) + 0.1 * (u(B, 1, 1, 1) - 0.5)
    sigma = 0.3 + 0.8 * u(1).item()  # well below the 2.5 px blur of the "soft" style
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5).contiguous(), groups=3)
    x = torch.where(u(B, 1, 1, 1) < 0.5, blurred, x)
    return (x + 0.04 * u(B, 1, 1, 1) * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_classifier(steps=500, seed=0, device="cpu", batch=64, lr=3e-3):
    """Trains on fresh renders, subject and style drawn uniformly (held-out ones included)."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = Classifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    for _ in range(steps):
        scenes = [scene_for(rng, LABELS["subject"][rng.integers(9)], LABELS["style"][rng.integers(8)])
                  for _ in range(batch)]
        x = augment(to_tensor([render(s)[0] for s in scenes]), gen).to(device)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], t.to(device), ignore_index=-1) for k, t in targets(scenes).items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(model, images):
    """images (B, 3, 64, 64) in [0, 1] -> {head: predicted label names, head + "_prob": (B, classes) softmax}."""
    device = next(model.parameters()).device
    out = {}
    for k, logits in model(images.to(device, torch.float32)).items():
        probs = logits.float().softmax(-1).cpu()
        out[k], out[k + "_prob"] = [LABELS[k][i] for i in probs.argmax(-1)], probs
    return out


def accuracy(model, n=200, seed=1234, splits=SPLITS):
    """{split: {head: accuracy}} on n fresh ground-truth renders per split (no colour head for the character)."""
    table = {}
    for split in splits:
        data = dataset(n, seed, split)
        pred = predict(model, to_tensor([im for im, _, _ in data]))
        truth = {k: [getattr(s, k) for _, _, s in data] for k in LABELS}
        table[split] = {k: float(np.mean([p == t for p, t in zip(pred[k], truth[k])]))
                        for k in LABELS if None not in truth[k]}
    return table


def save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"labels": json.dumps(LABELS)})


def load(path, device="cpu"):
    """A Classifier from a save()d file; refuses one trained for a different label set."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        labels = json.loads((f.metadata() or {}).get("labels", "{}"))
    if labels != {k: list(v) for k, v in LABELS.items()}:
        raise ValueError(f"{path}: classifier labels {labels} do not match this tinyworld's {LABELS}")
    model = Classifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="weights/tiny/classifier.safetensors")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t = time.time()
    model = train_classifier(args.steps, args.seed)
    print(f"trained {args.steps} steps in {time.time() - t:.0f} s")
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save(model, args.out)
    table = accuracy(model)
    print(f"{'split':10s}" + "".join(f"{k:>12s}" for k in LABELS))
    for split, row in table.items():
        print(f"{split:10s}" + "".join(f"{row[k]:12.3f}" if k in row else f"{'-':>12s}" for k in LABELS))


if __name__ == "__main__":
    main()
