"""minisd.fast.graphs: the packed LoRA form used inside captured graphs (CPU), the CPU refusal, and (on CUDA) graph ==
eager;
train.py / sample.py --cuda-graph: refused with one line where it cannot run, and (on CUDA) the same results as eager."""
import concurrent.futures as cf
import copy
import gc
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import lora
import sample
import train
from lora.layers import LoRALinear
from minisd import UNet
from minisd.fast import forms, graphs
from tinyfiles import TINY_UNET, images, one_line_exit, tiny  # noqa: F401 (fixtures)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def counted(forwards):
    """The same {module: function} forms, each counting its calls in calls[module]: the proof that a form ran (its
    output may equal the layer's bit for bit or not, depending on which CPU kernels run)."""
    calls = dict.fromkeys(forwards, 0)

    def wrap(m, f):
        def form(*args, **kwargs):
            calls[m] += 1
            return f(*args, **kwargs)
        return form
    return {m: wrap(m, f) for m, f in forwards.items()}, calls


def test_packed_adapters_compute_what_the_layer_computes(single_thread):
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40).requires_grad_(False))
    for name, rank in (("a", 4), ("b", 8)):
        layer.add_adapter(name, rank, alpha=rank / 2, generator=g).up.data.normal_(0, 0.1, generator=g)
    layer.configure("b", weight=0.7)
    x = torch.randn(3, 5, 24, generator=g)
    with torch.no_grad():
        for mode in ("weight", "factors"):
            ref = layer(x)
            packs = {}
            with forms.applied(forms.packed_adapters(layer, packs, mode)):
                packed = layer(x)
            assert "forward" not in vars(layer)  # the layer's own forward is back
            assert rel(packed, ref) < 1e-6 and len(packs) == 1
            layer.merge("a")  # only "b" remains unmerged
            ref = layer(x)
            with forms.applied(forms.packed_adapters(layer, {}, mode)):
                assert rel(layer(x), ref) < 1e-6
            layer.unmerge("a")


def test_capture_time_forms_compute_the_layers(lora_sd, single_thread):
    """The graph's forms of 1x1 convolutions (GEMMs on the NHWC view), of ResBlock conv biases (folded into the
    time-embedding projection and the 1x1 skip) and of the time-embedding path (a row of a table over the timesteps)
    against the U-Net's own layers, on a channels_last U-Net as the graphs run it; adapter-wrapped layers keep their
    own forward."""
    unet = copy.deepcopy(lora_sd.unet).to(memory_format=torch.channels_last)
    lora.inject(unet, "a", 4, targets=("proj",))  # proj_in / proj_out become adapter wrappers
    gemms = forms.gemm_1x1(unet)
    names = {n for n, m in unet.named_modules() if m in gemms}
    assert names and all(n.endswith("skip_connection") for n in names)
    assert len(names) == sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and not hasattr(m, "adapters")
                             for m in unet.modules())
    packs = {}
    biases = forms.folded_biases(unet, packs)
    assert sum(n.endswith(("in_layers.2", "emb_layers.1")) for n, m in unet.named_modules() if m in biases) == 2 * sum(
        n.endswith("emb_layers") for n, _ in unet.named_modules())  # every ResBlock
    assert len(packs) == len(biases) // 2  # the summed biases, kept for as long as a graph reads them
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 500, ctx)
        with forms.applied(biases):  # the time-embedding table, with the in-conv biases folded in, read at t = 500
            table = forms.time_table(unet, 1000, torch.float32, packs)
        t, row = torch.tensor(500), table.new_empty(1, table.shape[1])
        tabled = forms.table_forms(unet, table, t, row)
        assert table.shape == (1000, sum(m.out_features for n, m in unet.named_modules() if n.endswith("emb_layers.1")))
        for added, active in ((gemms, gemms), (biases, {**gemms, **biases}), (tabled, {**gemms, **biases, **tabled})):
            active, calls = counted(active)
            with forms.applied(active):
                out = unet(x, 500, ctx)
            assert not any("forward" in vars(m) for m in active)
            assert all(calls[m] > 0 for m in added)  # the forms added ran (the table's replace some of the biases') ...
            assert rel(out, ref) < 1e-5  # ... and computed the same function


