"""Random-weight SD 1.x models built by diffusers (the reference), written in the three official layouts.

Every parameter is re-drawn (no zero-initialised layer can hide a wiring mistake). The LDM single files
are written from the diffusers weights with minisd's name map, and each test checks them against
diffusers' own LDM -> diffusers converter, so the map is tested against an independent implementation.
"""
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from minisd.checkpoint import rename, unet_prefixes, vae_prefixes

SMALL_UNET = dict(sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=64,
                  attention_head_dim=8, norm_num_groups=32)
SMALL_VAE = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32)
SMALL_CLIP = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                  max_position_embeddings=77, hidden_act="quick_gelu")
SD14_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def redraw(module, seed):
    """Fill every parameter with random values: norms' weights near 1, everything else ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * r if ("norm" in name and name.endswith("weight")) else 0.1 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return module


def write_char_tokenizer(folder):
    """A CLIP-format tokenizer with single characters as tokens (no merges): enough to test the plumbing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.!?'")
    vocab = ["!", "<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "bos_token": "<|startoftext|>",
                                                              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                                              "unk_token": "<|endoftext|>"}))
    return folder


def make_pipeline(unet_kwargs=SMALL_UNET, vae_kwargs=SMALL_VAE, clip_kwargs=SMALL_CLIP, seed=0):
    """A diffusers StableDiffusionPipeline (DDIM) with random weights and a character tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import tempfile
    unet = redraw(UNet2DConditionModel(**unet_kwargs), seed)
    vae = redraw(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                               **vae_kwargs), seed + 1)
    text = redraw(CLIPTextModel(CLIPTextConfig(**clip_kwargs)), seed + 2).eval()
    tok = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(tempfile.mkdtemp())))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def ldm_state_dict(pipe):
    """The pipeline's weights under the official single-file names, mapped by minisd's map."""
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig
    u, v = pipe.unet.config, pipe.vae.config
    ucfg = UNetConfig(model_channels=u.block_out_channels[0], channel_mult=tuple(c // u.block_out_channels[0] for c in u.block_out_channels),
                      num_res_blocks=u.layers_per_block,
                      attention_levels=tuple(i for i, t in enumerate(u.down_block_types) if "CrossAttn" in t))
    vcfg = VAEConfig(ch=v.block_out_channels[0], ch_mult=tuple(c // v.block_out_channels[0] for c in v.block_out_channels),
                     num_res_blocks=v.layers_per_block)
    out = {}
    for prefix, module, pairs in (("model.diffusion_model.", pipe.unet, unet_prefixes(ucfg)),
                                  ("first_stage_model.", pipe.vae, vae_prefixes(vcfg))):
        for k, t in module.state_dict().items():
            new = rename(k, pairs, to_diffusers=False)
            assert new is not None, k
            if prefix == "first_stage_model." and ".attn_1." in new and t.ndim == 2:
                t = t[:, :, None, None]
            out[prefix + new] = t.detach().clone().contiguous()
    for k, t in pipe.text_encoder.state_dict().items():  # the released file's names (transformers 4.x layout)
        out["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = t.detach().clone().contiguous()
    # DDPM buffers as the released file has them; loaders ignore them
    out["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()
    out["betas"] = pipe.scheduler.betas.clone()
    return out


def save_lightning_ckpt(sd, path):
    """A pickle shaped like the released sd-v1-4.ckpt: state_dict, global_step, and a lightning callback
    keyed by the ModelCheckpoint class, holding numpy scalars."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    try:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {cls: {"best_model_score": np.float64(0.1234), "current_score": np.float32(0.2),
                                        "monitor": "val/loss", "dirpath": "/logs/checkpoints"}}}, path)
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)


def write_layouts(pipe, root):
    """{'diffusers': folder, 'safetensors': file, 'ckpt': file} plus a tokenizer folder for the single files."""
    root = Path(root)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    sd = ldm_state_dict(pipe)
    save_file(sd, str(root / "model.safetensors"))
    save_lightning_ckpt(sd, root / "model.ckpt")
    return {"diffusers": root / "diffusers", "safetensors": root / "model.safetensors", "ckpt": root / "model.ckpt",
            "tokenizer": root / "diffusers" / "tokenizer"}
