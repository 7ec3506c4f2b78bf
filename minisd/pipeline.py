"""`minisd.load`: any official SD 1.x layout -> a StableDiffusion (U-Net, VAE, text encoder, tokenizer, schedule)."""
import itertools
import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import CLIPTextConfig

from .checkpoint import CheckpointError, file_errors, load_strict, read_state_dict, unet_from_diffusers, vae_from_diffusers
from .ddim import Schedule
from .files import read_regular
from .samplers import sampler_named
from .text import build_text_encoder, encode_prompts, encode_weighted_prompts, load_tokenizer, packaged_tokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

SINGLE_FILE_PARTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.transformer."}
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar", "lvlb_weights"}


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
        x = torch.randn((B, self.unet.cfg.in_channels, height // f, width // f), generator=g).to(self.device, self.dtype)
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
        parts = _read_diffusers_folder(path, device, dtype) if path.is_dir() else _read_single_file(path, device, dtype)
        unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd, text_cfg, schedule, sample_size = parts
        text_encoder = build_text_encoder(text_sd, path, text_cfg)
        check_widths(unet_cfg, vae_cfg, path)
    with torch.device("meta"):  # no time spent on random init; every tensor is assigned from the file. The model
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)  # code raises as it is: an edited unet.py shows its own error
    load_strict(unet, unet_sd, path, "U-Net")
    load_strict(vae, vae_sd, path, "VAE")
    if tokenizer or path.is_dir():
        tok = load_tokenizer(tokenizer or path / "tokenizer")
    else:  # a single file has none: CLIP's, shipped with minisd
        tok = packaged_tokenizer(text_encoder, path)
    for m in (unet, vae, text_encoder):  # the weights are there already (read_state_dict): this moves the rest
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, text_encoder, tok, schedule, sample_size, name=path.stem)


def _read_single_file(path, device, dtype):
    sd = read_state_dict(path, device, dtype, skip=("model_ema.",))  # the EMA copy is not used
    parts = {name: {} for name in SINGLE_FILE_PARTS}
    unknown = []
    for k, v in sd.items():
        name = next((n for n, p in SINGLE_FILE_PARTS.items() if k.startswith(p)), None)
        if name:
            parts[name][k[len(SINGLE_FILE_PARTS[name]):]] = v
        elif k not in DDPM_BUFFERS and not k.startswith("model_ema."):
            unknown.append(k)
    if unknown:
        hint = " (SDXL / SD 2.x layouts are not SD 1.x)" if any(k.startswith(("conditioner.", "cond_stage_model.model.")) for k in unknown) else ""
        raise CheckpointError(f"{path}: unexpected keys{hint} ({len(unknown)}): {', '.join(unknown[:4])}")
    for name, prefix in SINGLE_FILE_PARTS.items():
        if not parts[name]:
            raise CheckpointError(f"{path}: no {prefix}* weights; not an SD 1.x single-file checkpoint")
    return (parts["unet"], infer_unet_config(parts["unet"], path), parts["vae"], infer_vae_config(parts["vae"], path),
            parts["text"], None, Schedule(), 64)


def check_widths(unet_cfg, vae_cfg, path):
    """Every layer width a multiple of its GroupNorm's groups (GroupNorm refuses others): a file that says otherwise
    describes no buildable SD 1.x model."""
    for what, cfg, width, mult in (("U-Net", unet_cfg, unet_cfg.model_channels, unet_cfg.channel_mult),
                                   ("VAE", vae_cfg, vae_cfg.ch, vae_cfg.ch_mult)):
        widths = [width] + [width * m for m in mult]
        bad = sorted({w for w in widths if w <= 0 or w % cfg.norm_groups})
        if bad:
            raise CheckpointError(f"{path}: {what} widths {bad} are not positive multiples of its {cfg.norm_groups}"
                                  " norm groups")


def infer_unet_config(sd, path):
    """The UNetConfig of an LDM U-Net state dict (SD 1.x: 8 heads, 32 norm groups)."""
    try:
        mc = sd["input_blocks.0.0.weight"].shape[0]
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
        levels, current = [], []
        for b in blocks[1:]:
            if f"input_blocks.{b}.0.op.weight" in sd:
                levels.append(current)
                current = []
            else:
                current.append(b)
        levels.append(current)
        proj = next(v for k, v in sd.items() if k.endswith("proj_in.weight"))
        if proj.ndim != 4:
            raise CheckpointError(f"{path}: linear proj_in (an SD 2.x U-Net); minisd implements SD 1.x")
        return UNetConfig(
            in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
            channel_mult=tuple(sd[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0] // mc for lv in levels),
            num_res_blocks=len(levels[0]),
            attention_levels=tuple(i for i, lv in enumerate(levels) if f"input_blocks.{lv[0]}.1.proj_in.weight" in sd),
            context_dim=next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight")).shape[1])
    except (KeyError, IndexError, StopIteration) as e:
        raise CheckpointError(f"{path}: not an SD 1.x U-Net (cannot find {e})") from None


def infer_vae_config(sd, path):
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                         ch=ch, ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)),
                         num_res_blocks=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
                         z_channels=sd["post_quant_conv.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not an SD 1.x VAE (cannot find {e})") from None


