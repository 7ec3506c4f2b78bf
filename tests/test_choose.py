"""lora/choose.py: parameter counts, the greedy choice, and that each method finds the block a style lives in."""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import lora.choose as choose

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest


def randomize(unet, name, seed, std=0.2, blocks=None):
    """Random ups (a fresh adapter's are 0), only in the coarse `blocks` if given."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in lora.network.adapted_layers(unet, name=name):
            if blocks is None or choose.GROUP_OF[lora.blocks.block_of(path)] in blocks:
                layer.adapters[name].up.normal_(0, std, generator=g)


@pytest.fixture
def unet(lora_sd):
    return copy.deepcopy(lora_sd.unet)


def test_parameters_per_block_by_hand(unet):
    # the small U-Net's in0 = IN01, IN02: two transformers at 32 channels, context 64, ff inner 128 (GEGLU: 256).
    # Per transformer, rank r: attn1 q k v out 4 x r(32+32); attn2 q, out 2 x r(32+32), k v 2 x r(64+32);
    # ff 0.proj r(32+256), ff 2 r(128+32); proj_in, proj_out (1x1 convs) 2 x r(32+32): 1152 r
    params = choose.block_parameters(unet, rank=4, algo="lora")
    assert params["in0"] == 2 * 1152 * 4
    assert params["in3"] == 0 and params["out0"] == 0  # no attention at the lowest level: nothing for LoRA
    locon = choose.block_parameters(unet, rank=4, algo="locon")
    assert locon["in3"] > 0 and all(locon[b] >= params[b] for b in choose.COARSE)
    lora.inject(unet, "x", lora.rank_table("in0=4"))  # the same count as an injected adapter's tensors
    assert sum(p.numel() for p in lora.trainable_parameters(unet, "x")) == params["in0"]


def test_greedy_choice_under_a_budget():
    params = dict.fromkeys(choose.COARSE, 0) | {"in0": 10, "in1": 30, "mid": 20, "out3": 10}
    scores = {"in0": 0.5, "in1": 2.0, "mid": 1.0, "out3": -1.0}
    assert choose.choose_blocks(scores, params, 40, rank=8) == (["in0", "in1"], "in0=8,in1=8")  # in U-Net order
    assert choose.choose_blocks(scores, params, 30)[0] == ["in1"]  # in1 fills it: mid and in0 no longer fit
    assert choose.choose_blocks(scores, params, 25)[0] == ["mid"]  # mid fits; in0 on top would not
    assert choose.choose_blocks(scores, params, 1.0)[0] == ["in0", "in1", "mid"]  # all of it; negative left out
    assert choose.choose_blocks({"out3": -1.0, "in1": -2.0}, params, 10)[0] == ["out3"]  # at least one block
    with pytest.raises(ValueError, match="no block fits a budget of 5"):
        choose.choose_blocks(scores, params, 5)
    assert choose.resolve_budget(0.5, params) == 35


def adapters_in(unet, tmp_path):
    """An identity adapter everywhere but out3; a style adapter on in0 (a copy of the identity's update there: overlap
    1) and on out3 (its own). -> the two files."""
    lora.inject(unet, "identity", lora.rank_table("all=4,out3=0"))
    randomize(unet, "identity", 0)
    lora.inject(unet, "style", lora.rank_table("in0=4,out3=4"))
    randomize(unet, "style", 1)
    with torch.no_grad():
        for path, layer in lora.network.adapted_layers(unet, name="style"):
            if lora.blocks.block_of(path).startswith("IN"):
                for part in ("down", "up"):
                    getattr(layer.adapters["style"], part).copy_(getattr(layer.adapters["identity"], part))
    files = tmp_path / "identity.safetensors", tmp_path / "style.safetensors"
    for name, f in zip(("identity", "style"), files):
        lora.save(f, unet, name=name)
    lora.remove(unet, "identity")
    lora.remove(unet, "style")
    return files


def test_weight_signals_rank_the_style_only_block_first(unet, tmp_path):
    identity, style = adapters_in(unet, tmp_path)
    params = choose.block_parameters(unet, 4)
    scores, signals = choose.weight_scores(unet, identity, style, params)
    assert signals["in0"]["overlap"] == pytest.approx(1, abs=1e-5) and signals["out3"]["overlap"] == 0
    assert signals["in0"]["update"] > 0 and signals["out3"]["update"] > 0
    assert max(scores, key=scores.get) == "out3" and scores["in0"] == pytest.approx(0, abs=1e-5)
    assert set(scores) == {b for b in choose.COARSE if params[b]} and scores["in1"] == 0  # no style update there
    assert choose.choose_blocks(scores, params, params["out3"], rank=4) == (["out3"], "out3=4")


def draws_of(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return choose.make_draws(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, 64, generator=g), n=2, seed=seed)


def test_ablation_finds_the_block_the_style_lives_in(lora_sd):
    unet, ac = copy.deepcopy(lora_sd.unet), lora_sd.schedule.alphas_cumprod
    style_draws, identity_draws = draws_of(1), draws_of(2)
    lora.inject(unet, "identity", lora.rank_table("all", rank=4))
    randomize(unet, "identity", 0, std=0.05)
    lora.inject(unet, "style", lora.rank_table("in1=4"))  # the style: fitted to the style draws, in in1 only
    opt = torch.optim.Adam(lora.trainable_parameters(unet, "style"), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        choose.denoising_loss(unet, ac, style_draws, grad=True).backward()
        opt.step()
    params = choose.block_parameters(lora_sd.unet, 4)
    scores, details = choose.ablation_scores(unet, ac, style_draws, identity_draws, params)
    assert details["B"] > 0 and max(scores, key=scores.get) == "in1"
    assert all(abs(details["benefit"][b]) < 1e-6 for b in scores if b != "in1")  # no style there: no change
    assert all(a.block_weight == 1 for _, layer in lora.network.adapted_layers(unet, name="style")
               for a in [layer.adapters["style"]])  # the weights are put back
    assert choose.choose_blocks(scores, params, params["in1"])[0] == ["in1"]


def test_ablation_standard_errors_come_from_the_per_draw_differences(lora_sd):
    """ablation_scores' se: for in1, where the style adapter is, the formula of its docstring recomputed from
    draw_losses under the four block-weight settings that score in1; 0 for the blocks the adapter does not touch."""
    unet, ac = copy.deepcopy(lora_sd.unet), lora_sd.schedule.alphas_cumprod
    style_draws, identity_draws = draws_of(1, n=3), draws_of(2, n=3)
    lora.inject(unet, "identity", lora.rank_table("all", rank=4))
    randomize(unet, "identity", 0, std=0.05)
    lora.inject(unet, "style", lora.rank_table("in1=4"))
    randomize(unet, "style", 1, std=0.3)
    params = choose.block_parameters(lora_sd.unet, 4)
    scores, details = choose.ablation_scores(unet, ac, style_draws, identity_draws, params, harm_weight=0.5)

    def losses(on):
        choose._with_blocks(unet, "style", on)
        return [choose.draw_losses(unet, ac, d).double() for d in (style_draws, identity_draws)]
    everything, without_in1 = choose.COARSE, set(choose.COARSE) - {"in1"}
    (s_all, i_all), (s_none, i_none), (s_only, i_only), (s_wo, i_wo) = map(losses, (everything, (), ("in1",),
                                                                                    without_in1))
    B, share = s_none.mean() - s_all.mean(), params["in1"] / sum(params.values())
    benefit, harm = ((s_none - s_only) + (s_wo - s_all)) / 2, ((i_only - i_none) + (i_all - i_wo)) / 2
    se = (benefit.var() / 6 / (B.abs() * share) ** 2 + 0.5 ** 2 * harm.var() / 6 / B ** 2).sqrt()  # 3 images x 2
    assert details["se"]["in1"] == pytest.approx(float(se), rel=1e-6) and details["se"]["in1"] > 0
    assert all(details["se"][b] < 1e-9 for b in details["se"] if b != "in1")


def test_fisher_is_zero_where_style_and_identity_pull_the_same_way(lora_sd):
    unet, ac = copy.deepcopy(lora_sd.unet), lora_sd.schedule.alphas_cumprod
    params = choose.block_parameters(unet, 4)
    same, details = choose.fisher_scores(unet, ac, draws_of(1), draws_of(1), params, chunks=2)
    assert all(abs(details["cos"][b] - 1) < 1e-4 for b in same) and max(map(abs, same.values())) < 1e-3
    scores, details = choose.fisher_scores(unet, ac, draws_of(1), draws_of(2), params, chunks=2)
    assert all(details["fisher"][b] > 0 for b in scores) and sum(scores.values()) > 0
    assert not any(p.requires_grad for p in unet.parameters())  # the flags are put back


class Taps(torch.nn.Module):
    """A stand-in U-Net for the probe: every block sees the noisy latents themselves and passes on some channels (in1:
    channel 0, out2: channel 1, the others all four), so each block's output is known by hand."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # the probe reads the device and dtype from a parameter
        self.input_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(12))
        self.middle_block = torch.nn.Identity()
        self.output_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(12))

    def forward(self, x, t, ctx):
        for i, block in enumerate(self.input_blocks):
            block(x[:, :1] if 4 <= i <= 6 else x)  # IN04-IN06: in1
        self.middle_block(x)
        for i, block in enumerate(self.output_blocks):
            block(x[:, 1:2] if 6 <= i <= 8 else x)  # OUT06-OUT08: out2
        return x


