"""`minisd.load`: any official SD 1.x layout -> a StableDiffusion (U-Net, VAE, text encoder, tokenizer, schedule)."""
import itertools
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, file_errors, load_strict
from .ddim import Schedule
from .layouts import read_layout
from .samplers import sampler_named
from .text import build_text_encoder, encode_prompts, encode_weighted_prompts
from .tokenizer import load_tokenizer, packaged_tokenizer
from .unet import UNet
from .vae import AutoencoderKL

class StableDiffusion:
    """The models and the sampler. `fast`: a speed layer, or None (plain PyTorch, the code below). minisd.load
    attaches minisd.fast's (minisd.fast.attach); this file never imports it. A speed layer offers
    guided_step(sd, x, ctx, guidance, on_step) -> eps(x, t, ctx) and encode_text(text_encoder, ids), each computing
    what the code below computes (the guided U-Net step of sample(), the text encoder's last hidden state), and
    takes(on_step): whether it can run with that on_step."""

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule=Schedule(), sample_size=64, name="", fast=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule, self.name, self.fast = schedule, name, fast
        self.native_size = sample_size * vae.cfg.downscale  # 64 latents * 8 = 512 for SD 1.4

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def uses_fast(self, cuda_graph=None, on_step=None):
        """Whether sample() takes the speed layer: cuda_graph None (the default) where one is attached, the U-Net is
        on CUDA and the layer takes the on_step (fast.takes: a replayed model does not see other per-step changes);
        True needs both; False never."""
        takes = on_step is None or (self.fast is not None and self.fast.takes(on_step))
        if cuda_graph is None:
            return self.fast is not None and self.device.type == "cuda" and takes
        if cuda_graph and self.fast is None:
            raise ValueError("cuda_graph=True needs a speed layer: minisd.load attaches it (or minisd.fast.attach(sd))")
        if cuda_graph and not takes:  # a graph replays the model as captured: per-step changes are lost
            raise ValueError("cuda_graph=True replays a fixed model: this on_step (per-step changes) runs eager only")
        return bool(cuda_graph)

    @torch.no_grad()
    def encode_prompt(self, prompts, cuda_graph=False, weighted=False):
        """list of str -> (B, 77, 768) CLIP last hidden state, in the U-Net's dtype (cuda_graph: through the speed
        layer's encode_text, a CUDA graph replay). weighted: webui's prompt syntax, (word:1.2) and any length in
        75-token chunks (B, 77 k, 768) (minisd.text.encode_weighted_prompts), as sample() reads prompts; else the
        plain tokens, truncated to 77, as training reads captions."""
        run = (lambda ids: self.fast.encode_text(self.text_encoder, ids)) if self.uses_fast(cuda_graph) else None
        encode = encode_weighted_prompts if weighted else encode_prompts
        return encode(self.tokenizer, self.text_encoder, prompts, run).to(self.dtype)

    def guided_step(self, x, ctx, guidance):
        """eps(x, t, ctx) of one sampling step: the U-Net on [x, x] against ctx = [uncond; cond] and the guided
        eps_u + guidance (eps_c - eps_u); guidance None: the U-Net on x alone."""
        def eps(x, t, ctx):
            out = self.unet(torch.cat([x, x]) if guidance is not None else x, torch.tensor(t, device=self.device), ctx)
            if guidance is None:
                return out
            eps_uncond, eps_text = out.chunk(2)
            return eps_uncond + guidance * (eps_text - eps_uncond)
        return eps

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents (what the U-Net sees) -> images (B, 3, H, W) in [0, 1], float32 on the CPU.
        Two images at a time: the VAE's full-resolution layers are the sampler's memory peak
        (docs/performance.md#memory)."""
        z = latents.to(self.dtype) / self.vae.cfg.scale_factor
        return torch.cat([(self.vae.decode(pair).float() / 2 + 0.5).clamp(0, 1).cpu() for pair in z.split(2)])

    @torch.no_grad()
    def sample(self, prompts, negative_prompt="", steps=50, guidance=7.5, eta=0.0, height=None, width=None,
               n=1, seed=0, progress=True, cuda_graph=None, sampler="DDIM", on_step=None):
        """Classifier-free guided sampling with `sampler` (minisd.samplers: "DDIM", "DPM++ 2M Karras", "Euler a").
        Prompts are read as webui reads them: (word:1.2), (word), [word], BREAK, any length (encode_prompt).
        Returns images (len(prompts) * n, 3, H, W) in [0, 1].

        The initial latents are torch.randn((B, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))
        in float32, as diffusers' StableDiffusionPipeline draws them; eta > 0 (DDIM) and Euler a's per-step noise
        continue the same stream. on_step(i), if given, runs before step i's U-Net call (i = 0 .. steps - 1).
        cuda_graph: whether the steps and the text encoder run through the speed layer (self.fast; None: where one
        is attached, the model is on CUDA and it takes the on_step). minisd.fast replays each guided U-Net step from
        a CUDA graph, captured on first use per batch, size, dtype and guidance, without the kernel-launch overhead
        (the text encoder too, per batch); it also stores the U-Net's and the VAE's conv weights channels_last (same
        function, other cuDNN kernels: fp16-rounding-level differences). cuda_graph=False: the eager guided_step."""
        name, run = sampler_named(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height, width = height or self.native_size, width or self.native_size
        f = self.vae.cfg.downscale
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0 (<= 1: no classifier-free guidance), got {guidance}")
        if eta and name != "DDIM":
            raise ValueError(f"eta is DDIM's; {name} takes none")
        prompts = [p for p in prompts for _ in range(n)]
        B = len(prompts)
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((B, self.unet.cfg.in_channels, height // f, width // f), generator=g)
        x = x.to(self.device, self.dtype)
        guided = guidance > 1.0  # diffusers skips the unconditional pass at guidance <= 1
        fast = self.uses_fast(cuda_graph, on_step)
        ctx = self.encode_prompt(([negative_prompt] * B if guided else []) + prompts, fast, weighted=True)
        step = (self.fast.guided_step(self, x, ctx, guidance if guided else None, on_step) if fast else
                self.guided_step(x, ctx, guidance if guided else None))
        count, bar = itertools.count(), tqdm(total=steps, desc="sampling", disable=not progress)

        def model(x_in, t):  # the guided eps
            if on_step:
                on_step(next(count))
            eps = step(x_in, t, ctx)
            bar.update()
            return eps

        noise = lambda: torch.randn(x.shape, generator=g).to(self.device, self.dtype)
        with bar:
            x = run(model, x, self.schedule, steps, noise, **({"eta": eta} if name == "DDIM" else {}))
        return self.decode(x)


def load(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """Load SD 1.x from an LDM single file (.safetensors / .ckpt) or a diffusers folder. tokenizer: a CLIP tokenizer
    folder or hub name (in the local cache); default: the folder's tokenizer/, for a single file the CLIP tokenizer
    shipped in minisd/clip_tokenizer."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    with file_errors(path, "not a usable SD 1.x checkpoint"):  # reading the file and making sense of it
        parts = read_layout(path, device, dtype)
        text_encoder = build_text_encoder(parts.text_sd, path, parts.text_cfg)
    with torch.device("meta"):  # no time spent on random init; every tensor is assigned from the file. The model
        unet, vae = UNet(parts.unet_cfg), AutoencoderKL(parts.vae_cfg)  # code raises as it is: an edited unet.py
    load_strict(unet, parts.unet_sd, path, "U-Net")  # shows its own error
    load_strict(vae, parts.vae_sd, path, "VAE")
    if tokenizer or path.is_dir():
        tok = load_tokenizer(tokenizer or path / "tokenizer")
    else:  # a single file has none: CLIP's, shipped with minisd
        tok = packaged_tokenizer(text_encoder, path)
    for m in (unet, vae, text_encoder):  # the weights are there already (read_state_dict): this moves the rest
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, text_encoder, tok, parts.schedule, parts.sample_size, name=path.stem)
