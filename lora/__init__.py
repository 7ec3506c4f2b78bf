"""Block-wise LoRA for minisd (arXiv 2403.07500): every U-Net block gets its own rank (0 = not adapted), and
several named adapters (an identity adapter on all blocks, a style adapter on chosen blocks) work together.

    table = lora.rank_table("all", rank=8)        # or 8, "in0=8,out3=16", 25 values, a .toml / .json file
    lora.inject(sd.unet, "identity", table, text_encoder=sd.text_encoder, te_rank=4)
    params = lora.trainable_parameters(sd.unet, "identity", text_encoder=sd.text_encoder)
    ...train params (the fused path is used under autocast too)...
    lora.save_kohya("identity.safetensors", sd.unet, sd.text_encoder, "identity", {"ss_steps": 1000})
    lora.load_kohya("style.safetensors", sd.unet, sd.text_encoder, name="style", weight=0.8,
                    block_weights=lora.parse_block_weights("OUTD"))

Files: blocks (block names, lora-block-weight vectors), ranks (rank tables), layers (LoRALinear, LoConConv2d),
fused (the fused autograd functions), network (inject and the switches), formats (kohya / diffusers files),
choose (scores per block and a choice of blocks under a parameter budget).
"""
from .blocks import BLOCKS, BLOCKS17, GROUPS, LBW_PRESETS, UNET_BLOCKS, block_of, parse_block_weights
from .choose import block_parameters, choose_blocks
from .formats import adapter_state_dict, kohya_metadata, load_kohya, read_adapter_file, save_kohya, unet_hash
from .layers import Adapter, LoConConv2d, LoRALinear
from .network import (C3LIER, LIERLA, TARGETS, adapted_layers, adapter_names, base_state_dict, enable, inject,
                      load_base_weights, merge, remove, set_weights, target_paths, trainable_parameters, unmerge,
                      use_fused)
from .ranks import RANK_PRESETS, RankTable, rank_table

__all__ = [
    "BLOCKS", "BLOCKS17", "GROUPS", "LBW_PRESETS", "UNET_BLOCKS", "block_of", "parse_block_weights",
    "RANK_PRESETS", "RankTable", "rank_table",
    "Adapter", "LoConConv2d", "LoRALinear",
    "C3LIER", "LIERLA", "TARGETS", "inject", "remove", "set_weights", "enable", "merge", "unmerge", "use_fused",
    "trainable_parameters", "adapted_layers", "adapter_names", "target_paths", "base_state_dict", "load_base_weights",
    "save_kohya", "load_kohya", "adapter_state_dict", "read_adapter_file", "kohya_metadata", "unet_hash",
    "block_parameters", "choose_blocks",
]