def test_the_probe_measures_each_blocks_change_by_hand():
    g = torch.Generator().manual_seed(0)
    z0, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 16, generator=g)
    no_style, other = z0.clone(), z0.clone()
    no_style[:, 0] += torch.randn(3, 8, 8, generator=g)  # the style lives in channel 0, the identity in channels 1, 2
    other[:, 1:3] += torch.randn(3, 2, 8, 8, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000)
    draws, style_swapped, identity_swapped = (choose.make_draws(z, ctx, n=2, seed=3) for z in (z0, no_style, other))
    params = dict.fromkeys(choose.COARSE, 10)
    params["in1"], params["in3"] = 30, 0  # in3 not adaptable: no score
    unet = Taps()
    scores, details = choose.probe_scores(unet, ac, draws, style_swapped, identity_swapped, params, chunk=4)
    a = ac[draws["t"]][:, None, None, None]
    zt = lambda d: a.sqrt() * d["z0"] + (1 - a).sqrt() * draws["noise"]
    change = lambda d, c: float((zt(draws)[:, c] - zt(d)[:, c]).pow(2).sum() / zt(draws)[:, c].pow(2).sum())
    every = slice(None)
    S = {b: change(style_swapped, 0 if b == "in1" else 1 if b == "out2" else every) for b in scores}
    I = {b: change(identity_swapped, 0 if b == "in1" else 1 if b == "out2" else every) for b in scores}
    assert set(scores) == set(choose.COARSE) - {"in3"} and S["in1"] > 0 and S["out2"] == I["in1"] == 0
    for b in scores:
        assert details["style"][b] == pytest.approx(S[b], rel=1e-5)
        assert details["identity"][b] == pytest.approx(I[b], rel=1e-5, abs=1e-12)
        share = S[b] / sum(S.values()) / (params[b] / sum(params.values()))
        assert scores[b] == pytest.approx(share * S[b] / (S[b] + I[b]), rel=1e-5, abs=1e-12)
    assert max(scores, key=scores.get) == "in1" and scores["out2"] == 0  # style alone moves in1; only identity out2
    assert not any(m._forward_hooks for m in unet.modules())  # the probe's hooks are removed


