"""Rank tables: the LoRA rank and alpha of every U-Net block, for linear and for conv layers.

Like kohya's block_dims / block_alphas / conv_block_dims / conv_block_alphas: 25 values each, one per block
IN00..OUT11 (lora.blocks.UNET_BLOCKS). "Linear" covers nn.Linear and 1x1 convs (proj_in/proj_out,
skip_connection); "conv" covers k x k convs (ResBlock convs, down/upsamplers). Rank 0 = the block is not adapted:
no module, no parameter, no key in the saved file. scale = alpha / rank (alpha = rank gives scale 1).

`rank_table(dims, alphas=None, conv_dims=None, conv_alphas=None, rank=None)`, each table one of:
  - a number (or a one-number string): every block;
  - a 25-value list, or a comma string of 25 numbers;
  - items `NAME=VALUE` separated by commas: "in0=8,out3=16", "IN01=4,OUT11=8", "all=4,out3=16" (later items
    override earlier ones); NAME is a block, a paper group (in0..in3, mid, out0..out3) or a preset:
        all         every U-Net block
        attn-only   the 16 blocks that carry a SpatialTransformer (lora-block-weight's 17 minus BASE)
    and a bare NAME ("all", "in0,out3": the paper's style preset) takes the value `rank`;
  - a dict {NAME: value}.
Blocks a spec does not mention get rank 0; an alpha spec's unmentioned blocks get alpha = their rank.
Defaults: alphas = the ranks (scale 1); conv_dims = dims and conv_alphas = alphas (conv layers are only adapted
when `inject` targets them); conv_dims given without conv_alphas -> alpha = conv rank.
`dims` may instead be a .toml or .json file holding the same keys (dims, alphas, conv_dims, conv_alphas, rank).
"""
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .blocks import BLOCKS17, UNET_BLOCKS, parse_numbers, parse_items

RANK_PRESETS = {"all": UNET_BLOCKS, "attn-only": BLOCKS17[1:]}
FILE_KEYS = ("dims", "alphas", "conv_dims", "conv_alphas", "rank")


@dataclass(frozen=True)
class RankTable:
    dims: tuple  # 25 ints, linear and 1x1-conv layers
    alphas: tuple  # 25 floats
    conv_dims: tuple  # 25 ints, k x k convs
    conv_alphas: tuple

    def lookup(self, block, conv=False):
        """(rank, alpha) of a block ('IN04', ...) for a linear (conv=False) or k x k conv layer; (0, 0) if none."""
        if block not in UNET_BLOCKS:
            return 0, 0.0
        i = UNET_BLOCKS.index(block)
        return (self.conv_dims[i], self.conv_alphas[i]) if conv else (self.dims[i], self.alphas[i])

    def blocks(self):
        """The blocks with a nonzero linear or conv rank."""
        return [b for b, d, c in zip(UNET_BLOCKS, self.dims, self.conv_dims) if d or c]

    def as_dict(self):
        return {"dims": list(self.dims), "alphas": list(self.alphas), "conv_dims": list(self.conv_dims),
                "conv_alphas": list(self.conv_alphas)}


def _table(spec, rank, what):
    """One table spec -> {block: value string or number} for the blocks it mentions."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return dict.fromkeys(UNET_BLOCKS, spec)
    values = parse_numbers(spec)
    if values is not None and len(values) == 1:
        return dict.fromkeys(UNET_BLOCKS, values[0])
    if values is not None:
        if len(values) != 25:
            raise ValueError(f"{what}: a list needs 25 values ({UNET_BLOCKS[0]}..{UNET_BLOCKS[-1]}), got {len(values)}")
        return dict(zip(UNET_BLOCKS, values))
    if isinstance(spec, (str, dict)):
        return parse_items(spec, rank, UNET_BLOCKS, extra=RANK_PRESETS, what=f"{what} block")
    raise ValueError(f"{what}: expected a number, 25 values, 'NAME=VALUE,...', a dict or a file; got {spec!r}")


def _ints(table, what):
    out = []
    for b in UNET_BLOCKS:
        v = float(table.get(b, 0))
        if not math.isfinite(v) or v != int(v) or v < 0:
            raise ValueError(f"{what}: the rank of {b} must be a whole number >= 0, got {table.get(b)!r}")
        out.append(int(v))
    return tuple(out)


def _alphas(spec, dims, rank, what):
    given = {} if spec is None else _table(spec, rank, what)
    out = tuple(float(given[b]) if b in given else float(d) for b, d in zip(UNET_BLOCKS, dims))
    bad = next((f"{b}={v}" for b, v in zip(UNET_BLOCKS, out) if not math.isfinite(v)), None)
    if bad:
        raise ValueError(f"{what}: alpha {bad} is not a finite number")
    return out


def read_table_file(path):
    """A .toml / .json rank-table file -> its dict of FILE_KEYS."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable rank table ({e})") from None
    unknown = set(data) - set(FILE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(FILE_KEYS)}")
    return data


def rank_table(dims, alphas=None, conv_dims=None, conv_alphas=None, rank=None):
    """Build a RankTable (see the module docstring for the accepted forms)."""
    if isinstance(dims, RankTable):
        return dims
    if isinstance(dims, Path) or (isinstance(dims, str) and dims.endswith((".toml", ".json"))):
        if any(v is not None for v in (alphas, conv_dims, conv_alphas, rank)):
            raise ValueError("a rank-table file holds the whole table; pass no other arguments")
        data = read_table_file(dims)
        if "dims" not in data:
            raise ValueError(f"{dims}: a rank-table file needs 'dims'")
        return rank_table(**data)
    d = _ints(_table(dims, rank, "dims"), "dims")
    a = _alphas(alphas, d, rank, "alphas")
    if conv_dims is None:
        cd, ca = d, (a if conv_alphas is None else _alphas(conv_alphas, d, rank, "conv_alphas"))
    else:
        cd = _ints(_table(conv_dims, rank, "conv_dims"), "conv_dims")
        ca = _alphas(conv_alphas, cd, rank, "conv_alphas")
    return RankTable(d, a, cd, ca)