CONFIG_BYTES = 1 << 20  # a diffusers config.json is about 1 kB
# What SD 1.x-shaped models use, with room (inpainting: 9 input channels; SD 1.x: 4 levels of <= 1280 channels, 2
# layers per level, 1000 timesteps); a config beyond these describes no SD 1.x model, only a huge allocation.
UNET_BOUNDS = (("in_channels", 1, 16), ("out_channels", 1, 16), ("block_out_channels", 1, 4096),
               ("layers_per_block", 1, 4), ("cross_attention_dim", 1, 4096), ("attention_head_dim", 1, 64),
               ("num_attention_heads", 1, 64), ("norm_num_groups", 1, 128), ("sample_size", 1, 1024))
VAE_BOUNDS = (("in_channels", 1, 16), ("out_channels", 1, 16), ("block_out_channels", 1, 4096),
              ("layers_per_block", 1, 4), ("latent_channels", 1, 64), ("norm_num_groups", 1, 128),
              ("scaling_factor", 1e-6, 1e6))
TEXT_BOUNDS = (("hidden_size", 1, 4096), ("intermediate_size", 1, 16384), ("num_hidden_layers", 1, 48),
               ("num_attention_heads", 1, 64), ("max_position_embeddings", 1, 1024), ("vocab_size", 1, 1 << 20))
SCHEDULER_BOUNDS = (("num_train_timesteps", 1, 10000), ("beta_start", 1e-9, 0.5), ("beta_end", 1e-9, 0.5))


def _read_json(path, bounds=()):
    """A config.json (a regular file of at most 1 MiB), with the keys of `bounds` ((key, lo, hi), ...) checked:
    a number or a list of 1..6 numbers in lo..hi."""
    try:
        cfg = json.loads(read_regular(path, CONFIG_BYTES, "config file"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: unreadable config (not a JSON object)")
    for key, lo, hi in bounds:
        values = cfg.get(key)  # absent or null: the default
        values = values if isinstance(values, list) else [] if values is None else [values]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi for v in values)
        if len(values) > 6 or not numbers:  # NaN fails lo <= v too
            raise CheckpointError(f"{path}: {key} = {str(cfg[key])[:60]} is outside what SD 1.x-shaped models use "
                                  f"({lo}..{hi})")
    return cfg


def _weights_file(folder, stem):
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {stem}.safetensors or .bin weights")


def _read_diffusers_folder(path, device, dtype):
    uc = _read_json(path / "unet" / "config.json", UNET_BOUNDS)
    if uc.get("use_linear_projection"):
        raise CheckpointError(f"{path / 'unet'}: an SD 2.x U-Net (linear projections); minisd implements SD 1.x")
    boc = uc["block_out_channels"]
    heads = uc.get("num_attention_heads") or uc["attention_head_dim"]  # SD 1.x's "attention_head_dim" (8) is the head count
    unet_cfg = UNetConfig(in_channels=uc["in_channels"], out_channels=uc["out_channels"], model_channels=boc[0],
                          channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=uc["layers_per_block"],
                          attention_levels=tuple(i for i, t in enumerate(uc["down_block_types"]) if "CrossAttn" in t),
                          num_heads=heads if isinstance(heads, int) else heads[0], context_dim=uc["cross_attention_dim"],
                          norm_groups=uc.get("norm_num_groups", 32))
    vc = _read_json(path / "vae" / "config.json", VAE_BOUNDS)
    vboc = vc["block_out_channels"]
    vae_cfg = VAEConfig(in_channels=vc["in_channels"], out_channels=vc["out_channels"], ch=vboc[0],
                        ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=vc["layers_per_block"],
                        z_channels=vc["latent_channels"], norm_groups=vc.get("norm_num_groups", 32),
                        scale_factor=vc.get("scaling_factor", 0.18215))
    scheduler = path / "scheduler" / "scheduler_config.json"
    sc = _read_json(scheduler, SCHEDULER_BOUNDS) if (path / "scheduler").is_dir() else {}
    schedule = Schedule(**{k: sc[k] for k in ("beta_start", "beta_end", "num_train_timesteps", "beta_schedule") if k in sc})
    unet_file = _weights_file(path / "unet", "diffusion_pytorch_model")
    vae_file = _weights_file(path / "vae", "diffusion_pytorch_model")
    text_file = next((f for f in (path / "text_encoder" / n for n in ("model.safetensors", "pytorch_model.bin",
                      "model.fp16.safetensors", "pytorch_model.fp16.bin")) if f.is_file()), None)
    if text_file is None:
        raise CheckpointError(f"{path / 'text_encoder'}: no model.safetensors or pytorch_model.bin")
    text_cfg = CLIPTextConfig.from_dict(_read_json(path / "text_encoder" / "config.json", TEXT_BOUNDS))
    read = lambda f: read_state_dict(f, device, dtype)
    return (unet_from_diffusers(read(unet_file), unet_cfg, unet_file), unet_cfg,
            vae_from_diffusers(read(vae_file), vae_cfg, vae_file), vae_cfg,
            read(text_file), text_cfg, schedule, uc.get("sample_size", 64))
