"""A small multi-head CNN that reads a tiny-world image back: subject, style, colour and background.

The subject head knows the held-out character and the style head the held-out style, so it scores identity and
style fidelity of generated images. It trains on fresh ground-truth renders of every subject x style pair, lightly
augmented (colour jitter, blur, noise) to tolerate the blur and drift of generated images.

    python -m tinyworld.classify --out weights/tiny/classifier.safetensors
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from safetensors import safe_open
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


def augment(images, rng):
    """PIL images -> (B, 3, 64, 64): a light blur on half of them, brightness/contrast/channel jitter, pixel noise."""
    blur = lambda im: im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1)))  # well below the "soft" style's 2.5
    x = to_tensor([blur(im) if rng.random() < 0.5 else im for im in images])
    u = lambda *shape: torch.from_numpy(rng.random((len(x), *shape), np.float32))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.85 + 0.3 * u(1, 1, 1)) + mean * (0.92 + 0.16 * u(3, 1, 1)) + 0.1 * (u(1, 1, 1) - 0.5)
    return (x + 0.04 * u(1, 1, 1) * torch.from_numpy(rng.standard_normal(x.shape, np.float32))).clamp(0, 1)


def train_classifier(steps=600, seed=0, device="cpu", batch=64, lr=6e-3):
    """Trains on fresh renders, subject and style drawn uniformly (held-out ones included)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Classifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    for _ in range(steps):
        pick = lambda k: LABELS[k][rng.integers(len(LABELS[k]))]
        scenes = [scene_for(rng, pick("subject"), pick("style")) for _ in range(batch)]
        x = augment([render(s)[0] for s in scenes], rng).to(device)
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
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"labels": json.dumps(LABELS)})


def load(path, device="cpu"):
    """A Classifier from a save()d file; refuses one trained for a different label set."""
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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t = time.time()
    model = train_classifier(args.steps, args.seed)
    print(f"trained {args.steps} steps in {time.time() - t:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save(model, args.out)
    table = accuracy(model)
    print(f"{'split':10s}" + "".join(f"{k:>12s}" for k in LABELS))
    for split, row in table.items():
        print(f"{split:10s}" + "".join(f"{row[k]:12.3f}" if k in row else f"{'-':>12s}" for k in LABELS))


if __name__ == "__main__":
    main()
