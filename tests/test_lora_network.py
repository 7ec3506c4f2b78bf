"""Injecting block-wise adapters into minisd's U-Net and text encoder; merging, weights, training, removal."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import lora
from minisd import UNet, UNetConfig
from minisd.clip import CLIPTextConfig, CLIPTextModel

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest


def randomize_ups(unet, name, text_encoder=None, seed=0, std=0.2):
    """A fresh adapter has up = 0; give it random ups so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.network.adapted_layers(unet, text_encoder, name):
            layer.adapters[name].up.normal_(0, std, generator=g)


def assert_rel_close(a, b, tol=1e-5):
    """Norm-relative error: deep fp32 networks reorder sums differently on different paths."""
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.fixture
def unet(lora_sd):
    return copy.deepcopy(lora_sd.unet)


@pytest.fixture
def text_encoder(lora_sd):
    return copy.deepcopy(lora_sd.text_encoder)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)


def test_public_names():
    """lora's public API is a short list; the rest stays reachable through its submodule after `import lora`."""
    assert set(lora.__all__) == {
        "BLOCKS", "GROUPS", "parse_block_weights", "rank_table", "LORA_TARGETS", "LOCON_TARGETS", "inject", "remove",
        "enable", "merge", "unmerge", "set_weight", "trainable_parameters", "adapter_names", "save", "load",
        "choose_blocks", "block_parameters"}
    assert all(hasattr(lora, n) for n in lora.__all__)
    for path in ("network.adapted_layers", "network.use_fused", "blocks.block_of", "ranks.RankTable",
                 "layers.LoRALinear", "fused.lora_linear", "formats.unet_hash", "choose.ALGOS"):
        module, name = path.split(".")
        assert hasattr(getattr(lora, module), name), path
    assert lora.LOCON_TARGETS[:len(lora.LORA_TARGETS)] == lora.LORA_TARGETS


def test_sd14_module_counts():
    """kohya's counts for SD 1.x: LoRA-LierLa 192 U-Net modules, LoRA-C3Lier 278, text encoder 72."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12))
    paths = lora.inject(unet, "a", 8, text_encoder=te, te_rank=4)
    assert sum(p.startswith("unet.") for p in paths) == 192 and sum(p.startswith("text_encoder.") for p in paths) == 72
    assert len(lora.inject(unet, "b", 8, targets=lora.LOCON_TARGETS)) == 278
    convs = [p for p, m in unet.named_modules() if isinstance(m, lora.layers.LoConConv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 22 * 2 + 6  # two 3x3 convs per ResBlock, 3 downsamplers, 3 upsamplers
    assert len(lora.network.target_paths(unet, lora.rank_table("in0,out3", rank=4))) == 60  # 5 transformers x 12


def test_rank0_blocks_create_nothing(unet):
    keys_before = set(unet.state_dict())
    paths = lora.inject(unet, "style", "in0=4,out3=8", targets=lora.LOCON_TARGETS)
    assert paths and all(re.match(r"unet\.(input_blocks\.[123]|output_blocks\.(9|10|11))\.", p) for p in paths)
    layers = lora.network.adapted_layers(unet)
    assert len(layers) == len(paths)
    for path, layer in layers:
        assert layer.adapters["style"].rank == (4 if path.startswith("input_blocks") else 8)
    assert "input_blocks.3.0.op" in [p for p, _ in layers]  # in0's downsampler (a 3x3 conv, conv rank)
    added = set(unet.state_dict()) - keys_before
    assert len(added) == 2 * len(paths) and all(".adapters.style." in k for k in added)


def test_base_keys_unchanged_and_base_loading(unet, lora_sd):
    base = lora_sd.unet.state_dict()
    lora.inject(unet, "identity", 4, targets=lora.LOCON_TARGETS)
    lora.inject(unet, "style", "in0=2,out3=2")
    sd = unet.state_dict()
    assert set(base) <= set(sd) and all(".adapters." in k for k in set(sd) - set(base))
    assert set(lora.network.base_state_dict(unet)) == set(base)
    changed = {k: v + 1 for k, v in base.items()}
    lora.network.load_base_weights(unet, changed)
    assert torch.equal(unet.input_blocks[1][1].proj_in.weight, changed["input_blocks.1.1.proj_in.weight"])
    with pytest.raises(ValueError, match="missing"):
        lora.network.load_base_weights(unet, {k: v for k, v in base.items() if "proj_in" not in k})
    lora.merge(unet, "style")
    with pytest.raises(ValueError, match="unmerge"):
        lora.network.load_base_weights(unet, base)


def test_fresh_adapter_changes_nothing(unet, inputs):
    with torch.no_grad():
        y0 = unet(*inputs)
        lora.inject(unet, "identity", 4, targets=lora.LOCON_TARGETS)
        assert_rel_close(unet(*inputs), y0)


def test_text_encoder_adapters(unet, text_encoder):
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h0 = text_encoder(ids)
        paths = lora.inject(unet, "te", 0, text_encoder=text_encoder, te_rank=2)  # rank 0 everywhere in the U-Net
        assert len(paths) == 2 * 6 and all(p.startswith("text_encoder.encoder.layers.") for p in paths)
        randomize_ups(text_encoder, "te")
        assert not torch.allclose(text_encoder(ids), h0)
        lora.set_weight(text_encoder, "te", block_weights="OUTD")  # BASE = 1 in OUTD
        assert not torch.allclose(text_encoder(ids), h0)
        lora.set_weight(text_encoder, "te", block_weights="BASE=0")
        torch.testing.assert_close(text_encoder(ids), h0)


def two_adapters(unet):
    """The paper's setting: an identity adapter on all blocks, a style adapter on in0 + out3 (LoCon here)."""
    g = torch.Generator().manual_seed(0)
    lora.inject(unet, "identity", lora.rank_table("all=4", alphas=3), targets=lora.LOCON_TARGETS, generator=g)
    lora.inject(unet, "style", lora.rank_table("in0=8,out3=8", alphas=5), targets=lora.LOCON_TARGETS, generator=g)
    randomize_ups(unet, "identity", seed=1)
    randomize_ups(unet, "style", seed=2)
    lora.set_weight(unet, "style", 0.7, "in0=1,out3=0.6")


