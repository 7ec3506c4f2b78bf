"""Block-wise LoRA for minisd (arXiv 2403.07500): every U-Net block gets its own rank (0 = not adapted), and
several named adapters (an identity adapter on all blocks, a style adapter on chosen blocks) work together.

    table = lora.rank_table("all", rank=8)        # or 8, "in0=8,out3=16", 25 values, a .toml / .json file
    lora.inject(sd.unet, "identity", table, text_encoder=sd.text_encoder, te_rank=4)
    params = lora.trainable_parameters(sd.unet, "identity", text_encoder=sd.text_encoder)
    ...train params (the fused path is used under autocast too)...
    lora.save("identity.safetensors", sd.unet, sd.text_encoder, "identity", {"ss_steps": 1000})
    lora.load("style.safetensors", sd.unet, sd.text_encoder, name="style", weight=0.8,
              block_weights=lora.parse_block_weights("OUTD"))
    lora.set_weight(sd.unet, "style", 0.5, text_encoder=sd.text_encoder)   # later: another global weight

The names below are the public API; the rest is importable from its submodule (lora.network.adapted_layers,
lora.blocks.block_of, lora.layers.LoRALinear, lora.formats.unet_hash, ...). Files: blocks (block names,
lora-block-weight vectors), ranks (rank tables), layers (LoRALinear, LoConConv2d), fused (the fused autograd
functions), network (inject and the switches), formats (kohya / LyCORIS / diffusers / peft files), choose (scores
per block and a choice of blocks under a parameter budget).
"""
# Importing a submodule makes it an attribute of the package: these imports load all seven (choose loads layers,
# layers loads fused), so `import lora; lora.network.adapted_layers` works (tests/test_lora_network.py checks it).
from .blocks import BLOCKS, GROUPS, parse_block_weights
from .choose import block_parameters, choose_blocks
from .formats import load, save
from .network import (LOCON_TARGETS, LORA_TARGETS, adapter_names, enable, inject, merge, remove, set_weight,
                      trainable_parameters, unmerge)
from .ranks import rank_table

__all__ = [
    "BLOCKS", "GROUPS", "parse_block_weights", "rank_table",
    "LORA_TARGETS", "LOCON_TARGETS", "inject", "remove", "enable", "merge", "unmerge", "set_weight",
    "trainable_parameters", "adapter_names",
    "save", "load",
    "choose_blocks", "block_parameters",
]
