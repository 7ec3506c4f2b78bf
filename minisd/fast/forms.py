"""Capture-time forms of U-Net layers: forward functions that compute what a layer computes with fewer kernels. A
CUDA graph capture (minisd.fast.graphs.GuidedUNetGraph) sets them on the modules, `with applied({module: forward})`, and
the modules' own forwards come back afterwards: the model code is unchanged, and eager runs never see them.

FORMS, the ones GuidedUNetGraph uses by default (what each saves: docs/performance.md#capture-time-forms):
"context_kv"  the cross-attention keys and values (to_k, to_v of every attn2) depend only on the text context,
              fixed for a whole sampling run: a second, small graph computes them when the context changes, and
              the step graph reads them (32 fewer GEMMs per step; built by GuidedUNetGraph, which owns that graph)
"gemm_1x1"    plain 1x1 convolutions (proj_in, proj_out, the ResBlock skips) run as one GEMM on the channels_last
              activation, F.linear(x_nhwc, W, b): cuBLAS adds the bias inside the GEMM, where cuDNN's convolution
              adds it in a kernel of its own
"biases"      a ResBlock's in-conv bias joins the time-embedding projection's (conv1(h) + b1 + e: one broadcast
              add), and its out-conv bias joins the 1x1 skip's (skip(x) + conv2(h) + b2)
"time_table"  the time-embedding MLP and every ResBlock's projection of it depend only on the integer timestep:
              tabulated once for t in [0, timesteps) (SD 1.4: 1000 x 17,600 values, 35 MB in fp16), and the step
              gathers its row (one kernel for ~50)
"silu_nhwc"   where PyTorch's GroupNorm returned an NCHW tensor (the small maps; minisd.groupnorm keeps the large
              ones channels_last), the SiLU after it writes channels_last: one kernel for the activation and for the
              layout copy the next convolution would make
"qkv"         self-attention's queries, keys and values from one GEMM with the three weights stacked
"geglu"       the feed-forward's gated GELU from two GEMMs (the value and gate halves), so that the GELU and the
              product read contiguous tensors
"upsample"    nearest 2x upsampling + 3x3 convolution as one 2x2 convolution on the small map to the four phases of
              the output (4C channels, 16/36 of the multiply-adds) and one copy that interleaves them
"guided_prefix"  a guided step runs the U-Net on [x, x]: until the first cross-attention both halves are the
              same, so the layers before it (conv_in, the first ResBlock, the first self-attention) run on one half
              and their outputs are concatenated to both
A form takes only a layer that is exactly the class it was written for, with that class's own forward (stock.stock;
the containers whose data flow it relies on too), and calls the core's own building blocks (minisd.unet.attention,
geglu, UNet.embed_time) where it does not replace them; a form that replaces a block's math ("upsample") takes it
only while the block is the original (stock.unchanged). Any other layer runs as it is inside the graph: an edited
model computes the same through the forms as eagerly.
Adapter layers (lora's LoRALinear, LoConConv2d) meet the forms through their capture interface, two methods:
capture_weight() (the weight that computes what the layer computes now: merged and active adapters in) and
stacked_factors() (the active adapters' stacked downs and gain-scaled ups, or None when none is active). Layers
with active adapters keep their own forward, or the packed form of packed_adapters (also here), whose weights "qkv"
and "geglu" also use; adapter layers with nothing active count as plain layers (runs_plain). Some forms read
tensors made once (summed biases, the table, packed weights): they live in the caller's `packs` dict, because a
graph reads them at their address for as long as it lives.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import unet as U
from .modules import LeanGEGLU
from .stock import stock, unchanged

FORMS = ("context_kv", "gemm_1x1", "biases", "time_table", "silu_nhwc", "qkv", "geglu", "upsample", "guided_prefix")


@contextlib.contextmanager
def applied(forwards):
    """Run these modules with these forward functions ({module: function}) for the time of a capture; whatever they
    ran before comes back."""
    before = {m: m.__dict__.get("forward") for m in forwards}
    for m, f in forwards.items():
        m.forward = f
    try:
        yield
    finally:
        for m, f in before.items():
            if f is None:
                del m.forward
            else:
                m.forward = f


def _kept(packs, key, make):
    """packs[key], made by make() the first time."""
    if key not in packs:
        packs[key] = make()
    return packs[key]


def adapted(m):
    """A layer with adapters that offers the capture interface (lora's layers; minisd does not import lora)."""
    return callable(getattr(type(m), "capture_weight", None)) and callable(getattr(type(m), "stacked_factors", None))


def runs_plain(m, kind):
    """m computes kind's own forward now: a stock layer, or an adapter layer (a subclass) with no active adapter."""
    return isinstance(m, kind) and (stock(m, kind) or (adapted(m) and m.stacked_factors() is None))


def _weight(m, packs):
    """The weight a capture runs this Linear with: its own (runs_plain), or the packed W' of its active adapters
    (packed_adapters' "weight" form, already in packs); None when it runs otherwise."""
    if runs_plain(m, nn.Linear):
        return m.weight
    packed = packs.get(("weight", id(m))) if adapted(m) else None
    return packed[0] if packed else None


def _conv1x1_as_gemm(x, conv, bias):
    """A 1x1 convolution as y = x W^T + bias on the NHWC view of x (channels_last: both permutes are views, and the
    result is channels_last)."""
    w = conv.weight.view(conv.out_channels, conv.in_channels)
    return F.linear(x.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)


def gemm_1x1(unet):
    """{conv: forward} for 1x1 convolutions that run plain (runs_plain), as GEMMs."""
    return {m: (lambda x, m=m: _conv1x1_as_gemm(x, m, m.bias)) for m in unet.modules()
            if runs_plain(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1}


def _plain(m, kind):
    return runs_plain(m, kind) and m.bias is not None


def folded_biases(unet, packs, fold_skip=True):
    """{layer: forward} moving stock ResBlocks' conv biases into an add that happens anyway ("biases" above;
    fold_skip=False: only the in-conv's). The summed biases are kept in `packs`."""
    forms = {}
    no_bias = lambda x, m: m._conv_forward(x, m.weight, None)
    for r in unet.modules():
        if not stock(r, U.ResBlock):
            continue
        conv1, emb, conv2, skip = r.in_layers[2], r.emb_layers[1], r.out_layers[3], r.skip_connection
        if _plain(conv1, nn.Conv2d) and _plain(emb, nn.Linear) and stock(r.emb_layers, nn.Sequential):
            b = _kept(packs, ("bias", id(emb)), lambda: emb.bias + conv1.bias)
            forms[conv1] = lambda x, m=conv1: no_bias(x, m)
            forms[emb] = lambda e, m=emb, b=b: F.linear(e, m.weight, b)
        if fold_skip and _plain(conv2, nn.Conv2d) and _plain(skip, nn.Conv2d) and skip.kernel_size == (1, 1):
            b = _kept(packs, ("bias", id(skip)), lambda: skip.bias + conv2.bias)
            forms[conv2] = lambda x, m=conv2: no_bias(x, m)
            forms[skip] = lambda x, m=skip, b=b: _conv1x1_as_gemm(x, m, b)
    return forms


def _blocks(unet):
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def stock_data_flow(unet):
    """The U-Net and its blocks pass the time embedding and the context as minisd.unet's code does: what the time
    table and the shared keys/values rely on."""
    return stock(unet, U.UNet) and all(stock(b, U.TimestepEmbedSequential) for b in _blocks(unet))


def tabulable(unet):
    """The time embedding depends only on the timestep and reaches only stock ResBlocks' emb_layers."""
    return stock_data_flow(unet) and all(stock(r, U.ResBlock) for r in unet.modules() if isinstance(r, U.ResBlock))


def time_table(unet, timesteps, dtype, packs, key=()):
    """[timesteps, sum of widths]: every ResBlock's emb_layers(unet.embed_time(t)), side by side, kept in `packs`
    under `key` (what else shapes the values: the forms and the adapter packing in effect)."""
    def make():
        emb = unet.embed_time(torch.arange(timesteps, device=next(unet.parameters()).device), dtype)
        return torch.cat([r.emb_layers(emb) for r in unet.modules() if isinstance(r, U.ResBlock)], dim=1)
    return _kept(packs, ("time_table", timesteps, dtype, key), make)


def table_forms(unet, table, t, row):
    """{module: forward}: time_embed gathers row = table[t] (t a 0-d tensor), each ResBlock's emb_layers returns its
    slice of it: [1, width], which broadcasts over the batch (one timestep for all samples, as the sampler runs).
    Empty unless every ResBlock is stock (the embedding reaches the others as it is: they would read the row)."""
    if not tabulable(unet):
        return {}
    forms = {unet.time_embed: lambda e: torch.index_select(table, 0, t.view(1), out=row)}
    start = 0
    for r in [r for r in unet.modules() if isinstance(r, U.ResBlock)]:
        width = r.emb_layers[1].out_features
        forms[r.emb_layers] = lambda e, s=slice(start, start + width): row[:, s]
        start += width
    return forms


def _silu_nhwc(x):
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.aten.silu.out(x, out=torch.empty_like(x, memory_format=torch.channels_last))
    return F.silu(x)


def silu_nhwc(unet):
    """{SiLU: forward} for the SiLUs after a GroupNorm, when the U-Net's convolutions are channels_last."""
    if not unet.out[2].weight.is_contiguous(memory_format=torch.channels_last):
        return {}
    seqs = [s for r in unet.modules() if isinstance(r, U.ResBlock) for s in (r.in_layers, r.out_layers)] + [unet.out]
    return {s[1]: _silu_nhwc for s in seqs if stock(s[1], nn.SiLU)}


def stacked_qkv(unet, packs):
    """{attn1: forward}: self-attention with q, k, v from one GEMM (the stacked weights kept in `packs`), then
    minisd.unet.attention and to_out, as CrossAttention.forward."""
    forms = {}
    for a in [b.attn1 for b in unet.modules() if isinstance(b, U.BasicTransformerBlock)]:
        ws = [_weight(p, packs) for p in (a.to_q, a.to_k, a.to_v)]
        if not stock(a, U.CrossAttention) or any(w is None for w in ws):
            continue
        w = _kept(packs, ("qkv", id(a)), lambda: torch.cat(ws))
        forms[a] = lambda x, a=a, w=w: a.to_out(U.attention(*F.linear(x, w).chunk(3, dim=-1), a.heads))
    return forms


def split_geglu(unet, packs):
    """{GEGLU: forward}: its projection's two halves as two GEMMs, then minisd.unet.geglu. Their outputs are
    contiguous, so the GELU and the product run as vectorised kernels (on the halves of one output, strided views,
    they do not)."""
    forms = {}
    for m in unet.modules():
        w = _weight(m.proj, packs) if stock(m, U.GEGLU) or type(m) is LeanGEGLU else None
        if w is not None:
            n = m.proj.out_features // 2
            forms[m] = lambda x, wa=w[:n], wg=w[n:], ba=m.proj.bias[:n], bg=m.proj.bias[n:]: (
                U.geglu(F.linear(x, wa, ba), F.linear(x, wg, bg)))
    return forms


# Nearest 2x upsampling then a 3x3 convolution: output row 2i+a reads upsampled rows 2i+a-1 .. 2i+a+1, which are the
# input rows (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1. PHASE_ROWS[a] sums the kernel's 3 rows into the 2 rows
# of a 2x2 kernel over input rows (i-1+a, i+a); the same for columns.
PHASE_ROWS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


def _phase_weights(conv):
    """[4C, C, 2, 2] weights and [4C] bias: output channels p*C..(p+1)*C are output phase p = 2a + b."""
    r = torch.tensor(PHASE_ROWS, dtype=torch.float32, device=conv.weight.device)
    w = torch.einsum("aiy,ocyx,bjx->abocij", r, conv.weight.float(), r).flatten(0, 2).to(conv.weight.dtype)
    return w.contiguous(memory_format=torch.channels_last), conv.bias.repeat(4)


def _upsample_conv(x, w, b):
    B, C, H, W = x.shape
    y = F.conv2d(x, w, b, padding=1).contiguous(memory_format=torch.channels_last)  # [B, 4C, H+1, W+1]
    sB, _, sH, sW = y.stride()
    # output pixel (2i+a, 2j+b), channel c = y's pixel (i+a, j+b), channel (2a+b)C + c: one strided view of y
    phases = y.as_strided((B, H, 2, W, 2, C), (sB, sH, sH + 2 * C, sW, sW + C, 1))
    out = torch.empty(B, C, 2 * H, 2 * W, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(B, H, 2, W, 2, C).copy_(phases)
    return out


def subpixel_upsample(unet, packs):
    """{Upsample: forward} for stock Upsample blocks with plain 3x3 convolutions and channels_last weights, while
    minisd.unet.upsample is the nearest 2x upsampling this form computes; the phase weights kept in `packs`."""
    if not unchanged("upsample"):
        return {}
    return {m: (lambda x, wb=_kept(packs, ("upsample", id(m)), lambda: _phase_weights(m.conv)): _upsample_conv(x, *wb))
            for m in unet.modules() if stock(m, U.Upsample) and runs_plain(m.conv, nn.Conv2d)
            and m.conv.weight.is_contiguous(memory_format=torch.channels_last)}


def _per_sample(layer):
    """A layer of the prefix that computes each sample on its own, as guided_prefix relies on."""
    if isinstance(layer, U.ResBlock):
        return stock(layer, U.ResBlock)
    if isinstance(layer, U.SpatialTransformer):
        block = layer.transformer_blocks[0]
        return stock(layer, U.SpatialTransformer) and stock(block, U.BasicTransformerBlock) and \
            stock(block.attn1, U.CrossAttention)
    return runs_plain(layer, nn.Conv2d) or (isinstance(layer, nn.Conv2d) and adapted(layer))


def guided_prefix(unet, forms):
    """{layer: forward} for a U-Net run on [x, x] at one timestep (a guided step): the layers before the first
    cross-attention run on the first half of their input and return it twice. Wraps the forms given for them.
    Empty unless the U-Net, its blocks and the layers of the prefix are stock (each sample computed on its own)."""
    run = lambda m: forms.get(m, m.forward)
    half = lambda t: t[:t.shape[0] // 2]
    twice = lambda t: torch.cat([t, t])
    new = {}
    if not stock_data_flow(unet):
        return {}
    for layer in (layer for block in unet.input_blocks for layer in block):
        if not _per_sample(layer):
            return {}
        if isinstance(layer, U.SpatialTransformer):  # its norm and proj_in, then the first block's self-attention
            attn1 = layer.transformer_blocks[0].attn1
            new[layer.norm] = lambda x, f=run(layer.norm): f(half(x))
            new[layer.proj_in] = lambda h, f=run(layer.proj_in): twice(f(h))
            new[attn1] = lambda h, f=run(attn1): twice(f(half(h)))
            return new
        if isinstance(layer, U.ResBlock):  # emb: one row (the time table) or one per sample, all the same timestep
            new[layer] = lambda x, emb, f=run(layer): twice(f(half(x), emb[:1]))
        else:
            new[layer] = lambda x, f=run(layer): twice(f(half(x)))
    return {}  # no cross-attention: nothing to share before it


def context_projections(unet):
    """The keys' and values' projections (to_k, to_v) of the stock cross-attentions that see the text context as
    the U-Net was given it: what "context_kv" computes once per context."""
    if not stock_data_flow(unet):
        return []
    sts = [m for m in unet.modules() if stock(m, U.SpatialTransformer)]
    attns = [b.attn2 for st in sts for b in st.transformer_blocks if stock(b, U.BasicTransformerBlock)]
    return [p for a in attns if stock(a, U.CrossAttention) for p in (a.to_k, a.to_v)]


def packed_adapters(unet, packs, mode="weight", gates=None):
    """{layer: forward} for a capture: Linear adapter layers with active adapters run from tensors their capture
    interface made once, kept in `packs` (keyed by mode and layer; minisd.fast.graphs shares one dict between the
    graphs of one signature, so that batch sizes share them):
    "weight": W' = layer.capture_weight(), y = F.linear(x, W', b);
    "factors": (A, gB) = layer.stacked_factors(), y = x W^T + b; y += (x A^T) gB^T.
    gates: {adapter name: 0-d tensor}: any adapter layer (Linear or Conv2d) where a named adapter is active runs
    y = layer(x; W' = capture_weight(skip=gated)) + sum_n gate_n (gain_n B_n A_n x) (gated_forms): the graph reads
    the gates at every replay; mode None packs only those. Inference only (no autograd)."""
    if mode not in ("weight", "factors", None):
        raise ValueError(f"pack_adapters must be 'weight', 'factors' or None, got {mode!r}")
    forms = gated_forms(unet, packs, gates) if gates else {}
    for m in unet.modules() if mode else ():
        if m in forms or not (isinstance(m, nn.Linear) and adapted(m)) or m.stacked_factors() is None:
            continue
        key = (mode, id(m))
        if mode == "weight":
            w, = _kept(packs, key, lambda: (m.capture_weight(),))
            forms[m] = lambda x, m=m, w=w: F.linear(x, w, m.bias)
        else:
            downs, ups = _kept(packs, key, m.stacked_factors)

            def forward(x, m=m, downs=downs, ups=ups):
                y = F.linear(x, m.weight, m.bias)
                y.view(-1, y.shape[-1]).addmm_(F.linear(x, downs).view(-1, downs.shape[0]), ups.t())
                return y
            forms[m] = forward
    return forms


def gated_forms(unet, packs, gates):
    """{layer: forward} for the adapter layers where an adapter named in `gates` ({name: 0-d tensor}) is active:
    the other adapters folded into W' = capture_weight(skip=gates), each gated one added as gate * its own
    (down, gain * up) through the layer's plain_forward: a gate of 1 computes the layer as it is, 0 without it."""
    forms = {}
    for m in unet.modules():
        if not adapted(m):
            continue
        names = [n for n in gates if m.capture_factors(n) is not None]
        if not names:
            continue
        w, factors = _kept(packs, ("gated", id(m), tuple(names)), lambda: (
            m.capture_weight(skip=tuple(gates)), [m.capture_factors(n) for n in names]))
        downs, ups = [d for d, _ in factors], [u for _, u in factors]
        forms[m] = (lambda x, m=m, w=w, downs=downs, ups=ups, g=[gates[n] for n in names]:
                    m.plain_forward(x, w, m.bias, downs, ups, g))
    return forms


def capture_forms(unet, names, packs, dtype, t, kv=None, guided=True, timesteps=1000, pack_adapters="weight",
                  gates=None):
    """{module: forward}: the forms `names` (of FORMS) of a guided step (guided: the U-Net runs on [x, x]) as
    GuidedUNetGraph captures them, also on a CPU. t: the 0-d timestep tensor the step reads; kv: {projection: its
    output for the context}, for "context_kv"; gates: per-step adapter gates (packed_adapters). Tensors made once
    (the time table's row too) are kept in `packs`."""
    forms = packed_adapters(unet, packs, pack_adapters, gates) if pack_adapters or gates else {}
    with applied(forms):
        layer = gemm_1x1(unet) if "gemm_1x1" in names else {}
        if "biases" in names:
            layer.update(folded_biases(unet, packs, fold_skip="gemm_1x1" in names))
        for name, make in (("silu_nhwc", silu_nhwc), ("qkv", stacked_qkv), ("geglu", split_geglu),
                           ("upsample", subpixel_upsample)):
            if name in names:
                layer.update(make(unet) if name == "silu_nhwc" else make(unet, packs))
        if "context_kv" in names and kv:
            layer.update({p: (lambda c, out=out: out) for p, out in kv.items()})
        if "time_table" in names and tabulable(unet):
            with applied(layer):  # the table holds what the forms so far compute (folded biases, adapters)
                key = (tuple(sorted(names)), pack_adapters)
                table = time_table(unet, timesteps, dtype, packs, key)
            row = _kept(packs, ("row", timesteps, dtype, key), lambda: table.new_empty(1, table.shape[1]))
            layer.update(table_forms(unet, table, t, row))
        if "guided_prefix" in names and guided:
            layer.update(guided_prefix(unet, layer))
    return {**forms, **layer}
