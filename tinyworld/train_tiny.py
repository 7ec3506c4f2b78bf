"""Train minisd-tiny from scratch on the tiny world's base split: the VAE first, then text encoder + U-Net.

    python -m tinyworld.train_tiny --out weights/tiny            # one GPU, about 8 minutes on an H100
    python -m tinyworld.train_tiny --out /tmp/t --smoke --device cpu   # seconds: checks the plumbing

The same minisd classes as SD 1.4 with a small config (the U-Net keeps the 12 + 1 + 12 block structure, so
block tables and presets apply unchanged). The result is written as a diffusers folder and loads with
minisd.load like any real checkpoint. The held-out character and style are never rendered here.
"""
import argparse
import itertools
import json
import math
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minisd import AutoencoderKL, Schedule, StableDiffusion, UNet, UNetConfig, VAEConfig
from minisd.save import save_diffusers
from .tokenizer import write_tokenizer
from .world import BACKGROUNDS, COLOURS, POSITIONS, SIZES, STYLES, SUBJECTS, Scene, _ok, render

UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), context_dim=128)  # 13 M parameters
VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)  # 64x64x3 <-> 16x16x4
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")


def base_scenes():
    """Every distinct scene of the base split (no held-out character, no held-out style)."""
    return [Scene(s, c, b, st, sz, p) for s, c, b, st, sz, p in
            itertools.product(SUBJECTS, COLOURS, BACKGROUNDS, STYLES, SIZES, POSITIONS) if b != c and _ok(COLOURS[c], b)]


def _render(scene):
    return np.asarray(render(scene)[0])


def lr_at(step, total, peak, warmup=200):
    return peak * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


class Budget:
    """Shrinks a phase's step count once its speed is known (steps 20..100, after warm-up), so that it ends within
    `seconds` of its start with the cosine schedule intact."""

    def __init__(self, seconds):
        self.seconds, self.t0, self.t20 = seconds, time.time(), None

    def fit(self, step, steps):
        if step == 20:
            self.t20 = time.time()
        if step == 100:
            per_step = (time.time() - self.t20) / 80
            print(f"  {per_step * 1000:.1f} ms/step", flush=True)
            return min(steps, step + int((self.seconds - (time.time() - self.t0)) / per_step))
        return steps


def train_vae(images, steps, batch, device, log, budget):
    vae = AutoencoderKL(VAE).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    step, clock = 0, Budget(budget)
    while step < steps:
        steps = clock.fit(step, steps)
        x = images[torch.randint(len(images), (batch,), generator=g)].to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            mean, logvar = vae.encode(x)
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            rec = vae.decode(z).float()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-6 * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log("vae", step, loss.item())
        step += 1
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, device, batch=1024):
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        out.append(vae.encode(x)[0].float())
    return torch.cat(out)


def train_unet(latents, ids, empty_ids, tokenizer, steps, batch, device, log, budget):
    unet = UNet(UNET).to(device)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT)).to(device)
    ema = UNet(UNET).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    ac = Schedule().alphas_cumprod.float().to(device)
    snr = ac / (1 - ac)
    g = torch.Generator(device="cpu").manual_seed(2)
    step, clock = 0, Budget(budget)
    while step < steps:
        steps = clock.fit(step, steps)
        idx = torch.randint(len(latents), (batch,), generator=g)
        z0 = latents[idx].to(device)
        tok = ids[idx].to(device)
        drop = torch.rand(batch, generator=g).to(device) < 0.1  # caption dropout: trains the unconditional branch
        tok = torch.where(drop[:, None], empty_ids.to(device), tok)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        a = ac[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            eps = unet(zt, t, text(tok).last_hidden_state).float()
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting (Hang et al. 2023)
        loss = (w * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 5e-4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log("unet", step, loss.item())
        step += 1
    return ema.eval(), text.eval().requires_grad_(False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="weights/tiny", help="output diffusers folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--minutes", type=float, default=8.0, help="time budget: fewer steps if the device is slower")
    p.add_argument("--smoke", action="store_true", help="a few steps on a few hundred images (plumbing check)")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    start, history = time.time(), []

    def log(phase, step, loss):
        history.append({"phase": phase, "step": step, "loss": loss, "seconds": round(time.time() - start, 1)})
        print(f"{phase} step {step:5d}  loss {loss:.4f}  {time.time() - start:6.0f}s", flush=True)

    scenes = base_scenes()
    if args.smoke:
        scenes, args.vae_steps, args.unet_steps, args.batch = scenes[::100], 20, 20, 8
    with Pool() as pool:
        images = torch.from_numpy(np.stack(pool.map(_render, scenes, chunksize=256)))  # (N, 64, 64, 3) uint8
    print(f"rendered {len(images)} base scenes in {time.time() - start:.0f}s", flush=True)
    if device.type == "cuda":
        images = images.pin_memory()

    write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    tokenize = lambda texts: tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids, empty_ids = tokenize([s.caption() for s in scenes]), tokenize([""])

    budget = 60 * args.minutes - (time.time() - start)
    vae = train_vae(images, args.vae_steps, args.batch, device, log, 0.2 * budget)
    latents = encode_all(vae, images, device)
    vae.cfg = replace(vae.cfg, scale_factor=round(1.0 / latents.std().item(), 5))  # unit variance, as 0.18215 gives SD
    unet, text = train_unet(latents * vae.cfg.scale_factor, ids, empty_ids, tokenizer, args.unet_steps, args.batch,
                            device, log, 60 * args.minutes - (time.time() - start) - 20)

    sd = StableDiffusion(unet.float(), vae.float(), text.float(), tokenizer, Schedule(), sample_size=16, name="minisd-tiny")
    save_diffusers(sd, out, dtype=torch.float16)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    (out / "training.json").write_text(json.dumps({"command": "python -m tinyworld.train_tiny " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not False and v is not True),
        "device": gpu, "seconds": round(time.time() - start), "images": len(scenes), "scale_factor": vae.cfg.scale_factor,
        "final_loss": {ph: next(h["loss"] for h in reversed(history) if h["phase"] == ph) for ph in ("vae", "unet")},
        "history": history}, indent=1))
    print(f"wrote {out} in {time.time() - start:.0f}s on {gpu}")


if __name__ == "__main__":
    main()