def test_new_capture_time_forms_compute_the_layers(lora_sd, single_thread):
    """The SiLU that writes channels_last, self-attention from one stacked q/k/v GEMM, upsampling + 3x3 conv as a
    2x2 conv to the four output phases, and the guided step's shared prefix (the layers before the first
    cross-attention on one half of [x, x]) against the U-Net's own layers, each alone and all together."""
    unet = copy.deepcopy(lora_sd.unet).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    for p in unet.parameters():  # weights large enough that every layer moves the output
        p.data.normal_(0, 0.2, generator=g)
    x = torch.randn(1, 4, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    nchw = torch.randn(2, 8, 5, 5, generator=g)
    silu = forms.silu_nhwc(unet)
    out = next(iter(silu.values()))(nchw)
    assert out.is_contiguous(memory_format=torch.channels_last) and rel(out, F.silu(nchw)) < 1e-6
    packs = {}
    ups = forms.subpixel_upsample(unet, packs)
    for up, form in ups.items():
        h = torch.randn(2, up.conv.in_channels, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert rel(form(h), up(h)) < 1e-5 and form(h).is_contiguous(memory_format=torch.channels_last)
    qkv, geglu = forms.stacked_qkv(unet, packs), forms.split_geglu(unet, packs)
    prefix = forms.guided_prefix(unet, {})
    names = sorted(n for n, m in unet.named_modules() if m in prefix)
    assert names == ["input_blocks.0.0", "input_blocks.1.0", "input_blocks.1.1.norm", "input_blocks.1.1.proj_in",
                     "input_blocks.1.1.transformer_blocks.0.attn1"]
    assert len(ups) == len(unet.cfg.channel_mult) - 1 and len(qkv) == len(geglu) == 16
    assert len(silu) == 2 * 22 + 1  # two per ResBlock, the output norm
    both = torch.cat([x, x])
    with torch.no_grad():
        ref = unet(both, 500, ctx)
        everything = {**silu, **qkv, **geglu, **ups}
        everything.update(forms.guided_prefix(unet, everything))  # wraps the forms of the layers it shares
        for active in (qkv, geglu, ups, prefix, everything):
            active, calls = counted(active)
            with forms.applied(active):
                out = unet(both, 500, ctx)
            assert rel(out, ref) < 1e-5 and all(n > 0 for n in calls.values())  # each form ran, the same function
        with forms.applied(prefix):  # the prefix is only right for a batch of two equal halves
            assert rel(unet(torch.cat([x, x + 1]), 500, ctx), unet(both, 500, ctx)) < 1e-5
    # unmerged adapters on attention and feed-forward, packed as W' (the capture's default): qkv and geglu use W'
    lora.inject(unet, "a", 4, targets=("attn", "ff"))
    for m in unet.modules():
        if isinstance(m, LoRALinear):
            m.adapters["a"].up.data.normal_(0, 0.1, generator=g)
    with torch.no_grad():
        adapted, packs = unet(both, 500, ctx), {}
        packed = forms.packed_adapters(unet, packs)
        fused = {**forms.stacked_qkv(unet, packs), **forms.split_geglu(unet, packs)}
        assert len(fused) == 32 and rel(adapted, ref) > 1e-2
        with forms.applied(packed), forms.applied(fused):
            assert rel(unet(both, 500, ctx), adapted) < 1e-5
        lora.merge(unet, "a")  # the wrappers now run their (merged) weight: the forms take it, as for plain layers
        assert not forms.packed_adapters(unet, {}) and len(forms.stacked_qkv(unet, {})) == len(forms.split_geglu(unet, {})) == 16
        with forms.applied({**forms.stacked_qkv(unet, {}), **forms.split_geglu(unet, {})}):
            assert rel(unet(both, 500, ctx), adapted) < 1e-5


def test_gated_adapters_follow_their_gate_through_the_capture_forms(lora_sd, single_thread):
    """A step range in the graph: adapter "r" gated (gated_forms: its share times a gate tensor read at every call),
    "s" packed into W' as usual, LoRA on attention and feed-forward and LoCon on the convs (LOCON_TARGETS). Through the
    capture-time forms (the graph's, on a CPU; no time table, which would hold the capture's gains), gate 1 computes
    the U-Net with "r" on, then gate 0 with "r" off: the same forms, the gate and the context's keys and values
    changed in place, as a replay sees them. In float64: the forms pack "s" into W' (other rounding), which in float32
    moved this random U-Net's output by 2e-6 to 8e-5 depending on the draw; in float64 by 1e-7 to 3e-7."""
    unet = copy.deepcopy(lora_sd.unet)
    g = torch.Generator().manual_seed(0)
    for name in ("r", "s"):
        lora.inject(unet, name, 4, targets=lora.LOCON_TARGETS, generator=g)
    unet.to(torch.float64, memory_format=torch.channels_last)
    for _, m in lora.network.adapted_layers(unet):
        for a in m.adapters.values():
            a.up.data.normal_(0, 0.05, generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g, dtype=torch.float64)
    both, gate, packs = torch.cat([x, x]), torch.ones((), dtype=torch.float64), {}
    names = tuple(f for f in forms.FORMS if f != "time_table")
    with torch.no_grad():
        on = unet(both, 301, ctx)
        lora.enable(unet, "r", False)
        off = unet(both, 301, ctx)
        lora.enable(unet, "r", True)
        gated = forms.gated_forms(unet, {}, {"r": gate})
        assert any(isinstance(m, lora.layers.LoConConv2d) for m in gated)
        assert any(isinstance(m, LoRALinear) for m in gated)

        def keys_values():
            with forms.applied(forms.packed_adapters(unet, packs, "weight", {"r": gate})):
                return {p: p(ctx) for p in forms.context_projections(unet)}
        kv = keys_values()
        step = forms.capture_forms(unet, names, packs, x.dtype, torch.tensor(301), kv, gates={"r": gate})
        with forms.applied(step):
            out_on = unet(both, 301, ctx)
        gate.fill_(0)
        for p, new in keys_values().items():
            kv[p].copy_(new)
        with forms.applied(step):
            out_off = unet(both, 301, ctx)
    assert rel(on, off) > 1e-2 and rel(out_on, on) < 1e-5 and rel(out_off, off) < 1e-5


def test_signature_follows_adapter_changes(lora_sd):
    unet = copy.deepcopy(lora_sd.unet)
    s0 = graphs._signature(unet)
    lora.inject(unet, "a", 4, targets=("attn",))
    s1 = graphs._signature(unet)
    lora.set_weight(unet, "a", weight=0.5)
    s2 = graphs._signature(unet)
    assert len({s0, s1, s2}) == 3


def test_cuda_graph_needs_cuda(lora_sd):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA"):
        lora_sd.sample("a cat", steps=2, height=64, width=64, progress=False, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_sampling_matches_eager(lora_sd, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the graph runs some 1x1 convolutions on cuBLAS
    sd = copy.copy(lora_sd)
    sd.unet, sd.vae, sd.text_encoder = (copy.deepcopy(m).cuda() for m in (lora_sd.unet, lora_sd.vae, lora_sd.text_encoder))
    kw = dict(steps=4, guidance=7.5, height=64, width=64, n=2, seed=1, progress=False)
    eager = sd.sample(["a cat", "dog"], cuda_graph=False, **kw)
    graphed = sd.sample(["a cat", "dog"], **kw)  # the default on CUDA; also makes the U-Net channels_last
    # the eager run before had NCHW weights, the one after channels_last ones; the graph's forms use other kernels
    # (float32 on an H200: 4.1e-5 and 1.1e-5)
    assert rel(graphed, eager) < 1e-4 and rel(graphed, sd.sample(["a cat", "dog"], cuda_graph=False, **kw)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_text_encoder_graph_follows_new_prompts(lora_sd):
    """The text encoder replayed from a graph returns a new tensor per call: a second prompt list after the first
    gives its own embeddings (and the sampler's guided graph sees a new context), equal to the eager encoder's."""
    sd = copy.copy(lora_sd)
    sd.text_encoder = copy.deepcopy(lora_sd.text_encoder).cuda()
    first = sd.encode_prompt(["a cat", ""], cuda_graph=True)
    second = sd.encode_prompt(["a dog", "x"], cuda_graph=True)
    assert rel(first, sd.encode_prompt(["a cat", ""])) < 1e-5 and rel(second, sd.encode_prompt(["a dog", "x"])) < 1e-5
    assert rel(first, second) > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guided_graph_forms_and_a_new_context(lora_sd, monkeypatch):
    """The step with every capture-time form (the context's cross-attention keys/values cached, 1x1 convolutions as
    GEMMs, folded biases) equals the plain captured step, and follows a new context: another tensor, or the same one
    changed in place."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuBLAS runs the 1x1 convolutions in float32
    unet = copy.deepcopy(lora_sd.unet).cuda().to(memory_format=torch.channels_last)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g, device="cuda")
    c1, c2 = (torch.randn(4, 77, unet.cfg.context_dim, generator=g, device="cuda") for _ in range(2))
    plain = graphs.GuidedUNetGraph(unet, x, c1, 7.5, forms=())
    fast = graphs.GuidedUNetGraph(unet, x, c1, 7.5)
    assert fast.kv_graph is not None and plain.kv_graph is None
    for ctx in (c1, c2, c2.mul_(0.5), c1):  # c2 changed in place: its version moved on
        ref = plain(x, 301, ctx).clone()
        assert rel(fast(x, 301, ctx), ref) < 1e-5
    assert rel(fast(x, 301, c2), plain(x, 301, c1).clone()) > 1e-2  # the context matters: the check above can fail
    assert rel(fast(x, 901, c1), plain(x, 901, c1).clone()) < 1e-5  # another row of the time table
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        fast(x, 1000, c1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guided_graph_forms_with_unmerged_c3lier_adapters(lora_sd, monkeypatch):
    """All forms together with unmerged LoRA/LoCon adapters on every target, the time-embedding projections and
    ResBlock convs included (their biases are not folded; the table holds the packed projections): the captured
    step equals the eager guided step, which the adapters change."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = copy.deepcopy(lora_sd.unet).cuda().to(memory_format=torch.channels_last)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g, device="cuda")
    ctx = torch.randn(4, 77, unet.cfg.context_dim, generator=g, device="cuda")

    def guided():
        e_u, e_c = unet(torch.cat([x, x]), torch.tensor(301, device="cuda"), ctx).chunk(2)
        return e_u + 7.5 * (e_c - e_u)
    with torch.no_grad():
        base = guided()
        lora.inject(unet, "a", 4, targets=lora.LOCON_TARGETS)
        for m in unet.modules():
            if isinstance(m, (LoRALinear, lora.layers.LoConConv2d)):
                for a in m.adapters.values():
                    a.up.normal_(0, 0.05, generator=g)
        ref = guided()
    step = graphs.GuidedUNetGraph(unet, x, ctx, 7.5)
    assert rel(ref, base) > 1e-2 and rel(step(x, 301, ctx), ref) < 1e-4  # packed weights: other rounding


# ---------------------------------------------------------------------------------- train.py / sample.py --cuda-graph

def flags(**kw):
    import argparse
    base = dict(device="cuda", eager=False, cuda_graph=False, mixed_precision="bf16", grad_accum=1, prior_data=None,
                te_rank=0)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, expected", [
    ({}, (True, None)),  # on CUDA the graph is the default ...
    (dict(eager=True), (False, None)),  # ... unless --eager
    (dict(device="cpu"), (False, None)),  # on a CPU nothing changes, nothing is said
    (dict(device="cpu", mixed_precision="auto"), (False, None)),
    (dict(mixed_precision="fp16"), (False, "eager steps: the CUDA graph does not take fp16 mixed precision")),
    (dict(grad_accum=2), (False, "eager steps: the CUDA graph does not take --grad-accum > 1")),
    (dict(prior_data="IMAGES"), (False, "eager steps: the CUDA graph does not take --prior-data")),
    (dict(te_rank=4), (False, "eager steps: the CUDA graph does not take --te-rank > 0")),
    (dict(te_rank=4, eager=True), (False, None)),
])
def test_train_takes_the_graph_on_cuda_unless_told_or_unable(kw, expected):
    graph, why = train.graph_mode(flags(**kw))
    assert graph == expected[0] and (why is None if expected[1] is None else why.startswith(expected[1])), why


def test_eager_and_cuda_graph_exclude_each_other(tmp_path):
    for main in (train.main, sample.main):
        with pytest.raises(SystemExit):
            main(["--eager", "--cuda-graph", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("argv, message", [
    ([], "--cuda-graph needs a CUDA device, got --device cpu"),
    (["--mixed-precision", "fp16"], "--cuda-graph does not work with fp16 mixed precision"),
    (["--grad-accum", "2"], "--cuda-graph does not work with --grad-accum > 1"),
    (["--prior-data", "IMAGES"], "--cuda-graph does not work with --prior-data"),
    (["--te-rank", "2"], "--cuda-graph does not work with --te-rank > 0"),
])
def test_train_cuda_graph_refusals_are_one_line_before_the_model_is_read(argv, message, images, tmp_path):
    bad = tmp_path / "bad.ckpt"  # never read: its error would show otherwise
    bad.write_bytes(b"")
    argv = [a.replace("IMAGES", str(images)) for a in argv]
    out = one_line_exit(train.main, ["--ckpt", str(bad), "--data", str(images), "--prompt", "x", "--quiet", "--device", "cpu",
                                     "--out", str(tmp_path / "a.safetensors"), "--cuda-graph", *argv])
    assert message in out and "bad.ckpt" not in out


def test_sample_cuda_graph_needs_cuda(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    out = one_line_exit(sample.main, ["--ckpt", str(bad), "--device", "cpu", "--cuda-graph", "--out", str(tmp_path / "o.png")])
    assert out == "error: --cuda-graph needs a CUDA device"


def test_optimizer_state_resumes_across_eager_and_capturable():
    """A capturable AdamW with a tensor lr (--cuda-graph) keeps both when it loads an eager state, and the other way."""
    p = nn.Parameter(torch.ones(3))
    eager = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.full((3,), 0.5)
    eager.step()
    graphed = torch.optim.AdamW([nn.Parameter(torch.ones(3))], lr=0.1, capturable=True)
    lr = graphed.param_groups[0]["lr"] = torch.tensor(0.1)
    train.load_optimizer_state(graphed, eager.state_dict())
    g, state = graphed.param_groups[0], next(iter(graphed.state.values()))
    assert g["capturable"] and g["lr"] is lr and state["step"].dtype == torch.float32 and state["step"].item() == 1
    assert torch.equal(state["exp_avg"], eager.state[p]["exp_avg"])
    back = torch.optim.AdamW([nn.Parameter(torch.ones(3))], lr=0.1)
    train.load_optimizer_state(back, graphed.state_dict())
    g, state = back.param_groups[0], next(iter(back.state.values()))
    assert not g["capturable"] and g["lr"] == 0.1 and state["step"].device.type == "cpu"


def train_run(tiny, images, out, *extra):
    """20 steps of train.py on the tiny model, exercising every random draw (flip, offset noise) and the lr schedule."""
    train.main(["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--data", str(images), "--prompt",
                "a box", "--resolution", "16", "--batch", "2", "--seed", "3", "--steps", "20", "--lr", "5e-3", "--warmup", "3",
                "--algo", "locon", "--flip", "--noise-offset", "0.05", "--min-snr-gamma", "5", "--save-every", "10",
                "--out", str(out), "--quiet", *extra])
    losses = np.loadtxt(out.with_name(out.stem + "-loss.csv"), delimiter=",", skiprows=1)[:, 1]
    weights = load_file(str(out))
    return losses, torch.cat([weights[k].double().flatten() for k in sorted(weights)])


def assert_close_runs(a, b):
    (loss_a, w_a), (loss_b, w_b) = a, b
    assert len(loss_a) == len(loss_b) == 20
    assert np.abs(loss_a - loss_b).mean() < 5e-3 * np.abs(loss_a).mean(), (loss_a, loss_b)
    # eager runs NCHW, the graph channels_last (other cuDNN kernels): bf16 rounding that 20 Adam steps carry on
    assert ((w_a - w_b).norm() / w_a.norm()).item() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_graph_with_reduce_grads_is_the_one_graph_step():
    """reduce_grads splits the step into two graphs around one call on the flat gradients (train.py's all-reduce
    under torchrun): with a call that halves them, the parameters follow an eager loop that halves each gradient."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    data = torch.randn(5, 8, 16, device=dev), torch.randn(5, 8, 4, device=dev)
    runs, calls = [], []

    def reduce(flat):
        calls.append(flat.numel())
        flat.mul_(0.5)
    for mode in ("eager", "graph"):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, capturable=mode == "graph")
        loss_fn = lambda x, y: (net(x) - y).square().mean()
        graph = graphs.TrainStepGraph(loss_fn, opt, [d[0] for d in data], clip_norm=0.5, reduce_grads=reduce) \
            if mode == "graph" else None
        for x, y in zip(*data):
            if graph:
                graph(x, y)
                continue
            opt.zero_grad()
            loss_fn(x, y).backward()
            for p in net.parameters():
                p.grad.mul_(0.5)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert rel(runs[1], runs[0]) < 1e-5 and calls[-1] == sum(p.numel() for p in net.parameters())
    assert len(calls) == 3 + 5  # the warm-up steps, then one per replay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_dead_step_graph_collected_mid_capture_does_not_break_the_capture():
    """A finished run's step graph in a reference cycle (train.py: run -> graph -> loss function -> run) is garbage
    when the next capture begins. Python's collector runs at whatever allocation crosses its threshold; here the
    threshold is 1 and the loss function allocates during the capture, as a U-Net's forward does. Destroying a graph
    mid-capture would invalidate the capture (cudaErrorStreamCaptureInvalidated)."""
    dev = torch.device("cuda")
    x = torch.randn(4, 16, device=dev)

    def cyclic_step_graph(on_capture=lambda: None):
        net = nn.Linear(16, 4).to(dev)
        run = {}

        def loss_fn(x):
            if torch.cuda.is_current_stream_capturing():
                on_capture()
            return run["net"](x).square().mean()
        run["net"] = net
        run["graph"] = graphs.TrainStepGraph(loss_fn, torch.optim.AdamW(net.parameters(), capturable=True), [x])
        return run["graph"]  # the cycle: run -> graph -> loss_fn -> run

    def allocate_with_threshold_1():
        gc.set_threshold(1, 1, 1)
        [[] for _ in range(1000)]  # container allocations: an automatic collection, if the collector is on
    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10 ** 9, 10 ** 9, 10 ** 9)  # no collection before the capture: the dead graph must reach it
    try:
        dead = weakref.ref(cyclic_step_graph())
        assert dead() is not None  # alive through its cycle alone, until a collection
        graph = cyclic_step_graph(on_capture=allocate_with_threshold_1)
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    assert dead() is None
    assert torch.isfinite(graph(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_graphs_captured_and_replayed_in_threads_match_one_after_another():
    """Four threads, each on a CUDA stream of its own, build a step graph and replay 20 steps while the others
    capture or replay: each ends where the same run alone ends (experiments/choose_eval.py --threads)."""
    dev = torch.device("cuda")
    data = torch.randn(20, 8, 16, device=dev)

    def run(seed):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())  # data was made there
        net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16)).to(dev)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(dev) / 4)
        step = graphs.TrainStepGraph(lambda x: (net(x) - x.flip(1)).square().mean(),
                                     torch.optim.AdamW(net.parameters(), lr=1e-2, capturable=True), [data[0]],
                                     clip_norm=1.0)
        for x in data:
            step(x)
        return torch.cat([p.detach().flatten() for p in net.parameters()]).cpu()

    alone = [run(seed) for seed in range(4)]

    def on_own_stream(seed):
        with torch.cuda.stream(torch.cuda.Stream()):
            return run(seed)
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(on_own_stream, range(4)))
    for a, b in zip(alone, together):
        assert rel(b, a) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_adapter_file_loads_while_another_thread_captures_random_draws(tmp_path):
    """choose_eval.py --threads: one thread loads an adapter file to render while another captures a training step
    that draws noise from the CUDA generator. A draw from that generator outside the capture fails ("Offset
    increment outside graph capture"), so loading must draw nothing."""
    unet = UNet(TINY_UNET)  # no diffusers needed: it runs on the GPU machine as it is
    target = copy.deepcopy(unet).cuda()
    lora.inject(unet, "a", lora.rank_table("all=4"))
    lora.save(tmp_path / "a.safetensors", unet, name="a")
    inside, leave = threading.Event(), threading.Event()

    def capture():
        stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            noise = torch.empty(8, device="cuda")
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                noise.normal_()
                inside.set()
                leave.wait(60)
        return graph
    with cf.ThreadPoolExecutor(1) as pool:
        captured = pool.submit(capture)
        assert inside.wait(60)
        try:
            lora.load(tmp_path / "a.safetensors", target)
        finally:
            leave.set()
        captured.result().replay()
    assert lora.adapter_names(target) == ["a"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_cuda_graph_matches_eager_and_resumes_across(tiny, images, tmp_path):
    """Same seed: the graph path draws the same data and noise, so its losses and adapter follow the eager run's (up
    to bf16 rounding); a state saved by either path resumes in the other."""
    eager = train_run(tiny, images, tmp_path / "eager.safetensors", "--eager")
    graphed = train_run(tiny, images, tmp_path / "graph.safetensors")  # the default on CUDA
    assert_close_runs(eager, graphed)
    to_graph = train_run(tiny, images, tmp_path / "e2g.safetensors", "--cuda-graph", "--resume", str(tmp_path / "eager-step000010.state.pt"))
    assert_close_runs(eager, to_graph)
    to_eager = train_run(tiny, images, tmp_path / "g2e.safetensors", "--eager", "--resume",
                         str(tmp_path / "graph-step000010.state.pt"))
    assert_close_runs(graphed, to_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_cuda_graph_with_checkpointing_matches_eager(tiny, images, tmp_path):
    """Activation checkpointing inside the captured step (the recomputation is captured too) changes nothing."""
    eager = train_run(tiny, images, tmp_path / "eager.safetensors", "--eager")
    assert_close_runs(eager, train_run(tiny, images, tmp_path / "graph.safetensors", "--cuda-graph", "--grad-checkpointing"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_cuda_graph_matches_eager(tiny, tmp_path):
    def png(name, *extra):
        sample.main(["--ckpt", str(tiny["safetensors"]), "--tokenizer", str(tiny["tokenizer"]), "--lora", str(tiny["adapter"]),
                     "--prompt", "a box", "--steps", "4", "--height", "16", "--width", "16", "--n", "2", "--seed", "5",
                     "--out", str(tmp_path / name), *extra])
        return np.asarray(Image.open(tmp_path / name), dtype=np.float64)
    eager, graphed, default = png("eager.png", "--eager"), png("graph.png", "--cuda-graph"), png("default.png")
    assert np.array_equal(default, graphed)  # on CUDA the default is the graph path
    assert eager.std() > 1  # not a blank image
    assert np.abs(graphed - eager).mean() < 1 and np.abs(graphed - eager).max() <= 16  # of 255: rounding (fp16, channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_graph_sampling_matches_eager_with_the_k_samplers(lora_sd, monkeypatch, sampler):
    """The graph takes DPM++ 2M Karras' integer timesteps as DDIM's; Euler a's fractional ones go to a graph with a
    float32 timestep (no time table), as the eager step's torch.tensor(t)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    sd = copy.copy(lora_sd)
    sd.unet, sd.vae, sd.text_encoder = (copy.deepcopy(m).cuda() for m in (lora_sd.unet, lora_sd.vae,
                                                                          lora_sd.text_encoder))
    kw = dict(steps=5, guidance=7.5, height=64, width=64, seed=1, progress=False, sampler=sampler)
    graphed = sd.sample(["a cat", "dog"], cuda_graph=True, **kw)
    assert rel(graphed, sd.sample(["a cat", "dog"], cuda_graph=False, **kw)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_step_gates_in_the_graph_match_eager_switching(lora_sd, monkeypatch, sampler):
    """An adapter on at steps 2 and 3 of 5 (sample.py's start=2:stop=4): the graph, captured once with the gate
    read per replay, gives the eager run that switches the adapter, which differs from the adapter always on."""
    import minisd
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    sd = copy.copy(lora_sd)
    sd.unet, sd.vae, sd.text_encoder = (copy.deepcopy(m).cuda() for m in (lora_sd.unet, lora_sd.vae,
                                                                          lora_sd.text_encoder))
    g = torch.Generator("cuda").manual_seed(0)
    for name in ("r", "s"):
        lora.inject(sd.unet, name, 4, targets=lora.LOCON_TARGETS)
    for _, m in lora.network.adapted_layers(sd.unet):
        for a in m.adapters.values():
            a.up.data.normal_(0, 0.05, generator=g)
    gates = lambda: minisd.fast.StepGates({"r": [False, True, True, False, False]},
                                          lambda name, on: lora.enable(sd.unet, name, on))
    kw = dict(steps=5, guidance=7.5, height=64, width=64, seed=1, progress=False, sampler=sampler)
    graphed = sd.sample(["a cat", "dog"], cuda_graph=True, on_step=gates(), **kw)
    again = sd.sample(["a cat", "dog"], on_step=gates(), **kw)  # the default on CUDA: the same cached graph
    eager = sd.sample(["a cat", "dog"], cuda_graph=False, on_step=gates(), **kw)
    lora.enable(sd.unet, "r", True)
    always = sd.sample(["a cat", "dog"], cuda_graph=False, **kw)
    assert rel(graphed, eager) < 1e-4 and rel(again, graphed) < 1e-6 and rel(always, eager) > 1e-3
