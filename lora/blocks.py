"""U-Net block names, the block-wise weight vectors of sd-webui-lora-block-weight, and their parsing.

One table for SD 1.x (kohya index = position in UNET_BLOCKS; BASE = the text encoder):

    kohya  A1111         LDM (minisd module path)   diffusers                   paper group
    -      BASE          text encoder               text_encoder                -
    0      IN00          input_blocks.0  (conv_in, never adapted)               -
    1-3    IN01-IN03     input_blocks.1-3           down_blocks.0               in0
    4-6    IN04-IN06     input_blocks.4-6           down_blocks.1               in1
    7-9    IN07-IN09     input_blocks.7-9           down_blocks.2               in2
    10-11  IN10-IN11     input_blocks.10-11         down_blocks.3 (resnets)     in3
    12     M00           middle_block               mid_block                   mid
    13-15  OUT00-OUT02   output_blocks.0-2          up_blocks.0                 out0
    16-18  OUT03-OUT05   output_blocks.3-5          up_blocks.1                 out1
    19-21  OUT06-OUT08   output_blocks.6-8          up_blocks.2                 out2
    22-24  OUT09-OUT11   output_blocks.9-11         up_blocks.3                 out3

A weight spec (`parse_block_weights`) is one of:
  - a lora-block-weight preset: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL;
  - 17 or 26 numbers (a list or a comma string); 17 values name BASE and the 16 blocks with attention
    (BLOCKS17), and expanding 17 -> 26 sets the other blocks to 0;
  - items `NAME` or `NAME=VALUE` separated by commas ("in0,out3", "in0=1,out3=0.5", "BASE=1,OUT03=0.5"),
    NAME a block, a paper group or BASE; a bare NAME means 1; later items override earlier ones;
  - a dict {NAME: value}.
Blocks a spec does not mention get weight 0. The result always has all 26 names.
"""
import math
import re

UNET_BLOCKS = tuple([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])  # kohya 0..24
BLOCKS = ("BASE",) + UNET_BLOCKS  # lora-block-weight's 26
BLOCKS17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))

GROUPS = {  # the coarse blocks of arXiv 2403.07500
    "in0": ("IN01", "IN02", "IN03"), "in1": ("IN04", "IN05", "IN06"), "in2": ("IN07", "IN08", "IN09"),
    "in3": ("IN10", "IN11"), "mid": ("M00",),
    "out0": ("OUT00", "OUT01", "OUT02"), "out1": ("OUT03", "OUT04", "OUT05"),
    "out2": ("OUT06", "OUT07", "OUT08"), "out3": ("OUT09", "OUT10", "OUT11"),
}

LBW_PRESETS = {  # sd-webui-lora-block-weight, 17 values in BLOCKS17 order
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
}

_TEXT_PATH = re.compile(r"(^|\.)encoder\.layers\.\d+\.")  # CLIPTextModel (with or without a `text_model.` level)


def block_of(path):
    """The A1111 block of a module path: 'input_blocks.4.1.proj_in' -> 'IN04', 'middle_block.1' -> 'M00',
    'output_blocks.11.0.in_layers.2' -> 'OUT11', a text-encoder layer -> 'BASE'; None for time_embed/out."""
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)(\.|$)", path)
    if m and int(m[2]) < 12:
        return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
    if path == "middle_block" or path.startswith("middle_block."):
        return "M00"
    if _TEXT_PATH.search(path):
        return "BASE"
    return None


def names_to_blocks(name, extra=None):
    """A block, group (or an `extra` preset) name -> its blocks, case-insensitively; None if unknown."""
    table = {**{b.lower(): (b,) for b in BLOCKS}, **GROUPS, **(extra or {})}
    return table.get(name.strip().lower())


def parse_items(spec, default, valid, extra=None, what="block"):
    """'NAME[=VALUE],...' -> {block: value-string-or-default} in order; NAMEs expand through names_to_blocks.
    `valid` limits the blocks allowed; errors list the valid names."""
    items = spec.items() if isinstance(spec, dict) else [i.partition("=")[::2] for i in spec.split(",") if i.strip()]
    out = {}
    for name, value in items:
        blocks = names_to_blocks(str(name), extra)
        if blocks is None or any(b not in valid for b in blocks):
            choices = ", ".join([*sorted(extra or {}), *GROUPS, *valid])
            raise ValueError(f"unknown {what} name {str(name).strip()!r}; valid names: {choices}")
        if value == "" or value is None:
            if default is None:
                raise ValueError(f"{str(name).strip()!r} has no value; write {str(name).strip()}=N")
            value = default
        for b in blocks:
            out[b] = value
    return out


def expand17(values):
    """17 lora-block-weight values (BLOCKS17 order) -> 26 (BLOCKS order); the blocks without attention get 0."""
    values = list(values)
    if len(values) != 17:
        raise ValueError(f"expected 17 values ({', '.join(BLOCKS17)}), got {len(values)}")
    by_name = dict(zip(BLOCKS17, values))
    return [by_name.get(b, 0.0) for b in BLOCKS]


def parse_numbers(spec):
    """A list of numbers, or a comma string of only numbers -> list of floats; otherwise None."""
    if isinstance(spec, (list, tuple)):
        return [float(v) for v in spec]
    if isinstance(spec, str) and re.fullmatch(r"\s*[-+0-9.eE]+(\s*,\s*[-+0-9.eE]+)*\s*", spec):
        try:
            return [float(v) for v in spec.split(",")]
        except ValueError:
            return None
    return None


def parse_block_weights(spec):
    """A block-weight spec (see the module docstring) -> {name: weight} for all 26 BLOCKS."""
    if isinstance(spec, str) and spec.strip().upper() in LBW_PRESETS:
        return dict(zip(BLOCKS, map(float, expand17(LBW_PRESETS[spec.strip().upper()]))))
    values = parse_numbers(spec)
    if values is not None:
        if len(values) == 17:
            values = expand17(values)
        if len(values) != 26:
            raise ValueError(f"a block-weight vector has 17 values ({', '.join(BLOCKS17)}) or 26 "
                             f"({', '.join(BLOCKS)}); got {len(values)}")
        return _finite(dict(zip(BLOCKS, values)))
    if not isinstance(spec, (str, dict)):
        raise ValueError(f"a block-weight spec is a preset, 17 or 26 numbers, 'NAME=VALUE,...' or a dict; got {spec!r}")
    try:
        items = parse_items(spec, 1.0, BLOCKS, what="block-weight")
    except ValueError as e:
        if isinstance(spec, str) and "," not in spec and "=" not in spec:
            raise ValueError(f"{e}; or a preset: {', '.join(LBW_PRESETS)}") from None
        raise
    weights = dict.fromkeys(BLOCKS, 0.0)
    for block, value in items.items():
        try:
            weights[block] = float(value)
        except ValueError:
            raise ValueError(f"block weight of {block} is not a number: {value!r}") from None
    return _finite(weights)


def step_mask(start, stop, steps):
    """lora-block-weight's step range as [whether the adapter runs at step i] for i < steps: on while start <= step <
    stop, steps counted from 1 (start=10 switches it on at the 10th step, stop=30 off at the 30th); None: open."""
    return [(start or 0) <= i + 1 and (stop is None or i + 1 < stop) for i in range(steps)]


def _finite(weights):
    bad = next((f"{b}={v}" for b, v in weights.items() if not math.isfinite(v)), None)
    if bad:
        raise ValueError(f"block weight {bad} is not a finite number")
    return weights
