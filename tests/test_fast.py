"""minisd.fast, the speed layer: the readable core imports none of it; its module swaps keep the parameters and the
function; its capture-time forms compute what an edited model computes (CPU); lora's capture interface computes what
the layer computes; the pipeline reaches it only through sd.fast."""
import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import minisd
import minisd.unet as U
from minisd.fast import FORMS, forms, speed_up
from minisd.fast.groupnorm import ChannelsLastGroupNorm
from minisd.fast.modules import InPlaceResnetBlock, LeanGEGLU
from tinyfiles import tiny  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
CORE = ["unet", "vae", "ddim", "text", "checkpoint", "layouts", "pipeline"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def imported_modules(source, package="minisd"):
    """Absolute names of the modules a minisd file imports (relative imports resolved against the package)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_the_core_imports_nothing_from_the_speed_layer():
    speed = lambda name: name == "minisd.fast" or name.startswith("minisd.fast.")
    # the check itself sees every way of importing it (functions included), and not what is not an import
    for src in ("from .fast import graphs", "from . import fast", "def f():\n    import minisd.fast.forms",
                "from .fast.groupnorm import ChannelsLastGroupNorm", "from minisd import fast"):
        assert any(map(speed, imported_modules(src))), src
    assert not any(map(speed, imported_modules("from .unet import UNet\nfast = 1\nimport fastapi")))
    for name in CORE:
        source = (ROOT / "minisd" / f"{name}.py").read_text()
        assert not [m for m in imported_modules(source) if speed(m)], f"minisd/{name}.py imports the speed layer"


def plain_sd(layouts):
    return minisd.pipeline.load(layouts["diffusers"])


def test_speed_up_swaps_modules_keeping_parameters_and_function(layouts, single_thread):
    """Every stock GroupNorm, GEGLU and VAE ResnetBlock is swapped for the speed layer's subclass holding the same
    Parameters under the same state-dict keys; an edited module (a subclass) stays; the U-Net, the decoder and
    GEGLU's gradient compute what they computed."""
    sd = plain_sd(layouts)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g)
    geglu = copy.deepcopy(sd.unet.input_blocks[1][1].transformer_blocks[0].ff.net[0]).double()
    h = torch.randn(2, 5, geglu.proj.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    sd.unet.out[0] = retyped(sd.unet.out[0], type("MyNorm", (nn.GroupNorm,), {}))  # somebody's edit
    with torch.no_grad():
        ref_image, ref_eps = sd.vae.decode(z), sd.unet(x, 10, ctx)
    state = lambda: {**sd.unet.state_dict(keep_vars=True), **sd.vae.state_dict(keep_vars=True)}
    before = state()
    for m in (sd.unet, sd.vae):
        assert speed_up(m) is m
    after = state()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in after)
    assert type(sd.unet.out[0]).__name__ == "MyNorm"
    norms = [m for m in [*sd.unet.modules(), *sd.vae.modules()] if isinstance(m, nn.GroupNorm)]
    assert sum(type(m) is ChannelsLastGroupNorm for m in norms) == len(norms) - 1
    assert all(type(m) is LeanGEGLU for m in sd.unet.modules() if isinstance(m, U.GEGLU))
    assert all(type(m) is InPlaceResnetBlock for m in sd.vae.modules() if isinstance(m, minisd.vae.ResnetBlock))
    with torch.no_grad():
        # other kernels (channels_last GroupNorm, in-place adds): float32 rounding over the whole net, not bits
        assert rel(sd.vae.decode(z), ref_image) < 1e-5 and rel(sd.unet(x, 10, ctx), ref_eps) < 1e-5
    lean = speed_up(nn.Sequential(geglu))[0]  # the lean backward: the gradient of the plain code
    assert type(lean) is LeanGEGLU and lean.proj is geglu.proj
    grad_ref, = torch.autograd.grad(geglu(h).square().sum(), h)
    grad, = torch.autograd.grad(lean(h).square().sum(), h)
    assert rel(grad, grad_ref) < 1e-10


