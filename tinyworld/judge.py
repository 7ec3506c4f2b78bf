"""The world's judges: one small CNN with classifier heads and two embeddings, trained to hold on generated images.

Heads: subject (a shape or "character"), member (which of the 512 characters), style family, colour, background.
Embeddings (64-d, unit length): **identity** (contrastive over character members, positives in other colours,
styles, sizes and places: invariant to style) and **style** (contrastive over style members, positives on other
subjects and colours: invariant to content), the analogues of DINO / CLIP-I and style similarity for SD.

It trains on renders of the whole world (every member and style, held-out ones included), degraded the way
generated images are: VAE round trips through minisd-tiny's own VAE, Gaussian blur up to σ 2.5, hue rotations
(colour identifies nothing: the colour and background heads skip hue-rotated images), contrast jitter and noise.

A hit: the identity embedding's cosine similarity to the member's prototype (the mean embedding of clean renders)
above the member's threshold, and the same for the style; "both" = both hits. Thresholds are set by `calibrate`
on VAE round-tripped ground truth and stored in the judge file.

    python -m tinyworld.judge --vae weights/tiny --out weights/tiny/judge.safetensors      # one GPU, ~2 minutes
"""
import argparse
import json
import os
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .world import (BACKGROUNDS, BASE_STYLES, CHARACTER, COLOURS, FAMILIES, HELD_MEMBERS, HELD_STYLE, HELD_STYLES,
                    IDENTITY, MEMBERS, SUBJECTS, TRAITS, _ok, any_scene, dataset, member, render, scene_for, traits)

STYLES = (*BASE_STYLES, *HELD_STYLES)
LABELS = {"subject": SUBJECTS, "member": tuple(range(MEMBERS)), "family": FAMILIES, "colour": tuple(COLOURS),
          "background": tuple(BACKGROUNDS)}


class Judge(nn.Module):
    """A 4x4 stride-2 stem (64 -> 32 px), three conv-BN-ReLU-maxpool stages (-> 4 px), global average pool; a linear
    layer per head and per embedding. ~1 M parameters."""

    def __init__(self, widths=(48, 96, 160, 256), dim=64):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(widths[-1], len(v)) for k, v in LABELS.items()})
        self.embed = nn.ModuleDict({k: nn.Linear(widths[-1], dim) for k in ("identity", "style")})
        self.register_buffer("thresholds", torch.zeros(2, max(len(HELD_MEMBERS), len(HELD_STYLES))))
        self.prototypes = {}  # (kind, target) -> unit embedding, made once by prototype() for the trained weights

    def forward(self, images):
        """images (B, 3, 64, 64) in [0, 1] -> {head: logits}, {"identity" / "style": unit embeddings (B, 64)}."""
        h = self.features(images * 2 - 1).mean((2, 3))
        return ({k: head(h) for k, head in self.heads.items()},
                {k: F.normalize(e(h), dim=-1) for k, e in self.embed.items()})


def labels_of(scene):
    """(subject, member or -1, family, colour, background, identity class, style class) indices of a Scene."""
    member = scene.member if scene.subject == CHARACTER else -1
    identity = member if member >= 0 else MEMBERS + SUBJECTS.index(scene.subject)  # shapes are their own identities
    return (SUBJECTS.index(scene.subject), member, FAMILIES.index(scene.style.family), list(COLOURS).index(scene.colour),
            list(BACKGROUNDS).index(scene.background), identity, STYLES.index(scene.style))


def _render_chunk(seed):
    rng = np.random.default_rng(seed)
    scenes = [any_scene(rng) for _ in range(1000)]
    return np.stack([np.asarray(render(s)[0]) for s in scenes]), np.array([labels_of(s) for s in scenes])


