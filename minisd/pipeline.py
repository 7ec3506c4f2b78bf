"""`minisd.load`: any official SD 1.x layout -> a StableDiffusion (U-Net, VAE, text encoder, tokenizer, schedule)."""
import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import CLIPTextConfig

from .checkpoint import CheckpointError, file_errors, load_strict, read_state_dict, unet_from_diffusers, vae_from_diffusers
from .ddim import Schedule, ddim_alphas, ddim_step
from .text import SD14_TOKENIZER, build_text_encoder, encode_prompts, load_tokenizer
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
    guided_step(sd, x, ctx, guidance) -> eps(x, t, ctx) and encode_text(text_encoder, ids), each computing what
    the code below computes (the guided U-Net step of sample(), the text encoder's last hidden state)."""

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

    def uses_fast(self, cuda_graph=None):
        """Whether sample() takes the speed layer: cuda_graph None (the default) where one is attached and the
        U-Net is on CUDA; True needs one; False never."""
        if cuda_graph is None:
            return self.fast is not None and self.device.type == "cuda"
        if cuda_graph and self.fast is None:
            raise ValueError("cuda_graph=True needs a speed layer: minisd.load attaches it (or minisd.fast.attach(sd))")
        return bool(cuda_graph)

    @torch.no_grad()
    def encode_prompt(self, prompts, cuda_graph=False):
        """list of str -> (B, 77, 768) CLIP last hidden state, in the U-Net's dtype (cuda_graph: through the speed
        layer's encode_text, a CUDA graph replay)."""
        run = (lambda ids: self.fast.encode_text(self.text_encoder, ids)) if self.uses_fast(cuda_graph) else None
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, run).to(self.dtype)

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
        Two images at a time: the VAE's full-resolution layers are the sampler's memory peak (512², batch 4, fp16,
        H100: 2.18 GB above the weights in one call, 1.09 GB in pairs, 52 vs 64 ms; docs/performance.md)."""
        z = latents.to(self.dtype) / self.vae.cfg.scale_factor
        return torch.cat([(self.vae.decode(pair).float() / 2 + 0.5).clamp(0, 1).cpu() for pair in z.split(2)])

    @torch.no_grad()
    def sample(self, prompts, negative_prompt="", steps=50, guidance=7.5, eta=0.0, height=None, width=None,
               n=1, seed=0, progress=True, cuda_graph=None):
        """DDIM with classifier-free guidance. Returns images (len(prompts) * n, 3, H, W) in [0, 1].

        The initial latents are torch.randn((B, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))
        in float32, as diffusers' StableDiffusionPipeline draws them; eta > 0 noise continues the same stream.
        cuda_graph: whether the steps and the text encoder run through the speed layer (self.fast; None: where one
        is attached and the model is on CUDA). minisd.fast replays each guided U-Net step from a CUDA graph, captured
        on first use per batch, size, dtype and guidance, without the kernel-launch overhead (the text encoder too,
        per batch); it also stores the U-Net's and the VAE's conv weights channels_last (same function, other cuDNN
        kernels: fp16-rounding-level differences). cuda_graph=False: the eager code of guided_step."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height, width = height or self.native_size, width or self.native_size
        f = self.vae.cfg.downscale
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0 (<= 1: no classifier-free guidance), got {guidance}")
        prompts = [p for p in prompts for _ in range(n)]
        B = len(prompts)
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((B, self.unet.cfg.in_channels, height // f, width // f), generator=g).to(self.device, self.dtype)
        cfg = guidance > 1.0  # diffusers skips the unconditional pass at guidance <= 1
        fast = self.uses_fast(cuda_graph)
        ctx = self.encode_prompt(([negative_prompt] * B if cfg else []) + prompts, fast)
        step = (self.fast.guided_step(self, x, ctx, guidance if cfg else None) if fast else
                self.guided_step(x, ctx, guidance if cfg else None))
        for t, a, a_prev in tqdm(ddim_alphas(self.schedule, steps), desc="sampling", disable=not progress):
            eps = step(x, t, ctx)
            noise = torch.randn(x.shape, generator=g).to(self.device, self.dtype) if eta > 0 else None
            x = ddim_step(x, eps, a, a_prev, eta, noise)
        return self.decode(x)


def load(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """Load SD 1.x from an LDM single file (.safetensors / .ckpt) or a diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    with file_errors(path, "not a usable SD 1.x checkpoint"):
        parts = _read_diffusers_folder(path, device, dtype) if path.is_dir() else _read_single_file(path, device, dtype)
        unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd, text_cfg, schedule, sample_size = parts
        with torch.device("meta"):  # no time spent on random init; every tensor is assigned from the file
            unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
        load_strict(unet, unet_sd, path, "U-Net")
        load_strict(vae, vae_sd, path, "VAE")
        text_encoder = build_text_encoder(text_sd, path, text_cfg)
    tok = load_tokenizer(tokenizer or (path / "tokenizer" if path.is_dir() else SD14_TOKENIZER))
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


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None


def _weights_file(folder, stem):
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {stem}.safetensors or .bin weights")


def _read_diffusers_folder(path, device, dtype):
    uc = _read_json(path / "unet" / "config.json")
    if uc.get("use_linear_projection"):
        raise CheckpointError(f"{path / 'unet'}: an SD 2.x U-Net (linear projections); minisd implements SD 1.x")
    boc = uc["block_out_channels"]
    heads = uc.get("num_attention_heads") or uc["attention_head_dim"]  # SD 1.x's "attention_head_dim" (8) is the head count
    unet_cfg = UNetConfig(in_channels=uc["in_channels"], out_channels=uc["out_channels"], model_channels=boc[0],
                          channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=uc["layers_per_block"],
                          attention_levels=tuple(i for i, t in enumerate(uc["down_block_types"]) if "CrossAttn" in t),
                          num_heads=heads if isinstance(heads, int) else heads[0], context_dim=uc["cross_attention_dim"],
                          norm_groups=uc.get("norm_num_groups", 32))
    vc = _read_json(path / "vae" / "config.json")
    vboc = vc["block_out_channels"]
    vae_cfg = VAEConfig(in_channels=vc["in_channels"], out_channels=vc["out_channels"], ch=vboc[0],
                        ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=vc["layers_per_block"],
                        z_channels=vc["latent_channels"], norm_groups=vc.get("norm_num_groups", 32),
                        scale_factor=vc.get("scaling_factor", 0.18215))
    sc = _read_json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    schedule = Schedule(**{k: sc[k] for k in ("beta_start", "beta_end", "num_train_timesteps", "beta_schedule") if k in sc})
    unet_file = _weights_file(path / "unet", "diffusion_pytorch_model")
    vae_file = _weights_file(path / "vae", "diffusion_pytorch_model")
    text_file = next((f for f in (path / "text_encoder" / n for n in ("model.safetensors", "pytorch_model.bin",
                      "model.fp16.safetensors", "pytorch_model.fp16.bin")) if f.is_file()), None)
    if text_file is None:
        raise CheckpointError(f"{path / 'text_encoder'}: no model.safetensors or pytorch_model.bin")
    text_cfg = CLIPTextConfig.from_json_file(str(path / "text_encoder" / "config.json"))
    read = lambda f: read_state_dict(f, device, dtype)
    return (unet_from_diffusers(read(unet_file), unet_cfg, unet_file), unet_cfg,
            vae_from_diffusers(read(vae_file), vae_cfg, vae_file), vae_cfg,
            read(text_file), text_cfg, schedule, uc.get("sample_size", 64))