def test_load_puts_the_speed_layer_on_and_the_pipeline_reaches_it_only_through_sd_fast(layouts, lora_sd):
    """minisd.load attaches minisd.fast; sample() calls sd.fast only where it is asked to (cuda_graph=True) or, by
    default, on CUDA; the plain pipeline refuses cuda_graph=True with one line."""
    assert isinstance(lora_sd.fast, minisd.fast.FastPath)
    sd = plain_sd(layouts)
    assert sd.fast is None and not sd.uses_fast()
    with pytest.raises(ValueError, match="cuda_graph=True needs a speed layer"):
        sd.sample("a cat", steps=2, height=64, width=64, progress=False, cuda_graph=True)
    calls = []

    class Recording:  # a speed layer that computes with the core's own code and records what it is asked
        def guided_step(self, sd, x, ctx, guidance, on_step):
            calls.append(("step", guidance))
            return sd.guided_step(x, ctx, guidance)

        def takes(self, on_step):
            return False

        def encode_text(self, text_encoder, ids):
            calls.append(("text", tuple(ids.shape)))
            return text_encoder(ids)
    kw = dict(steps=2, height=64, width=64, n=2, progress=False)
    eager = sd.sample("a cat", **kw)
    sd.fast = Recording()
    assert torch.equal(sd.sample("a cat", **kw), eager) and not calls  # on a CPU the default is the core
    assert rel(sd.sample("a cat", cuda_graph=True, **kw), eager) < 1e-5  # other batch shapes: other kernels
    assert calls == [("text", (4, 77)), ("step", 7.5)]


def conv_layouts(module):
    return {m.weight.is_contiguous(memory_format=torch.channels_last) for m in module.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)}


def test_sampling_changes_no_layout_and_attach_keeps_it_on_the_cpu(lora_sd):
    """The layout is the explicit call's (attach, on CUDA only): on the CPU the weights stay contiguous, before and
    after sampling."""
    assert conv_layouts(lora_sd.unet) == conv_layouts(lora_sd.vae) == {False}
    lora_sd.sample("a cat", steps=2, height=64, width=64, progress=False)
    assert conv_layouts(lora_sd.unet) == conv_layouts(lora_sd.vae) == {False}
    minisd.fast.to_channels_last(lora_sd.vae)
    assert conv_layouts(lora_sd.vae) == {True}
    lora_sd.vae.to(memory_format=torch.contiguous_format)


def test_graph_cache_is_per_pipeline_and_follows_the_weights():
    """A GraphCache makes a graph once per (module, key), again when a weight changes in place or is replaced, and
    forgets on release; two caches share nothing (no process-wide graphs)."""
    net = nn.Sequential(nn.Linear(3, 3))
    made = []
    make = lambda packs: made.append(len(made)) or len(made)
    a, b = minisd.fast.GraphCache(), minisd.fast.GraphCache()
    assert a.get(net, "k", make) == a.get(net, "k", make) == 1
    assert a.get(net, "other", make) == 2 and b.get(net, "k", make) == 3
    with torch.no_grad():
        net[0].weight.add_(1)  # in place: the graphs would replay stale weights
    assert a.get(net, "k", make) == 4 and a.get(net, "k", make) == 4
    net[0].bias = nn.Parameter(torch.zeros(3))  # replaced
    assert a.get(net, "k", make) == 5
    a.release(net)
    assert a.get(net, "k", make) == 6
    a.release()
    assert not a.entries and b.get(net, "k", make) == 7  # b saw the changed weights too


def edited_unet(lora_sd):
    unet = copy.deepcopy(lora_sd.unet).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    for p in unet.parameters():  # weights large enough that every layer moves the output
        p.data.normal_(0, 0.2, generator=g)
    return unet


def through_forms(unet, x, ctx, t, names=FORMS):
    """The guided batch [x, x] through the U-Net with the capture-time forms on (a CPU stand-in for the graph:
    the keys and values of "context_kv" computed eagerly), and how many forms it used."""
    with torch.no_grad():
        kv = {p: p(ctx) for p in forms.context_projections(unet)} if "context_kv" in names else None
        step = forms.capture_forms(unet, names, {}, x.dtype, torch.tensor(t), kv, guided=True)
        with forms.applied(step):
            return unet(torch.cat([x, x]), t, ctx), len(step)


class HalfAttention(U.CrossAttention):
    """A researcher's attention: the same layer, half its output."""

    def forward(self, x, context=None):
        return super().forward(x, context) * 0.5


class ScaleShiftResBlock(U.ResBlock):
    """A researcher's ResBlock: the time embedding scales and shifts (a time table would give it the wrong input)."""

    def forward(self, x, emb):
        e = self.emb_layers(emb)[:, :, None, None]
        h = self.in_layers(x) * (1 + e) + e
        return self.skip_connection(x) + self.out_layers(h)


def retyped(m, cls):
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    return new


