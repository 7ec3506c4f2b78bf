"""minisd.fast: the speed layer. The readable core (unet, vae, ddim, text, checkpoint, layouts, pipeline) never
imports it; it is put on from outside, and computes what the core computes.

    sd = minisd.load(path, device="cuda")     # = minisd.fast.load: minisd.pipeline.load, then attach(sd)
    sd.sample("a cat")                          # on CUDA: CUDA graphs (cuda_graph=False: the eager core)

attach(sd): swaps the speed layer's modules into the U-Net and the VAE (speed_up: same Parameters, same state-dict
keys), on CUDA stores their convolution weights channels_last (to_channels_last: cuDNN's NHWC kernels, the same
function), and sets sd.fast = FastPath(), which StableDiffusion.sample calls on CUDA and which holds the captured
graphs (sd.fast.graphs; sd.fast.graphs.release() frees them). What lives here:
    modules.py    module swaps: channels_last GroupNorm, GEGLU's lean backward, the VAE decoder's in-place ops
    groupnorm.py  the channels_last GroupNorm kernel (forward and backward)
    forms.py      capture-time forms of U-Net layers (fewer kernels inside a CUDA graph)
    graphs.py     the CUDA graphs: the guided sampling step, the text encoder, the whole training step
    stock.py      which modules and building blocks all of the above were written for (anything else runs as it is)
"""
from dataclasses import dataclass, field

import torch

from .. import pipeline
from .forms import FORMS
from .graphs import (GraphCache, GuidedUNetGraph, ReplayedCall, TrainStepGraph, encode_text, guided_unet,
                     to_channels_last)
from .modules import speed_up


class StepGates:
    """on_step for sample(): adapter `name` runs at step i (0-based) iff table[name][i] (sample.py's --lora
    start=/stop=). Eagerly it switches the adapters (switch(name, on): lora.enable on the U-Net, say) when their state
    changes. Under the speed layer the graph is captured with every gated adapter on and reads one gate per adapter,
    1 or 0, from a device vector that each replay takes from this table (a copy on the GPU: no capture per step);
    the switching then changes nothing that the graph reads."""

    def __init__(self, table, switch):
        self.names, self.switch = tuple(table), switch
        rows = [[float(bool(on)) for on in table[n]] for n in self.names]
        self.rows = torch.tensor(rows).T.contiguous()  # [steps, k]
        self.state, self.step, self.on_device = {}, None, None

    def __call__(self, i):
        if not 0 <= i < len(self.rows):
            raise ValueError(f"step {i}: the step table has {len(self.rows)} steps")
        self.step = i
        for name, on in zip(self.names, self.rows[i].tolist()):
            self._set(name, on)

    def _set(self, name, on):
        if self.state.get(name) != on:
            self.switch(name, bool(on))
            self.state[name] = on

    def all_on(self):
        """Every gated adapter switched on: what a capture must see (the gates then do the switching)."""
        for name in self.names:
            self._set(name, 1.0)

    def gates(self, device, dtype):
        """This step's gates [k] on the device (the table is copied there once)."""
        if self.on_device is None or self.on_device.device != device or self.on_device.dtype != dtype:
            self.on_device = self.rows.to(device, dtype)
        return self.on_device[self.step]


@dataclass
class FastPath:
    """The speed layer of a StableDiffusion (sd.fast). pack_adapters: how unmerged LoRA adapters are captured
    ("weight", "factors" or None: minisd.fast.graphs); graphs: the graphs captured so far."""
    pack_adapters: str = "weight"
    graphs: GraphCache = field(default_factory=GraphCache)

    def takes(self, on_step):
        """Whether the graphs can run with this on_step: a graph replays the model as it was captured, so only a
        StepGates, whose gates the graph reads."""
        return isinstance(on_step, StepGates)

    def guided_step(self, sd, x, ctx, guidance, on_step=None):
        """What sd.guided_step(x, ctx, guidance) returns, replayed from a CUDA graph (captured on first use); a
        pipeline whose guided_step was edited (a subclass) runs its own. The graph's timestep has the dtype the eager
        step gives it (torch.tensor(t)): int64 for DDIM's and DPM++'s integer timesteps, float32 for Euler a's.
        on_step a StepGates: its adapters are gated inside the graph, each replay with this step's gates."""
        if type(sd).guided_step is not pipeline.StableDiffusion.guided_step:
            return sd.guided_step(x, ctx, guidance)
        gated = on_step.names if isinstance(on_step, StepGates) else ()
        by_dtype = {}  # one graph per timestep dtype

        def eps(x_in, t, ctx):
            kind = torch.tensor(t).dtype
            if kind not in by_dtype:
                if gated:
                    on_step.all_on()
                by_dtype[kind] = guided_unet(sd.unet, x, ctx, guidance, self.graphs, pack_adapters=self.pack_adapters,
                                             timesteps=sd.schedule.num_train_timesteps, t_dtype=kind, gated=gated)
            return by_dtype[kind](x_in, t, ctx, on_step.gates(x.device, x.dtype) if gated else None)
        return eps

    def encode_text(self, text_encoder, ids):
        return encode_text(text_encoder, ids, self.graphs)


def attach(sd):
    """Put the speed layer on sd (in place; returns it): the module swaps, on CUDA the channels_last layout of the
    convolution weights (cuDNN's NHWC kernels: docs/performance.md#channels_last-and-groupnorm), and sd.fast. On the
    CPU the layout is kept."""
    for module in (sd.unet, sd.vae):
        speed_up(module)
        if sd.device.type == "cuda":
            to_channels_last(module)
    sd.fast = FastPath()
    return sd


def load(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """minisd.pipeline.load(path, device, dtype, tokenizer) with the speed layer attached."""
    return attach(pipeline.load(path, device=device, dtype=dtype, tokenizer=tokenizer))


__all__ = ["FORMS", "FastPath", "GraphCache", "GuidedUNetGraph", "ReplayedCall", "StepGates", "TrainStepGraph",
           "attach", "encode_text", "guided_unet", "load", "speed_up", "to_channels_last"]
