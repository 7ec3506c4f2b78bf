"""Block names, lora-block-weight vectors and presets, rank tables."""
import json
import re

import pytest

from lora.blocks import BLOCKS, BLOCKS17, UNET_BLOCKS, block_of, parse_block_weights, step_mask
from lora.ranks import rank_table
from minisd.checkpoint import unet_prefixes
from minisd.unet import UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest

# sd-webui-lora-block-weight's presets, copied from the reference (17 values: BASE, IN01, IN02, IN04, IN05, IN07,
# IN08, M00, OUT03..OUT11)
REFERENCE_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}


def kohya_index(diffusers_path):
    """The reference's formula: down resnets/attentions 1 + 3i + j, downsamplers 3 + 3i; mid 12; up resnets /
    attentions 13 + 3i + j, upsamplers 15 + 3i."""
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)", diffusers_path):
        return 1 + 3 * int(m[1]) + int(m[3])
    if m := re.match(r"down_blocks\.(\d)\.downsamplers", diffusers_path):
        return 3 + 3 * int(m[1])
    if diffusers_path.startswith("mid_block"):
        return 12
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)", diffusers_path):
        return 13 + 3 * int(m[1]) + int(m[3])
    if m := re.match(r"up_blocks\.(\d)\.upsamplers", diffusers_path):
        return 15 + 3 * int(m[1])
    return None


def test_block_of_matches_the_kohya_index_of_every_sd14_module():
    pairs = unet_prefixes(UNetConfig())
    for ldm, dif, _ in pairs:
        index = kohya_index(dif)
        if index is None:
            assert block_of(ldm) in (None, "IN00"), ldm  # time_embed, conv_in (IN00), out
        else:
            assert block_of(ldm) == UNET_BLOCKS[index], (ldm, dif)
    assert block_of("input_blocks.4.1.transformer_blocks.0.attn2.to_k") == "IN04"
    assert block_of("output_blocks.11.0.in_layers.2") == "OUT11"
    assert block_of("middle_block.1.proj_in") == "M00"
    assert block_of("encoder.layers.3.mlp.fc1") == block_of("text_model.encoder.layers.3.mlp.fc1") == "BASE"
    assert block_of("time_embed.0") is None and block_of("out.2") is None
    assert len(BLOCKS) == 26 and len(UNET_BLOCKS) == 25 and len(BLOCKS17) == 17


@pytest.mark.parametrize("name", REFERENCE_PRESETS)
def test_presets_match_the_reference(name):
    weights = parse_block_weights(name)
    assert weights == parse_block_weights(REFERENCE_PRESETS[name]) == parse_block_weights(name.lower())
    expected17 = [float(v) for v in REFERENCE_PRESETS[name].split(",")]
    assert [weights[b] for b in BLOCKS17] == expected17
    assert all(weights[b] == 0 for b in BLOCKS if b not in BLOCKS17)  # 17 -> 26 sets the others to 0


def test_outd_in_26_values():
    w = parse_block_weights("OUTD")
    assert {b for b, v in w.items() if v} == {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}


def test_26_values_groups_and_dicts():
    values = [i / 10 for i in range(26)]
    assert list(parse_block_weights(values).values()) == values
    assert list(parse_block_weights(",".join(map(str, values))).values()) == values
    w = parse_block_weights("in0,out3=0.5")
    assert {b for b, v in w.items() if v == 1} == {"IN01", "IN02", "IN03"}
    assert {b for b, v in w.items() if v == 0.5} == {"OUT09", "OUT10", "OUT11"}
    assert sum(w.values()) == 4.5
    w = parse_block_weights("BASE=1, mid=0.25, OUT03=2")
    assert (w["BASE"], w["M00"], w["OUT03"], w["OUT04"]) == (1, 0.25, 2, 0)
    assert parse_block_weights({"out3": 0.5, "IN01": 1}) == parse_block_weights("out3=0.5,IN01=1")


