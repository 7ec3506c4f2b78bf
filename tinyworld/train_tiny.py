"""Train minisd-tiny from scratch on the tiny world: the VAE on the whole world, then text encoder + U-Net on base.

    python -m tinyworld.train_tiny --out weights/tiny                  # one GPU (times: weights/tiny/training.json)
    python -m tinyworld.train_tiny --out /tmp/t --smoke --device cpu    # the plumbing (tests/test_world.py runs it)

The same minisd classes as SD 1.4 with a small config (the U-Net keeps the 12 + 1 + 12 block structure, so block
tables and presets apply unchanged). 64x64 images, a 2x VAE: 32x32x4 latents, so the U-Net's levels run at
32/16/8/4 pixels (SD 1.4 at 512²: 64/32/16/8). The VAE is a general codec of the world (every character member and
style, held-out ones included, as SD's VAE encodes faces and styles no prompt names); the U-Net and text encoder
never see a held-out member or style. The result is written as a diffusers folder and loads with minisd.load.

Resumable: every run writes <out>/checkpoint.pt (models, optimizers, EMA, step, generator) when its --minutes
budget ends or every --save-minutes; the same command continues from it, and ends with the same total steps and
schedule, so a long training can run as several short runs. The checkpoint is removed when training is done.
"""
import argparse
import json
import math
import os
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import minisd
from minisd import AutoencoderKL, Schedule, StableDiffusion, UNet, UNetConfig, VAEConfig
from minisd.clip import CLIPTextConfig, CLIPTextModel
from minisd.save import save_diffusers
from minisd.tokenizer import load_tokenizer
from .tokenizer import write_tokenizer
from .world import any_scene, random_scene, render

UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 3, 4), context_dim=128, num_heads=4, norm_groups=8)  # 7.0 M
VAE = VAEConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, norm_groups=16)  # 64x64x3 <-> 32x32x4, 2.6 M
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")