def test_merged_equals_unmerged(unet, inputs):
    two_adapters(unet)
    base = {k: v.clone() for k, v in lora.network.base_state_dict(unet).items()}
    with torch.no_grad():
        y = unet(*inputs)
        lora.merge(unet)
        assert not any(layer.active() for _, layer in lora.network.adapted_layers(unet))
        assert_rel_close(unet(*inputs), y)
        lora.unmerge(unet, "identity")
        lora.set_weight(unet, "identity", 0.0)
        lora.set_weight(unet, "style", 0.3)  # re-merges the style adapter with its new weight
        merged_style = unet(*inputs)
        lora.unmerge(unet)
        assert_rel_close(unet(*inputs), merged_style)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items() if k in base)


@pytest.mark.parametrize("make", [lambda: nn.Linear(32, 24), lambda: nn.Conv2d(16, 8, 3, padding=1)])
def test_100_merge_unmerge_cycles_are_bit_exact(make):
    layer = lora.layers.LoRALinear(make()) if isinstance(make(), nn.Linear) else lora.layers.LoConConv2d(make())
    original = layer.weight.detach().clone()
    for i, name in enumerate(("identity", "style")):
        a = layer.add_adapter(name, 3 + i, alpha=1.7)
        with torch.no_grad():
            a.up.normal_(0, 0.3)
    for cycle in range(100):
        layer.merge("identity")
        layer.merge("style")
        layer.unmerge("identity" if cycle % 2 else "style")
        layer.configure("style", weight=1 + cycle / 100, enabled=cycle % 3 > 0)
        layer.unmerge("style")
        layer.unmerge("identity")
        assert torch.equal(layer.weight, original) and layer.unmerged_weight is None


def test_block_weights_scale_only_their_blocks(unet, text_encoder, inputs):
    lora.inject(unet, "style", lora.rank_table(4, alphas=3), targets=lora.LOCON_TARGETS, text_encoder=text_encoder,
                te_rank=2)
    randomize_ups(unet, "style", text_encoder)
    expected = copy.deepcopy(unet)  # hand-built: fold 0.8 * the OUTD weight of each module's block into its up
    outd = {"BASE": 1, "OUT03": 1, "OUT04": 1, "OUT05": 1, "OUT06": 1}
    with torch.no_grad():
        for path, layer in lora.network.adapted_layers(expected):
            layer.adapters["style"].up.mul_(0.8 * outd.get(lora.blocks.block_of(path), 0))
    lora.set_weight(unet, "style", 0.8, "OUTD", text_encoder=text_encoder)
    for path, layer in lora.network.adapted_layers(unet, text_encoder):
        a = layer.adapters["style"]
        assert (a.global_weight, a.block_weight) == (0.8, outd.get(lora.blocks.block_of(path), 0)), path
    with torch.no_grad():
        assert_rel_close(unet(*inputs), expected(*inputs))