@pytest.mark.parametrize("spec,message", [
    ("OUTX", "valid names: in0"), ("in0,foo=1", "unknown block-weight name 'foo'"), ([1] * 25, "17 values"),
    ("1,1,1", "got 3"), ("in0=abc", "not a number"), (3, "a preset, 17 or 26 numbers"),
])
def test_block_weight_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_block_weights(spec)


def test_unknown_preset_error_lists_presets():
    with pytest.raises(ValueError, match="OUTALL"):
        parse_block_weights("OUTX")


def test_rank_table_forms():
    t = rank_table("all", rank=8)
    assert t.dims == (8,) * 25 and t.alphas == (8.0,) * 25 and t.conv_dims == t.dims and t.conv_alphas == t.alphas
    assert rank_table(8) == t == rank_table("8") == rank_table([8] * 25) == rank_table("all=8")
    paper = rank_table("in0,out3", rank=4)
    assert paper.blocks() == ["IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"]
    t = rank_table("in0=8,out3=16", alphas="out3=4")
    assert t.lookup("IN02") == (8, 8.0) and t.lookup("OUT10") == (16, 4.0) and t.lookup("M00")[0] == 0
    t = rank_table("IN01=4,OUT11=8")
    assert [b for b in UNET_BLOCKS if t.lookup(b)[0]] == ["IN01", "OUT11"]
    t = rank_table("all=4,out3=16", alphas=1)
    assert t.lookup("IN04") == (4, 1.0) and t.lookup("OUT09") == (16, 1.0)
    t = rank_table("attn-only", rank=2)
    assert [b for b in UNET_BLOCKS if t.lookup(b)[0]] == list(BLOCKS17[1:])
    t = rank_table("all=4", conv_dims="in0=2", conv_alphas=1)
    assert t.lookup("IN01", conv=True) == (2, 1.0) and t.lookup("IN04", conv=True)[0] == 0
    assert t.lookup("IN04") == (4, 4.0)
    assert rank_table(",".join(["0"] + ["4"] * 24)).dims == (0,) + (4,) * 24
    assert rank_table({"in0": 8, "OUT11": 2}) == rank_table("in0=8,OUT11=2")


def test_rank_table_files(tmp_path):
    (tmp_path / "t.toml").write_text('dims = "in0=8,out3=16"\nalphas = 4\nconv_dims = "out3=2"\n')
    t = rank_table(str(tmp_path / "t.toml"))
    assert t == rank_table("in0=8,out3=16", alphas=4, conv_dims="out3=2")
    (tmp_path / "t.json").write_text(json.dumps({"dims": [0] + [8] * 24, "rank": 2}))
    assert rank_table(tmp_path / "t.json").dims == (0,) + (8,) * 24
    (tmp_path / "bad.toml").write_text('dims = 4\nblock_dim = 3\n')
    with pytest.raises(ValueError, match="unknown keys.*valid keys: dims"):
        rank_table(tmp_path / "bad.toml")


@pytest.mark.parametrize("args,message", [
    (("in9=4",), "unknown dims block name 'in9'; valid names: all, attn-only, in0"),
    (("BASE=4",), "unknown dims block name 'BASE'"),
    (("all",), "'all' has no value; write all=N"),
    (("in0=2.5",), "whole number"), (("in0=-1",), "whole number"),
    (([4] * 24,), "25 values"), (("all=4", "out9=1"), "unknown alphas block name 'out9'"),
    ((object(),), "expected a number"),
])
def test_rank_table_errors(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rank_table(*args)


def test_step_mask_counts_steps_as_lora_block_weight():
    """start=2, stop=4 over 5 steps: on at the 2nd and 3rd step (1-based, stop excluded); open ends run to the edge."""
    assert step_mask(2, 4, 5) == [False, True, True, False, False]
    assert step_mask(None, 3, 4) == [True, True, False, False]
    assert step_mask(3, None, 4) == [False, False, True, True]
