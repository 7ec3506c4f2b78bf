"""Teach minisd-tiny's VAE the held-out character and style without moving the latent space the U-Net learned.

SD's VAE is a general-purpose image codec: it can encode a person or a style no U-Net prompt has ever named.
minisd-tiny's VAE was first trained on base scenes only and cannot: its reconstructions of the held-out robot and
rings style are read correctly far less often than base scenes (see the printed table), and an adapter cannot learn
what the VAE cannot represent. This fine-tunes encoder and decoder on renders of the base, identity and style
splits (never the combination "robot in rings") while anchoring the base scenes' latents to the original encoder's,
so the U-Net and text encoder, which never see the held-out subject and style, keep working unchanged.

    python -m tinyworld.tune_vae --steps 3000 --batch 128      # one GPU, about a minute; rewrites weights/tiny/vae/
"""
import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minisd
from . import classify
from .world import SPLITS, dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "tiny"
MIX = {"base": 0.5, "identity": 0.25, "style": 0.25}  # shares of a batch per split: no "combo"


def images_of(split, n, seed):
    return classify.to_tensor([im for im, _, _ in dataset(n, seed, split)]) * 2 - 1  # (n, 3, 64, 64) in [-1, 1]


@torch.no_grad()
def reconstruction_accuracy(vae, judge, n=128, seed=777):
    """{split: fraction of reconstructions whose subject and style the classifier reads right}."""
    out, device = {}, next(vae.parameters()).device
    for split in SPLITS:
        data = dataset(n, seed, split)
        x = classify.to_tensor([im for im, _, _ in data]).to(device) * 2 - 1
        rec = (vae.decode(vae.encode(x)[0]).clamp(-1, 1) + 1) / 2
        pred = classify.predict(judge, rec)
        out[split] = float(np.mean([pred["subject"][i] == s.subject and pred["style"][i] == s.style
                                    for i, (_, _, s) in enumerate(data)]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(TINY))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--anchor", type=float, default=10.0, help="weight of the base-latent anchor (latents in unit-variance scale)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="diffusers folder whose vae/ is rewritten (default: --ckpt)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    t0 = time.time()
    sd = minisd.load(args.ckpt, device=args.device)
    judge = classify.load(TINY / "classifier.safetensors", device=args.device)
    vae, old = sd.vae, copy.deepcopy(sd.vae).requires_grad_(False)
    before = reconstruction_accuracy(vae, judge)
    pools = {split: images_of(split, 1500 if split == "base" else 600, seed=100 + i).to(args.device) for i, split in enumerate(MIX)}
    counts = {split: max(1, round(share * args.batch)) for split, share in MIX.items()}
    scale = vae.cfg.scale_factor
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        x = torch.cat([pools[s][torch.randint(len(pools[s]), (k,), generator=g)] for s, k in counts.items()])
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(x.device)
        rec = vae.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        with torch.no_grad():
            anchor = old.encode(x[:counts["base"]])[0]
        drift = F.mse_loss(mean[:counts["base"]] * scale, anchor * scale)  # the U-Net's latent space stays put
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-6 * kl + args.anchor * drift
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  base-latent drift {drift.item():.5f}  {time.time() - t0:.0f}s", flush=True)
    vae.eval().requires_grad_(False)
    after = reconstruction_accuracy(vae, judge)
    with torch.no_grad():
        x = images_of("base", 256, seed=999).to(args.device)
        drift = ((vae.encode(x)[0] - old.encode(x)[0]).norm() / old.encode(x)[0].norm()).item()
    out = Path(args.out or args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:  # only vae/ changes; the rest of the folder is left byte for byte
        for model in (sd.unet, sd.vae, sd.text_encoder):
            model.float().cpu()
        minisd.save_diffusers(sd, tmp, dtype=torch.float16)
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.copytree(Path(tmp) / "vae", out / "vae")
    report = {"command": "python -m tinyworld.tune_vae " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
              "device": torch.cuda.get_device_name() if "cuda" in args.device else "cpu", "seconds": round(time.time() - t0), "reconstruction_subject_and_style_right": {"before": before, "after": after},
              "base_latent_relative_change": round(drift, 5)}
    info = out / "training.json"
    if info.exists():
        record = json.loads(info.read_text())
        record["vae_tuning"] = report
        info.write_text(json.dumps(record, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