def test_fused_is_as_accurate_as_plain_on_the_whole_unet(unet, inputs):
    """Values and adapter gradients of the fused and the plain path against a float64 run. Some gradients are ~0
    in exact arithmetic (time-embedding biases before a GroupNorm, self-attention over one token) and fp32 itself
    is only good to ~1e-4 on the others here, so the fused path must be as close to float64 as the plain one."""
    two_adapters(unet)
    exact = copy.deepcopy(unet).double()
    lora.network.use_fused(exact, False)
    runs = []
    for model, fused in ((unet, True), (unet, False), (exact, False)):
        lora.network.use_fused(model, fused)
        params = lora.trainable_parameters(model, "identity") + lora.trainable_parameters(model, "style")
        y = model(*(t.to(params[0].dtype) if t.is_floating_point() else t for t in inputs))
        runs.append((y, torch.cat([g.flatten() for g in torch.autograd.grad(y.square().mean(), params)])))
    (y_fused, g_fused), (y_plain, g_plain), (y_exact, g_exact) = runs
    assert_rel_close(y_fused, y_plain)
    err = lambda g: ((g.double() - g_exact).norm() / g_exact.norm()).item()
    assert err(g_fused) <= max(2 * err(g_plain), 1e-5), (err(g_fused), err(g_plain))


def test_gradient_checkpointing_gives_the_same_gradients(unet, inputs):
    two_adapters(unet)
    params = lora.trainable_parameters(unet, "identity")
    grads = []
    for checkpointing in (False, True):
        unet.gradient_checkpointing = checkpointing
        grads.append(torch.autograd.grad(unet(*inputs).square().mean(), params))
    for a, b in zip(*grads):  # the same computation twice (a tolerance: it may be allocated and rounded differently)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def test_training_step_touches_only_the_trained_adapter(unet, inputs):
    two_adapters(unet)
    unet.requires_grad_(False)
    params = lora.trainable_parameters(unet, "identity")
    assert len(params) == 2 * len(lora.network.adapted_layers(unet, name="identity"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = unet(*inputs).float().square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in params)  # (some are ~0 in exact arithmetic: see the test above)
    assert sum(p.grad.norm() > 0 for p in params) > 0.8 * len(params)
    assert all(p.grad is None for p in unet.parameters() if not any(p is q for q in params))
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert all(".adapters.identity." in k for k in changed) and len(changed) > 0.8 * len(params)


def test_enable_disable_remove(unet, lora_sd, inputs):
    keys = list(unet.state_dict())
    with torch.no_grad():
        y0 = unet(*inputs)
        two_adapters(unet)
        y_both = unet(*inputs)
        assert not torch.allclose(y_both, y0)
        lora.enable(unet, "style", False)
        lora.enable(unet, "identity", False)
        assert_rel_close(unet(*inputs), y0, 1e-6)
        lora.enable(unet, "style")
        lora.enable(unet, "identity")
        lora.merge(unet, "identity")
        lora.remove(unet, "identity")  # unmerges first
        assert lora.adapter_names(unet) == ["style"]
        lora.remove(unet, "style")
        assert lora.network.adapted_layers(unet) == [] and list(unet.state_dict()) == keys
        assert type(unet.input_blocks[1][1].proj_in) is nn.Conv2d
        original = lora_sd.unet.state_dict()
        assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
        assert_rel_close(unet(*inputs), y0, 1e-6)


def test_errors(unet):
    lora.inject(unet, "identity", 2)
    with pytest.raises(ValueError, match="exists already"):
        lora.inject(unet, "identity", 2)
    with pytest.raises(ValueError, match="unknown targets.*valid: a tuple of attn, ff, proj, resnet, sampler"):
        lora.inject(unet, "x", 2, targets=("attn", "conv"))
    with pytest.raises(ValueError, match="adapter name"):
        lora.inject(unet, "a.b", 2)
    with pytest.raises(KeyError, match="no adapter 'styl'; adapters: identity"):
        lora.set_weight(unet, "styl", 0.5)
    with pytest.raises(ValueError, match="unknown block-weight name"):
        lora.set_weight(unet, "identity", block_weights="in5=1")