def test_the_script_writes_a_table_train_py_trains(lora_sd, layouts, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import choose_blocks
    import train
    identity, style = adapters_in(copy.deepcopy(lora_sd.unet), tmp_path)
    table = tmp_path / "table.json"
    choose_blocks.main(["--ckpt", str(layouts["diffusers"]), "--identity", str(identity), "--style", str(style),
                        "--method", "weights", "--budget", "0.2", "--rank", "4", "--out", str(table)])
    assert "--blocks out3=4" in capsys.readouterr().out
    assert json.loads(table.read_text()) == {"dims": "out3=4"}
    assert lora.rank_table(str(table)).blocks() == ["OUT09", "OUT10", "OUT11"]
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "style_out3.safetensors"
    train.main(["--ckpt", str(layouts["diffusers"]), "--data", str(tmp_path), "--prompt", "a box",
                "--blocks", str(table), "--steps", "1", "--batch", "1", "--out", str(out), "--quiet", "--device", "cpu"])
    entries = lora.formats.read_adapter_file(out, lora_sd.unet)
    assert {lora.blocks.block_of(p) for _, p, *_ in entries} == {"OUT09", "OUT10", "OUT11"}
    for argv, message in ((["--method", "ablation", "--identity", str(identity), "--style", str(style)],
                           "--identity-data is needed"),
                          (["--identity", str(tmp_path / "nope.safetensors"), "--style", str(style)],
                           "nope.safetensors"),
                          (["--identity", str(identity), "--style", str(style), "--budget", "lots"], "--budget lots")):
        with pytest.raises(SystemExit, match=message):
            choose_blocks.main(["--ckpt", str(layouts["diffusers"]), *argv])


def test_the_script_prints_ablation_standard_errors(lora_sd, layouts, tmp_path, capsys):
    """choose_blocks.py --method ablation prints each score's standard error, saves them beside the scores, and
    names the blocks whose score is within two of them of 0."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import choose_blocks
    torch.manual_seed(0)  # lora.inject draws the adapters' down factors from torch's global generator
    identity, style = adapters_in(copy.deepcopy(lora_sd.unet), tmp_path)
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 + 90 * i, np.uint8)).save(tmp_path / f"{i}.png")
    choose_blocks.main(["--ckpt", str(layouts["diffusers"]), "--identity", str(identity), "--style", str(style),
                        "--identity-data", str(tmp_path), "--style-data", str(tmp_path), "--identity-prompt", "a box",
                        "--style-prompt", "a box", "--method", "ablation", "--images", "2", "--draws", "2",
                        "--budget", "0.2", "--rank", "4", "--out", str(tmp_path / "table.json")])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "table.scores.json").read_text())
    se = saved["details"]["se"]
    assert "± se" in printed and set(se) == set(saved["scores"])
    assert all(se[b] < 1e-9 for b in ("in1", "in2", "mid", "out1", "out2"))  # no style adapter there: no change
    assert [b for b, v in saved["scores"].items() if abs(v) < 2 * se[b]] == ["in0", "out3"]  # 4 draws settle nothing
    assert "within two standard errors of 0 (more --images or --draws would settle them): in0, out3" in printed


def test_the_probe_reads_a_folder_of_counterfactual_pairs(layouts, tmp_path, capsys):
    """choose_blocks.py --method probe --pairs: the tiny world's pairs (write_pairs) give a rank table; a folder
    without the three parts, or whose parts hold other file names, stops in one line naming it."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import choose_blocks
    from tinyworld.world import write_pairs
    write_pairs(tmp_path / "pairs", 2, seed=1)
    argv = ["--ckpt", str(layouts["diffusers"]), "--method", "probe", "--budget", "0.3", "--rank", "4",
            "--images", "2", "--draws", "1", "--device", "cpu"]
    choose_blocks.main([*argv, "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "table.json")])
    spec = json.loads((tmp_path / "table.json").read_text())["dims"]
    assert f"--blocks {spec}" in capsys.readouterr().out and lora.rank_table(spec).blocks()
    scores = json.loads((tmp_path / "table.scores.json").read_text())
    assert scores["details"]["style"]["in0"] > 0 and scores["details"]["identity"]["in0"] > 0
    with pytest.raises(SystemExit, match=r"--pairs .*scene: needs the folders scene, without_style, other_subject"):
        choose_blocks.main([*argv, "--pairs", str(tmp_path / "pairs" / "scene")])
    (tmp_path / "pairs" / "other_subject" / "001.png").rename(tmp_path / "pairs" / "other_subject" / "009.png")
    with pytest.raises(SystemExit, match=r"--pairs .*other_subject: not the same file names as .*scene"):
        choose_blocks.main([*argv, "--pairs", str(tmp_path / "pairs")])


def test_the_scripts_sample_size_suits_the_device():
    """16 images x 4 draws on a GPU, 4 x 1 on a CPU (where 16 x 4 of the ablation took over 15 min), the flags win;
    the probe (forward passes only) takes 16 x 4 everywhere."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import choose_blocks
    size = lambda *argv: (lambda a: (a.images, a.draws))(choose_blocks.parse_args(list(argv)))
    assert size("--device", "cpu") == (4, 1) and size("--device", "cuda:1") == (16, 4)
    assert size("--device", "cpu", "--method", "probe") == (16, 4)
    assert size("--device", "cpu", "--images", "8", "--draws", "2") == (8, 2)