EDITS = {
    "attention function": lambda unet, mp: mp.setattr(U, "attention", lambda q, k, v, heads: STOCK["attention"](
        q * 2, k, v, heads)),
    "geglu function": lambda unet, mp: mp.setattr(U, "geglu", lambda a, gate: a * F.silu(gate)),
    "upsample function": lambda unet, mp: mp.setattr(U, "upsample", lambda x: F.interpolate(
        x, scale_factor=2.0, mode="bilinear")),
    "attention subclass": lambda unet, mp: [setattr(b, n, retyped(getattr(b, n), HalfAttention)) for b in unet.modules()
                                            if isinstance(b, U.BasicTransformerBlock) for n in ("attn1", "attn2")][:0],
    "ResBlock subclass": lambda unet, mp: unet.input_blocks[1].__setitem__(0, retyped(unet.input_blocks[1][0],
                                                                                      ScaleShiftResBlock)),
    "block forward": lambda unet, mp: mp.setattr(U.BasicTransformerBlock, "forward", lambda self, x, context: (
        x + self.attn2(self.norm2(x + self.attn1(self.norm1(x))), context * 0.5))),
    "time embedding": lambda unet, mp: mp.setattr(U.UNet, "embed_time", lambda self, t, dtype: self.time_embed(
        U.timestep_embedding(t * 2 + 1, self.cfg.model_channels).to(dtype))),
}
STOCK = {"attention": U.attention}


def test_forms_compute_what_the_stock_model_computes(lora_sd, single_thread):
    unet = edited_unet(lora_sd)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        ref = unet(torch.cat([x, x]), 500, ctx)
    out, n = through_forms(unet, x, ctx, 500)
    assert rel(out, ref) < 1e-5 and n > 100  # every kind of form: a few hundred layers


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_model_computes_the_same_through_the_forms(edit, lora_sd, monkeypatch, single_thread):
    """A researcher's edit (a replaced building block, a subclass, a class's forward replaced) changes the U-Net's
    output; the capture-time forms compute the edited model (the layers they were not written for run as they are,
    the building blocks they call are the edited ones), while still taking the layers they were written for."""
    unet = edited_unet(lora_sd)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        stock = unet(torch.cat([x, x]), 500, ctx)
        EDITS[edit](unet, monkeypatch)
        ref = unet(torch.cat([x, x]), 500, ctx)
    assert rel(ref, stock) > 1e-3, "the edit changes the model"
    out, n = through_forms(unet, x, ctx, 500)
    assert rel(out, ref) < 1e-5 and n > 20


def test_capture_interface_computes_what_the_layer_computes(single_thread):
    """lora's capture interface against the layer's own forward: capture_weight() (the weight itself while no
    adapter is active) and stacked_factors(), with a merged adapter, one at another weight, and a LoCon conv;
    capture_signature() follows the switches and in-place changes of the factors."""
    g = torch.Generator().manual_seed(0)
    lin = lora.layers.LoRALinear(nn.Linear(24, 40).requires_grad_(False))
    conv = lora.layers.LoConConv2d(nn.Conv2d(6, 8, 3, padding=1).requires_grad_(False))
    x, xc = torch.randn(3, 5, 24, generator=g), torch.randn(2, 6, 7, 7, generator=g)
    with torch.no_grad():
        assert lin.capture_weight() is lin.weight and lin.stacked_factors() is None
        for layer in (lin, conv):
            for name, rank in (("a", 4), ("b", 8), ("c", 2)):
                layer.add_adapter(name, rank, alpha=rank / 2, generator=g).up.normal_(0, 0.1, generator=g)
            layer.configure("b", weight=0.7)
            layer.merge("c")
        sig = lin.capture_signature()
        w, (down, up) = lin.capture_weight(), lin.stacked_factors()
        assert down.shape == (12, 24) and up.shape == (40, 12)
        y = lin(x)
        assert rel(F.linear(x, w, lin.bias), y) < 1e-6
        assert rel(F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, down), up), y) < 1e-6
        yc = conv(xc)
        assert rel(F.conv2d(xc, conv.capture_weight(), conv.bias, padding=1), yc) < 1e-6
        lin.configure("a", weight=0.5)
        assert lin.capture_signature() != sig
        sig = lin.capture_signature()
        lin.adapters["b"].up.mul_(2)
        assert lin.capture_signature() != sig
        for name in "ab":
            lin.configure(name, enabled=False)
        assert lin.capture_weight() is lin.weight and lin.stacked_factors() is None


def test_load_reads_straight_to_the_dtype(tiny):
    """minisd.load(dtype=float16) converts each tensor as it is read: the same weights as a float32 load converted
    afterwards, nothing left in float32, and nothing left on the meta device (the models are built without random
    init): the float16 model encodes a prompt as the float32 one does, to float16's precision."""
    full, half = (minisd.load(tiny["safetensors"], dtype=dt, tokenizer=tiny["tokenizer"])
                  for dt in (torch.float32, torch.float16))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(full, part).state_dict(), getattr(half, part).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].half() if a[k].is_floating_point() else a[k], b[k]), (part, k)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.float16}
    assert not any(t.is_meta for m in (half.unet, half.vae, half.text_encoder) for t in m.state_dict().values())
    ref = full.encode_prompt(["a cat"])
    assert ((half.encode_prompt(["a cat"]).float() - ref).norm() / ref.norm()).item() < 1e-2