def render_pool(n, seed=0):
    """n whole-world renders: (uint8 (n, 64, 64, 3), int labels (n, 7))."""
    with Pool(min(16, os.cpu_count())) as pool:
        chunks = pool.map(_render_chunk, range(seed * 10**6, seed * 10**6 + n // 1000))
    return torch.from_numpy(np.concatenate([c[0] for c in chunks])), torch.from_numpy(np.concatenate([c[1] for c in chunks]))


def to_tensor(images):
    """PIL images or uint8 (B, 64, 64, 3) -> (B, 3, 64, 64) float in [0, 1]."""
    if not torch.is_tensor(images):
        images = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    return images.permute(0, 3, 1, 2).float() / 255


def blur(x, sigma):
    """Gaussian blur of (B, 3, H, W) with one sigma per image (0: unchanged), as a separable 9-tap filter."""
    r = torch.arange(-4, 5, device=x.device, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 9); sigma -> 0 gives the identity filter
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, 0)  # (B*3, 9)
    y = F.conv2d(F.pad(y, (4, 4, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def hue_rotate(x, angle):
    """Rotates colours about the gray axis by angle (B,) radians: hue changes, brightness and gray stay."""
    u = torch.full((3,), 3 ** -0.5, device=x.device)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    cross = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]], device=x.device)
    rot = cos * torch.eye(3, device=x.device) + sin * cross + (1 - cos) * torch.outer(u, u)  # Rodrigues
    return torch.einsum("bij,bjhw->bihw", rot, x).clamp(0, 1)


def degrade(x, vae, g):
    """Generated-image degradations of (B, 3, 64, 64) in [0, 1]; returns the images and which were hue-rotated."""
    n, dev = len(x), x.device
    u = lambda: torch.rand(n, generator=g).to(dev)
    if vae is not None:
        trip = u() < 0.5
        if trip.any():
            with torch.no_grad():
                z = vae.encode(x[trip] * 2 - 1)[0]
                z = z + 0.1 * z.std() * torch.randn(z.shape, generator=g).to(dev) * u()[trip, None, None, None]
                x = x.clone()
                x[trip] = vae.decode(z).float().add(1).div(2).clamp(0, 1)
    x = blur(x, torch.where(u() < 0.5, 2.5 * u(), torch.zeros(n, device=dev)))
    hue = u() < 0.5
    x = torch.where(hue[:, None, None, None], hue_rotate(x, 2 * np.pi * u()), x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.8 + 0.4 * u())[:, None, None, None] + mean
    x = x + 0.05 * u()[:, None, None, None] * torch.randn(x.shape, generator=g).to(dev)
    return x.clamp(0, 1), hue


def supcon(z, labels, temperature=0.1):
    """Supervised contrastive loss (Khosla et al. 2020) of unit embeddings z (B, D) with integer labels (B,)."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logp = sim.masked_fill(eye, -1e9).log_softmax(-1)
    pos = (labels[:, None] == labels[None]) & ~eye
    has = pos.any(1)
    return -(logp * pos).sum(1)[has].div(pos.sum(1)[has]).mean()


def batch_indices(labels, buckets, n, g):
    """n anchors, each with an identity partner (same identity class) and a style partner (same style)."""
    anchors = torch.randint(len(labels), (n,), generator=g)
    partner = lambda col, i: [buckets[col][int(labels[a, col])][torch.randint(len(buckets[col][int(labels[a, col])]),
                                                                              (1,), generator=g)] for a in i]
    return torch.cat([anchors, torch.cat(partner(5, anchors)), torch.cat(partner(6, anchors))])


def train_judge(images, labels, vae=None, steps=3000, batch=256, lr=2e-3, device="cpu", seed=0):
    """Trains on (images, labels) from render_pool, degraded on the fly (vae: minisd-tiny's, for round trips)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Judge().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    buckets = {}  # {label column: {class: pool indices}} for drawing partners
    for col in (5, 6):
        order = torch.argsort(labels[:, col])
        values, counts = torch.unique_consecutive(labels[order, col], return_counts=True)
        buckets[col] = dict(zip(values.tolist(), torch.split(order, counts.tolist())))
    for step in range(steps):
        idx = batch_indices(labels, buckets, batch, g)
        x, hue = degrade(to_tensor(images[idx]).to(device), vae, g)
        y = labels[idx].to(device)
        logits, emb = model(x)
        loss = F.cross_entropy(logits["subject"], y[:, 0]) + F.cross_entropy(logits["family"], y[:, 2])
        loss = loss + F.cross_entropy(logits["member"], y[:, 1], ignore_index=-1)
        for k, col in (("colour", 3), ("background", 4)):  # hue-rotated images keep no colour to name
            loss = loss + F.cross_entropy(logits[k], torch.where(hue, -1, y[:, col]), ignore_index=-1)
        loss = loss + supcon(emb["identity"], y[:, 5]) + supcon(emb["style"], y[:, 6])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"judge step {step:5d}  loss {loss.item():.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def embed(model, x, batch=512):
    """(B, 3, 64, 64) in [0, 1] -> (logits, embeddings), in batches, on the model's device."""
    dev = next(model.parameters()).device
    outs = [model(x[i:i + batch].to(dev, torch.float32)) for i in range(0, len(x), batch)]
    return ({k: torch.cat([o[0][k] for o in outs]).cpu() for k in LABELS},
            {k: torch.cat([o[1][k] for o in outs]).cpu() for k in ("identity", "style")})


def prototype(model, kind, target, n=96, seed=55):
    """The unit mean embedding of n clean renders of a member (kind "identity") or a Style (kind "style"), on random
    subjects, colours, styles and places; kept on the model, so every score() call does not render them again."""
    if (kind, target, n, seed) in model.prototypes:
        return model.prototypes[kind, target, n, seed]
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[rng.integers(len(seq))]
    if kind == "identity":
        scenes = [scene_for(rng, CHARACTER, pick(STYLES), target) for _ in range(n)]
    else:
        scenes = [scene_for(rng, pick(SUBJECTS), target, int(rng.integers(MEMBERS))) for _ in range(n)]
    e = embed(model, to_tensor([render(s)[0] for s in scenes]))[1][kind]
    model.prototypes[kind, target, n, seed] = F.normalize(e.mean(0), dim=0)
    return model.prototypes[kind, target, n, seed]


def score(model, images, identity, style):
    """Per image: identity / style similarity to the prototypes, hits against the stored thresholds, "both", and the
    heads' readings. images (B, 3, 64, 64) in [0, 1]; identity a held-out member id, style a held-out Style."""
    logits, emb = embed(model, images)
    sim_id = emb["identity"] @ prototype(model, "identity", identity)
    sim_st = emb["style"] @ prototype(model, "style", style)
    t_id = model.thresholds[0, HELD_MEMBERS.index(identity)].item()
    t_st = model.thresholds[1, HELD_STYLES.index(style)].item()
    read = {k: [LABELS[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}
    return {"identity_sim": sim_id, "style_sim": sim_st, "identity": sim_id >= t_id, "style": sim_st >= t_st,
            "both": (sim_id >= t_id) & (sim_st >= t_st), "read": read}


def youden(pos, neg):
    """The threshold that maximises TPR - FPR over the observed similarities, placed halfway into the gap below it
    (the lowest value that reaches the maximum would sit on the weakest positive: generated images, a little less
    clean than ground truth, would fall under it); (threshold, TPR, FPR)."""
    cands = torch.cat([pos, neg]).sort().values
    tpr = (pos[None] >= cands[:, None]).float().mean(1)
    fpr = (neg[None] >= cands[:, None]).float().mean(1)
    i = int((tpr - fpr).argmax())
    t = (cands[i] + cands[i - 1]) / 2 if i > 0 else cands[0]
    return t.item(), tpr[i].item(), fpr[i].item()


def round_trip(vae, x):
    """VAE encode (mean) + decode of (B, 3, 64, 64) in [0, 1], as generated images pass through the decoder."""
    if vae is None:
        return x
    dev = next(vae.parameters()).device
    with torch.no_grad():
        out = [vae.decode(vae.encode(x[i:i + 256].to(dev) * 2 - 1)[0]).float().add(1).div(2).clamp(0, 1).cpu()
               for i in range(0, len(x), 256)]
    return torch.cat(out)


def calibrate(model, vae, n=256, seed=77):
    """Sets each held-out member's and style's threshold on VAE round-tripped ground truth (positives: n renders of
    it, any style or subject; negatives: n renders of anything else); returns {name: (threshold, TPR, FPR)}."""
    rng, report = np.random.default_rng(seed), {}
    pick = lambda seq: seq[rng.integers(len(seq))]
    sims = lambda scenes, kind, target: embed(model, round_trip(vae, to_tensor([render(s)[0] for s in scenes])))[1][
        kind] @ prototype(model, kind, target)
    for i, m in enumerate(HELD_MEMBERS):
        pos = [scene_for(rng, CHARACTER, pick(STYLES), m) for _ in range(n)]
        neg = [scene_for(rng, CHARACTER, pick(STYLES), int(x)) for x in rng.integers(MEMBERS, size=2 * n) if x != m][:n]
        t = youden(sims(pos, "identity", m), sims(neg, "identity", m))
        model.thresholds[0, i], report[f"member {m}"] = t[0], t
    for i, st in enumerate(HELD_STYLES):
        pos = [scene_for(rng, pick(SUBJECTS), st, int(rng.integers(MEMBERS))) for _ in range(n)]
        neg = [scene_for(rng, pick(SUBJECTS), s, int(rng.integers(MEMBERS))) for s in
               [pick(STYLES) for _ in range(2 * n)] if s != st][:n]
        t = youden(sims(pos, "style", st), sims(neg, "style", st))
        model.thresholds[1, i], report[f"style {st.name}"] = t[0], t
    return report


def save(model, path):
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"labels": json.dumps({k: [str(x) for x in v] for k, v in LABELS.items()}),
                        "styles": json.dumps([s.name for s in STYLES]), "held_members": json.dumps(HELD_MEMBERS)})


def load(path, device="cpu"):
    """A Judge from a save()d file; refuses one trained for another world (labels, styles or held-out members)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = {"labels": json.dumps({k: [str(x) for x in v] for k, v in LABELS.items()}),
            "styles": json.dumps([s.name for s in STYLES]), "held_members": json.dumps(HELD_MEMBERS)}
    if any(meta.get(k) != v for k, v in want.items()):
        raise ValueError(f"{path}: a judge for another tiny world; retrain it: python -m tinyworld.judge")
    model = Judge()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def report(model, vae, n=128, seed=99):
    """Validation on ground truth: hit rates per split, clean / blurred (σ 2) / VAE round-tripped, and the colour
    shortcut tests (the identity in every palette colour; other members, its near neighbours among them)."""
    out = {}
    for split in ("base", "identity", "style", "combo"):
        x = to_tensor([im for im, _, _ in dataset(n, seed, split)])
        for name, xx in (("clean", x), ("blur2", blur(x, torch.full((len(x),), 2.0))), ("vae", round_trip(vae, x))):
            s = score(model, xx, IDENTITY, HELD_STYLE)
            out[f"{split}/{name}"] = {k: float(s[k].float().mean()) for k in ("identity", "style", "both")}
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[rng.integers(len(seq))]
    per_colour = {}
    for colour in COLOURS:
        scenes = [replace(s, colour=colour, background=pick([b for b in BACKGROUNDS if _ok(COLOURS[colour], b)]))
                  for s in (scene_for(rng, CHARACTER, pick(STYLES), IDENTITY) for _ in range(32))]
        x = round_trip(vae, to_tensor([render(s)[0] for s in scenes]))
        per_colour[colour] = float(score(model, x, IDENTITY, HELD_STYLE)["identity"].float().mean())
    out["identity in each colour (VAE round trip)"] = per_colour
    near = [member(tuple(v if j == k else t for j, t in enumerate(traits(IDENTITY)))) for k, names in enumerate(TRAITS)
            for v in names if v != traits(IDENTITY)[k]]
    for name, members in (("near neighbours (one trait off)", near), ("other members", range(MEMBERS))):
        scenes = [scene_for(rng, CHARACTER, pick(STYLES), int(pick([m for m in members if m != IDENTITY])))
                  for _ in range(n)]
        x = round_trip(vae, to_tensor([render(s)[0] for s in scenes]))
        out[f"false identity: {name}"] = float(score(model, x, IDENTITY, HELD_STYLE)["identity"].float().mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default="weights/tiny", help="minisd-tiny folder whose VAE degrades the training images")
    ap.add_argument("--out", default="weights/tiny/judge.safetensors")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--pool", type=int, default=120_000, help="whole-world renders to train on")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import minisd
    t0 = time.time()
    vae = minisd.load(args.vae, device=args.device).vae.float().eval() if args.vae else None
    images, labels = render_pool(args.pool)
    print(f"rendered {len(images)} scenes in {time.time() - t0:.0f}s", flush=True)
    model = train_judge(images, labels, vae, args.steps, device=args.device)
    thresholds = calibrate(model, vae)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save(model, args.out)
    validation = report(model, vae)
    result = {"command": "python -m tinyworld.judge " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "seconds": round(time.time() - t0), "thresholds (threshold, TPR, FPR)": thresholds,
              "validation": validation}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
