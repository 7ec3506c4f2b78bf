"""minisd.fast: the speed layer. The readable core (unet, vae, ddim, text, checkpoint, pipeline) never imports it;
it is put on from outside, and computes what the core computes.

    sd = minisd.load(path, device="cuda")     # = minisd.fast.load: minisd.pipeline.load, then attach(sd)
    sd.sample("a cat")                          # on CUDA: CUDA graphs (cuda_graph=False: the eager core)

attach(sd): swaps the speed layer's modules into the U-Net and the VAE (speed_up: same Parameters, same state-dict
keys) and sets sd.fast = FastPath(), which StableDiffusion.sample calls on CUDA. What lives here:
    modules.py    module swaps: channels_last GroupNorm, GEGLU's lean backward, the VAE decoder's in-place ops
    groupnorm.py  the channels_last GroupNorm kernel (forward and backward)
    forms.py      capture-time forms of U-Net layers (fewer kernels inside a CUDA graph)
    graphs.py     the CUDA graphs: the guided sampling step, the text encoder, the whole training step
    stock.py      which modules and building blocks all of the above were written for (anything else runs as it is)
"""
from dataclasses import dataclass

import torch

from .. import pipeline
from .forms import FORMS
from .graphs import GuidedUNetGraph, ReplayedCall, TrainStepGraph, encode_text, guided_unet, release, to_channels_last
from .modules import speed_up


@dataclass
class FastPath:
    """The speed layer of a StableDiffusion (sd.fast). pack_adapters: how unmerged LoRA adapters are captured
    ("weight", "factors" or None: minisd.fast.graphs)."""
    pack_adapters: str = "weight"

    def guided_step(self, sd, x, ctx, guidance):
        """What sd.guided_step(x, ctx, guidance) returns, replayed from a CUDA graph (captured on first use); a
        pipeline whose guided_step was edited (a subclass) runs its own. The graph's timestep has the dtype the eager
        step gives it (torch.tensor(t)): int64 for DDIM's and DPM++'s integer timesteps, float32 for Euler a's."""
        if type(sd).guided_step is not pipeline.StableDiffusion.guided_step:
            return sd.guided_step(x, ctx, guidance)
        to_channels_last(sd.vae)  # decode() at 512², batch 1: 21.6 -> 16.2 ms, H200 (docs/performance.md)
        graphs = {}

        def eps(x_in, t, ctx):
            kind = torch.tensor(t).dtype
            if kind not in graphs:
                graphs[kind] = guided_unet(sd.unet, x, ctx, guidance, pack_adapters=self.pack_adapters,
                                           timesteps=sd.schedule.num_train_timesteps, t_dtype=kind)
            return graphs[kind](x_in, t, ctx)
        return eps

    def encode_text(self, text_encoder, ids):
        return encode_text(text_encoder, ids)


def attach(sd):
    """Put the speed layer on sd (in place; returns it): the module swaps, and sd.fast."""
    speed_up(sd.unet)
    speed_up(sd.vae)
    sd.fast = FastPath()
    return sd


def load(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """minisd.pipeline.load(path, device, dtype, tokenizer) with the speed layer attached."""
    return attach(pipeline.load(path, device=device, dtype=dtype, tokenizer=tokenizer))


__all__ = ["FORMS", "FastPath", "GuidedUNetGraph", "ReplayedCall", "TrainStepGraph", "attach", "encode_text",
           "guided_unet", "load", "release", "speed_up", "to_channels_last"]
