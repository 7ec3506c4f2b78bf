"""minisd: a small, readable Stable Diffusion 1.x that loads the official checkpoints.

minisd.load is minisd.fast.load: the readable pipeline (minisd.pipeline.load) with the speed layer put on
(minisd.fast: used on CUDA, never on a CPU); minisd.pipeline.load alone gives the plain core."""
from . import fast
from .checkpoint import CheckpointError
from .ddim import Schedule
from .fast import load
from .pipeline import StableDiffusion
from .samplers import sampler_named
from .save import save_diffusers, save_single_file
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["load", "fast",
           "StableDiffusion", "UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "Schedule", "CheckpointError",
           "save_diffusers", "save_single_file", "sampler_named"]
