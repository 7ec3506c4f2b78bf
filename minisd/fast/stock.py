"""Which modules and building blocks the speed layer was written for.

A capture-time form or a module swap computes what a layer of the readable core computes, in another way. It may
only take a layer whose code is the code it was written for: `stock(m, X)` holds when type(m) is X (not a subclass)
and X's methods are the ones recorded here when minisd was imported (so a class-level replacement of X.forward is
seen); `unchanged("geglu")` holds while minisd.unet's building block is still the original function (a researcher
may replace it: `minisd.unet.geglu = my_geglu`). Anything else runs as it is, also inside a CUDA graph.

Forms that call a building block (minisd.unet.attention, geglu, UNet.embed_time) look it up at call time, so a
replaced block is what runs. An edit of the source file itself changes what is recorded, like any other import.
"""
import torch.nn as nn

from .. import unet as U
from .. import vae as V

METHODS = {U.UNet: ("forward", "embed_time"), U.TimestepEmbedSequential: ("forward",), U.ResBlock: ("forward",),
           U.SpatialTransformer: ("forward",), U.BasicTransformerBlock: ("forward",), U.CrossAttention: ("forward",),
           U.GEGLU: ("forward",), U.Upsample: ("forward",), V.ResnetBlock: ("forward",), nn.Linear: ("forward",),
           nn.Conv2d: ("forward", "_conv_forward"), nn.SiLU: ("forward",), nn.GroupNorm: ("forward",),
           nn.Sequential: ("forward",)}
WRITTEN_FOR = {cls: {name: getattr(cls, name) for name in names} for cls, names in METHODS.items()}
BLOCKS = {name: getattr(U, name) for name in ("attention", "geglu", "upsample", "timestep_embedding")}


def stock(m, cls):
    """m is exactly a cls, and cls's methods are the ones the speed layer was written for."""
    return type(m) is cls and all(getattr(cls, n) is f for n, f in WRITTEN_FOR[cls].items())


def unchanged(name):
    """minisd.unet's building block `name` is the original function."""
    return getattr(U, name) is BLOCKS[name]
