"""Writing a StableDiffusion back out: as a diffusers folder (explicit configs) or an LDM single file."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import rename, unet_prefixes, vae_prefixes
from .layouts import SINGLE_FILE_PARTS
from .text import released_clip_config, released_clip_state_dict


def write_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, then mode 0644 as other tools' files have (save_file creates 0600: unreadable to
    the other users of a shared machine or a web UI's service account)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o644)


def _tensors(module, dtype):
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}


def save_single_file(sd, path, dtype=torch.float16):
    """The LDM layout of the released checkpoints: model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.text_model.*"""
    out = {}
    for part, tensors in (("unet", _tensors(sd.unet, dtype)), ("vae", _tensors(sd.vae, dtype)),
                          ("text", released_clip_state_dict(sd.text_encoder, dtype))):
        out.update({SINGLE_FILE_PARTS[part] + k: v for k, v in tensors.items()})
    write_safetensors(out, path)


def save_diffusers(sd, folder, dtype=torch.float16):
    """The diffusers folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json)."""
    folder = Path(folder)
    u, v = sd.unet.cfg, sd.vae.cfg
    boc = [u.model_channels * m for m in u.channel_mult]
    n, attn = len(boc), u.attention_levels
    unet_cfg = {"_class_name": "UNet2DConditionModel", "sample_size": sd.native_size // v.downscale,
                "in_channels": u.in_channels, "out_channels": u.out_channels, "block_out_channels": boc,
                "layers_per_block": u.num_res_blocks, "cross_attention_dim": u.context_dim,
                "attention_head_dim": u.num_heads,  # diffusers' SD 1.x name for the head count
                "norm_num_groups": u.norm_groups, "flip_sin_to_cos": True, "freq_shift": 0,
                "down_block_types": ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)],
                "up_block_types": ["CrossAttnUpBlock2D" if n - 1 - i in attn else "UpBlock2D" for i in range(n)]}
    vboc = [v.ch * m for m in v.ch_mult]
    vae_cfg = {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_channels,
               "block_out_channels": vboc, "layers_per_block": v.num_res_blocks, "latent_channels": v.z_channels,
               "norm_num_groups": v.norm_groups, "scaling_factor": v.scale_factor, "sample_size": sd.native_size,
               "down_block_types": ["DownEncoderBlock2D"] * len(vboc),
               "up_block_types": ["UpDecoderBlock2D"] * len(vboc)}
    s = sd.schedule
    sched_cfg = {"_class_name": "DDIMScheduler", "beta_start": s.beta_start, "beta_end": s.beta_end,
                 "beta_schedule": s.beta_schedule, "num_train_timesteps": s.num_train_timesteps,
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    unet_sd = {rename(k, unet_prefixes(u)): t for k, t in _tensors(sd.unet, dtype).items()}
    vae_sd = {rename(k, vae_prefixes(v)): t for k, t in _tensors(sd.vae, dtype).items()}
    # the VAE's attention projections are Linear in diffusers, 1x1 convs in LDM
    vae_sd = {k: t[:, :, 0, 0] if ".attentions." in k and t.ndim == 4 else t for k, t in vae_sd.items()}
    for sub, cfg, weights, name in (("unet", unet_cfg, unet_sd, "diffusion_pytorch_model"),
                                    ("vae", vae_cfg, vae_sd, "diffusion_pytorch_model")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg, indent=2))
        write_safetensors(weights, folder / sub / f"{name}.safetensors")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "text_encoder").mkdir(exist_ok=True)
    config = released_clip_config(sd.text_encoder.config, dtype)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(released_clip_state_dict(sd.text_encoder, dtype), folder / "text_encoder" / "model.safetensors")
    sd.tokenizer.save(folder / "tokenizer")