def _render_base(seed, n):
    """A chunk of n base scenes: (uint8 images, captions)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, "base") for _ in range(n)]
    return np.stack([np.asarray(render(s)[0]) for s in scenes]), [s.caption() for s in scenes]


def _render_any(seed, n):
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(any_scene(rng))[0]) for _ in range(n)])


def render_sets(n_base, n_any):
    """(base images (N, 64, 64, 3) uint8, base captions, whole-world images) from fixed seeds (a seed per chunk of
    1000 scenes), in parallel."""
    with Pool(min(16, os.cpu_count())) as pool:
        base = pool.starmap(_render_base, [(seed, min(1000, n_base)) for seed in range(max(1, n_base // 1000))])
        world = pool.starmap(_render_any, [(10**6 + i, min(1000, n_any)) for i in range(max(1, n_any // 1000))])
    images = torch.from_numpy(np.concatenate([b[0] for b in base]))
    return images, [c for b in base for c in b[1]], torch.from_numpy(np.concatenate(world))


def lr_at(step, total, peak, warmup=200):
    return peak * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def to_unit(x, device):
    """uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [-1, 1] on device."""
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def vae_step(vae, x, device):
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        rec = vae.decode(z).float()
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
    return (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-6 * kl


def unet_step(unet, text, z0, tok, ac, snr, g, device):
    """Noise-prediction loss with min-SNR-5 weighting (Hang et al. 2023)."""
    batch = len(z0)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    a = ac[t][:, None, None, None]
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        eps = unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, text(tok)).float()
    w = torch.clamp(snr[t], max=5.0) / snr[t]
    return (w * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def clip_init(text):
    """CLIP's initialization (transformers' CLIPPreTrainedModel._init_weights, factor 1): embeddings N(0, 0.02);
    out_proj N(0, width^-0.5); q, k, v and fc2 N(0, width^-0.5 / sqrt(2 layers)); fc1 N(0, (2 width)^-0.5); biases 0,
    norms 1."""
    width, layers = text.config.hidden_size, text.config.num_hidden_layers
    residual = width ** -0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        for name, p in text.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.fill_(float(name.endswith("weight")))
            else:
                std = (0.02 if "embedding" in name else width ** -0.5 if "out_proj" in name
                       else (2 * width) ** -0.5 if "fc1" in name else residual)
                p.normal_(0, std)
    return text


class Run:
    """The models, optimizers and counters of a training, saved to and restored from one checkpoint file."""

    def __init__(self, tokenizer, device):
        self.vae = AutoencoderKL(VAE).to(device)
        self.unet = UNet(UNET).to(device)
        self.ema = UNet(UNET).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.unet.state_dict())
        self.text = clip_init(CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT))).to(device)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW([*self.unet.parameters(), *self.text.parameters()], lr=5e-4, weight_decay=0.01)
        self.g = torch.Generator().manual_seed(1)
        self.vae_step = self.unet_step = 0
        self.scale_factor, self.history, self.seconds, self.unet_steps = None, [], 0.0, None

    PARTS = ("vae", "unet", "ema", "text", "vae_opt", "unet_opt")

    def save(self, path):
        state = {k: getattr(self, k).state_dict() for k in self.PARTS}
        state.update(g=self.g.get_state(), vae_step=self.vae_step, unet_step=self.unet_step, unet_steps=self.unet_steps,
                     scale_factor=self.scale_factor, history=self.history, seconds=self.seconds)
        torch.save(state, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)  # atomic: a run killed while saving keeps the previous checkpoint

    def load(self, path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k in self.PARTS:
            getattr(self, k).load_state_dict(state[k])
        self.g.set_state(state["g"])
        for k in ("vae_step", "unet_step", "unet_steps", "scale_factor", "history", "seconds"):
            setattr(self, k, state[k])


def train(run, images, world, ids, empty_ids, args, device, deadline, save):
    """Continues the VAE, then the U-Net phase, until both are done (True) or the deadline passes (False)."""
    def log(phase, step, loss):
        seconds = round(run.seconds + time.time() - save.since, 1)
        run.history.append({"phase": phase, "step": step, "loss": loss, "seconds": seconds})
        print(f"{phase} step {step:5d}  loss {loss:.4f}", flush=True)

    last_save = time.time()
    while run.vae_step < args.vae_steps:
        x = to_unit(world[torch.randint(len(world), (args.batch,), generator=run.g)], device)
        loss = vae_step(run.vae, x, device)
        for group in run.vae_opt.param_groups:
            group["lr"] = lr_at(run.vae_step, args.vae_steps, 1e-3)
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        run.vae_opt.step()
        if run.vae_step % 500 == 0 or run.vae_step == args.vae_steps - 1:
            log("vae", run.vae_step, loss.item())
        run.vae_step += 1
        if time.time() > deadline:
            return False
        if time.time() - last_save > 60 * args.save_minutes:
            save()
            last_save = time.time()
    latents = encode_all(run.vae, images, device)
    if run.scale_factor is None:  # unit variance, as 0.18215 gives SD
        run.scale_factor = round(1.0 / latents.std().item(), 5)
    latents *= run.scale_factor
    ac = Schedule().alphas_cumprod.float().to(device)
    snr = ac / (1 - ac)
    params, t20 = [*run.unet.parameters(), *run.text.parameters()], None
    while run.unet_step < args.unet_steps:
        idx = torch.randint(len(latents), (args.batch,), generator=run.g)
        drop = torch.rand(args.batch, generator=run.g) < 0.1  # caption dropout: trains the unconditional branch
        tok = torch.where(drop[:, None], empty_ids, ids[idx]).to(device)
        loss = unet_step(run.unet, run.text, latents[idx].to(device), tok, ac, snr, run.g, device)
        for group in run.unet_opt.param_groups:
            group["lr"] = lr_at(run.unet_step, args.unet_steps, 5e-4)
        run.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run.unet_opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + run.unet_step) / (10 + run.unet_step))
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.unet.parameters()), 1 - decay)
        if run.unet_step % 500 == 0 or run.unet_step == args.unet_steps - 1:
            log("unet", run.unet_step, loss.item())
        run.unet_step += 1
        if run.unet_step == 20:
            t20 = time.time()
        if run.unet_step == 120 and t20 is not None:  # a fresh run on a slower device: fewer steps, the cosine schedule intact
            fit = 120 + int((deadline - 30 - time.time()) / ((time.time() - t20) / 100))
            if fit < args.unet_steps:
                print(f"U-Net steps {args.unet_steps} -> {fit} to fit --minutes", flush=True)
                args.unet_steps = fit
        if time.time() > deadline:
            return False
        if time.time() - last_save > 60 * args.save_minutes:
            save()
            last_save = time.time()
    return True  # (a resumed run keeps the step count its checkpoint was made with: see main)


@torch.no_grad()
def encode_all(vae, images, device):
    batch = 1024 if device.type == "cuda" else 32  # a CPU batch of 1024 holds about 5 GB of activations
    return torch.cat([vae.encode(to_unit(images[i:i + batch], device))[0].float()
                      for i in range(0, len(images), batch)])


def finish(run, tokenizer, out, args, device):
    vae = run.vae.eval().float()
    vae.cfg = replace(vae.cfg, scale_factor=run.scale_factor)
    sd = StableDiffusion(run.ema.eval().float(), vae, run.text.eval().float(), tokenizer, Schedule(), sample_size=32,
                         name="minisd-tiny")
    save_diffusers(sd, out, dtype=torch.float16)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool))
    (out / "training.json").write_text(json.dumps({
        "command": "python -m tinyworld.train_tiny " + flags, "device": gpu, "seconds": round(run.seconds),
        "base_images": args.base_images, "world_images": args.world_images, "scale_factor": run.scale_factor,
        "final_loss": {h["phase"]: h["loss"] for h in run.history},  # the last logged loss of each phase
        "history": run.history,
        "init": json.loads((Path(args.init) / "training.json").read_text()) if args.init else None}, indent=1))
    print(f"wrote {out}: {run.seconds:.0f}s of training on {gpu}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="weights/tiny", help="output diffusers folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--base-images", type=int, default=200_000)
    p.add_argument("--world-images", type=int, default=60_000)
    p.add_argument("--minutes", type=float, default=9.0, help="this run's budget; the same command continues later")
    p.add_argument("--save-minutes", type=float, default=3.0, help="checkpoint interval")
    p.add_argument("--init", help="a minisd-tiny folder to go on from (its VAE is kept: use with --vae-steps 0)")
    p.add_argument("--smoke", action="store_true", help="2 steps of each phase on 64 + 64 images (plumbing check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.unet_steps, args.batch, args.base_images, args.world_images = 2, 2, 4, 64, 64
    t0, device, out = time.time(), torch.device(args.device), Path(args.out)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images, captions, world = render_sets(args.base_images, args.world_images)
    print(f"rendered {len(images)} base and {len(world)} world scenes in {time.time() - t0:.0f}s", flush=True)
    write_tokenizer(out / "tokenizer")
    tokenizer = load_tokenizer(out / "tokenizer")
    tokenize = tokenizer.padded
    ids, empty_ids = tokenize(captions), tokenize([""])
    run, ckpt = Run(tokenizer, device), out / "checkpoint.pt"
    if args.init:  # go on from a trained minisd-tiny: its VAE as it is, a new U-Net schedule from its EMA weights
        init = minisd.load(args.init, device=device)
        for mine, theirs in ((run.vae, init.vae), (run.unet, init.unet), (run.ema, init.unet), (run.text, init.text_encoder)):
            mine.load_state_dict(theirs.float().state_dict())
        run.vae_step, run.scale_factor = args.vae_steps, init.vae.cfg.scale_factor
    if ckpt.exists():
        run.load(ckpt)
        print(f"resumed from {ckpt}: vae step {run.vae_step}, unet step {run.unet_step}", flush=True)

    args.unet_steps = run.unet_steps or args.unet_steps  # a resumed run keeps its schedule

    def save():
        run.unet_steps = args.unet_steps
        run.seconds += time.time() - save.since
        save.since = time.time()
        run.save(ckpt)
    save.since = time.time()
    done = train(run, images, world, ids, empty_ids, args, device, t0 + 60 * args.minutes, save)
    save()
    if not done:
        print(f"budget spent at vae step {run.vae_step}, unet step {run.unet_step}: run the same command to go on")
        return
    finish(run, tokenizer, out, args, device)
    ckpt.unlink()


if __name__ == "__main__":
    main()
