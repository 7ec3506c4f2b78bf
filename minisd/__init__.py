"""minisd: a small, readable Stable Diffusion 1.x that loads the official checkpoints."""
from .checkpoint import CheckpointError
from .ddim import Schedule
from .pipeline import StableDiffusion, load
from .samplers import sampler_named
from .save import save_diffusers, save_single_file
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["load", "StableDiffusion", "UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "Schedule", "CheckpointError",
           "save_diffusers", "save_single_file", "sampler_named"]
