"""Block-wise LoRA for minisd (arXiv 2403.07500): every U-Net block gets its own rank (0 = not adapted), and
several named adapters (an identity adapter on all blocks, a style adapter on chosen blocks) work together.

    table = lora.rank_table("all", rank=8)                 # or "in0=8,out3=16", 25 values, a .toml/.json file
    lora.inject(sd.unet, "identity", table, text_encoder=sd.text_encoder, te_rank=4)
    params = lora.trainable_parameters(sd.unet, "identity", text_encoder=sd.text_encoder)
    lora.save_kohya("identity.safetensors", sd.unet, sd.text_encoder, "identity", {"ss_steps": "1000"})
    lora.load_kohya("style.safetensors", sd.unet, sd.text_encoder, name="style", weight=0.8,
                    block_weights=lora.parse_block_weights("OUTD"))

Files: blocks (block names, lora-block-weight vectors), ranks (rank tables), layers (LoRALinear, LoConConv2d),
fused (fused autograd functions), network (inject and the inference switches), formats (kohya / diffusers files).
"""
from .formats import adapter_state_dict, kohya_metadata, load_kohya, read_adapter_file, save_kohya, unet_hash
from .blocks import BLOCKS, BLOCKS17, GROUPS, LBW_PRESETS, UNET_BLOCKS, block_of, parse_block_weights
from .layers import Adapter, LoConConv2d, LoRALinear
from .network import (C3LIER, LIERLA, TARGETS, adapted_layers, adapter_names, base_state_dict, enable, inject,
                      load_base_weights, merge, remove, set_weights, target_paths, trainable_parameters, unmerge,
                      use_fused)
from .ranks import RANK_PRESETS, RankTable, rank_table

__all__ = ["BLOCKS", "BLOCKS17", "GROUPS", "LBW_PRESETS", "UNET_BLOCKS", "block_of", "parse_block_weights",
           "Adapter", "LoConConv2d", "LoRALinear",
           "C3LIER", "LIERLA", "TARGETS", "adapted_layers", "adapter_names", "base_state_dict", "enable", "inject",
           "load_base_weights", "merge", "remove", "set_weights", "target_paths", "trainable_parameters", "unmerge",
           "use_fused", "RANK_PRESETS", "RankTable", "rank_table",
           "adapter_state_dict", "kohya_metadata", "load_kohya", "read_adapter_file", "save_kohya", "unet_hash"]
