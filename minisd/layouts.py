"""The official SD 1.x file layouts, read into state dicts and configs (minisd.load builds the models from them).

    LDM single file (.safetensors / .ckpt)   model.diffusion_model.* (U-Net), first_stage_model.* (VAE),
                                             cond_stage_model.transformer.* (CLIP text encoder); configs inferred
                                             from the tensor shapes (infer_unet_config, infer_vae_config)
    diffusers folder                         unet/, vae/, text_encoder/ (config.json + weights), scheduler/,
                                             tokenizer/; U-Net and VAE names mapped to LDM's (minisd.checkpoint)

Every config number is checked against what SD 1.x-shaped models use before anything is allocated.
"""
import json
from typing import NamedTuple

from .checkpoint import CheckpointError, read_state_dict, unet_from_diffusers, vae_from_diffusers
from .clip import ACTIVATIONS, CLIPTextConfig
from .ddim import Schedule
from .files import read_regular
from .unet import UNetConfig
from .vae import VAEConfig

SINGLE_FILE_PARTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                     "text": "cond_stage_model.transformer."}
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar", "lvlb_weights"}

class Layout(NamedTuple):
    """What a file or folder holds: LDM-named state dicts, their configs, the schedule and the native latent size."""
    unet_sd: dict
    unet_cfg: UNetConfig
    vae_sd: dict
    vae_cfg: VAEConfig
    text_sd: dict
    text_cfg: CLIPTextConfig | None  # None: inferred from the weights (minisd.text.build_text_encoder)
    schedule: Schedule
    sample_size: int


def read_layout(path, device, dtype):
    """A diffusers folder or an LDM single file -> Layout, tensors on `device` in `dtype`."""
    layout = read_diffusers_folder(path, device, dtype) if path.is_dir() else read_single_file(path, device, dtype)
    check_widths(layout.unet_cfg, layout.vae_cfg, path)
    return layout


def read_single_file(path, device, dtype):
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
        newer = any(k.startswith(("conditioner.", "cond_stage_model.model.")) for k in unknown)
        hint = " (SDXL / SD 2.x layouts are not SD 1.x)" if newer else ""
        raise CheckpointError(f"{path}: unexpected keys{hint} ({len(unknown)}): {', '.join(unknown[:4])}")
    for name, prefix in SINGLE_FILE_PARTS.items():
        if not parts[name]:
            raise CheckpointError(f"{path}: no {prefix}* weights; not an SD 1.x single-file checkpoint")
    return Layout(parts["unet"], infer_unet_config(parts["unet"], path),
                  parts["vae"], infer_vae_config(parts["vae"], path), parts["text"], None, Schedule(), 64)


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
            in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
            model_channels=mc,
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
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
        return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1],
                         out_channels=sd["decoder.conv_out.weight"].shape[0], ch=ch, ch_mult=mult,
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
               ("num_attention_heads", 1, 64), ("max_position_embeddings", 1, 1024), ("vocab_size", 1, 1 << 20),
               ("layer_norm_eps", 0, 1))
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


def text_config(path):
    """text_encoder/config.json -> CLIPTextConfig, its sizes and activation checked."""
    cfg = CLIPTextConfig.from_dict(_read_json(path, TEXT_BOUNDS))
    if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act = {str(cfg.hidden_act)[:60]} is not one of CLIP's text "
                              f"encoders' ({', '.join(sorted(ACTIVATIONS))})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                              f"{cfg.num_attention_heads}")
    return cfg


def weights_file(folder, stem):
    """The weights file minisd.load reads from a diffusers component folder (the first that exists)."""
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {stem}.safetensors or .bin weights")


def read_diffusers_folder(path, device, dtype):
    uc = _read_json(path / "unet" / "config.json", UNET_BOUNDS)
    if uc.get("use_linear_projection"):
        raise CheckpointError(f"{path / 'unet'}: an SD 2.x U-Net (linear projections); minisd implements SD 1.x")
    boc = uc["block_out_channels"]
    # SD 1.x's "attention_head_dim" (8) is the head count
    heads = uc.get("num_attention_heads") or uc["attention_head_dim"]
    unet_cfg = UNetConfig(in_channels=uc["in_channels"], out_channels=uc["out_channels"], model_channels=boc[0],
                          channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=uc["layers_per_block"],
                          attention_levels=tuple(i for i, t in enumerate(uc["down_block_types"]) if "CrossAttn" in t),
                          num_heads=heads if isinstance(heads, int) else heads[0],
                          context_dim=uc["cross_attention_dim"],
                          norm_groups=uc.get("norm_num_groups", 32))
    vc = _read_json(path / "vae" / "config.json", VAE_BOUNDS)
    vboc = vc["block_out_channels"]
    vae_cfg = VAEConfig(in_channels=vc["in_channels"], out_channels=vc["out_channels"], ch=vboc[0],
                        ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=vc["layers_per_block"],
                        z_channels=vc["latent_channels"], norm_groups=vc.get("norm_num_groups", 32),
                        scale_factor=vc.get("scaling_factor", 0.18215))
    scheduler = path / "scheduler" / "scheduler_config.json"
    sc = _read_json(scheduler, SCHEDULER_BOUNDS) if (path / "scheduler").is_dir() else {}
    keys = ("beta_start", "beta_end", "num_train_timesteps", "beta_schedule")
    schedule = Schedule(**{k: sc[k] for k in keys if k in sc})
    unet_file = weights_file(path / "unet", "diffusion_pytorch_model")
    vae_file = weights_file(path / "vae", "diffusion_pytorch_model")
    text_file = next((f for f in (path / "text_encoder" / n for n in ("model.safetensors", "pytorch_model.bin",
                      "model.fp16.safetensors", "pytorch_model.fp16.bin")) if f.is_file()), None)
    if text_file is None:
        raise CheckpointError(f"{path / 'text_encoder'}: no model.safetensors or pytorch_model.bin")
    text_cfg = text_config(path / "text_encoder" / "config.json")
    read = lambda f: read_state_dict(f, device, dtype)
    return Layout(unet_from_diffusers(read(unet_file), unet_cfg, unet_file), unet_cfg,
                  vae_from_diffusers(read(vae_file), vae_cfg, vae_file), vae_cfg,
                  read(text_file), text_cfg, schedule, uc.get("sample_size", 64))
