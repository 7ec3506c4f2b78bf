"""Choosing the blocks of a style adapter: scores per coarse block (in0..in3, mid, out0..out3) from your own
adapters and images, and a greedy choice under a parameter budget, written as a rank table train.py --blocks takes.

The paper (arXiv 2403.07500) keeps an identity adapter on all blocks and trains the style adapter only on chosen
blocks (In-Block0 + Out-Block3), but does not say how to choose them. Four automatable answers:

  ablation  (needs an identity adapter, an all-block style adapter and a few images of each set)
            With both adapters loaded, switch the style adapter block by block with lora-block-weight's per-block
            weights and measure the model's own denoising loss  L(w) = E ||eps - eps_theta(z_t, t, c; w)||^2  on
            fixed (noise, timestep) draws of the style images (L_S) and the identity images (L_I):
                benefit_b = 1/2 [(L_S(none) - L_S(only b)) + (L_S(all but b) - L_S(all))]    style the block brings
                harm_b    = 1/2 [(L_I(only b) - L_I(none)) + (L_I(all) - L_I(all but b))]    identity it costs
                score_b   = (benefit_b / B) / (p_b / P)  -  harm_weight * harm_b / |B|
            B = L_S(none) - L_S(all) (the whole style benefit), p_b the block's adapter parameters, P their sum:
            the first term is the block's share of the style per share of the parameters (1 on average). Each
            score comes with its standard error over the draws (ablation_scores).
  weights   (needs only the two trained files) per block, with dW = alpha / r * up @ down of every module:
                update_b  = ||dW_style||_F / ||W||_F                 over the block's modules, concatenated
                overlap_b = <dW_identity, dW_style>_F / (||dW_identity||_F ||dW_style||_F)
                score_b   = update_b * (1 - |overlap_b|)
  fisher    (needs only the base model and the images, before any training) per block, the empirical Fisher
            information of the style loss in the weights an adapter would touch, and the cosine between the style
            and the identity loss gradients there:
                F_b = mean over draw chunks of ||grad_{W_b} L_S||^2
                score_b = (F_b / sum F) / (p_b / P) * (1 - |cos_b|)
  probe     (needs only the base model and counterfactual images: the same scenes without the style, and with the
            identity swapped for another subject, as a renderer such as the tiny world's makes them) per block, how
            much the block's output h_b moves when the style is taken away and when the identity is swapped, on the
            same (noise, timestep, caption) draws x:
                S_b = sum ||h_b(x) - h_b(x without the style)||^2 / sum ||h_b(x)||^2
                I_b = sum ||h_b(x) - h_b(x, another subject)||^2 / sum ||h_b(x)||^2
                score_b = (S_b / sum S) / (p_b / P) * S_b / (S_b + I_b)
            the block's share of the style's effect per share of the parameters, times how much of the block's
            movement is style rather than identity.

    params = lora.block_parameters(sd.unet, rank=8, algo="locon")
    scores = lora.choose.weight_scores(sd.unet, "identity.safetensors", "style_all.safetensors")
    blocks, spec = lora.choose_blocks(scores, params, budget=0.25, rank=8)      # spec e.g. "in0=8,out3=8"

Blocks the algorithm cannot adapt (p_b = 0: in3 and out0 with plain LoRA in SD 1.x) get no score.
"""
import re

import torch

from .blocks import BLOCKS, GROUPS, block_of
from .formats import read_adapter_file
from .layers import wrap
from .network import ALGOS, set_weight, target_paths
from .ranks import rank_table

COARSE = tuple(GROUPS)  # in0, in1, in2, in3, mid, out0, out1, out2, out3
GROUP_OF = {b: g for g, blocks in GROUPS.items() for b in blocks}  # 'IN04' -> 'in1'


# ------------------------------------------------------------------------------------ parameters and the choice

def block_parameters(unet, rank=8, algo="lora", conv_rank=None):
    """{coarse block: adapter parameters} of an adapter of this rank on every block, counted on inject's own plan
    (target_paths) with the layers' own factor shapes: down [r, in(, kh, kw)] + up [out, r(, 1, 1)]."""
    table = rank_table(rank, conv_dims=conv_rank)
    counts = dict.fromkeys(COARSE, 0)
    for path, r, _ in target_paths(unet, table, ALGOS[algo]):
        down, up = wrap(unet.get_submodule(path)).factor_shapes(r)  # a wrapper around the same weights, not kept
        counts[GROUP_OF[block_of(path)]] += torch.Size(down).numel() + torch.Size(up).numel()
    return counts


def resolve_budget(budget, params):
    """A budget in parameters: a number > 1 as it is, a fraction in (0, 1] of the all-block adapter's parameters."""
    budget = float(budget)
    if not budget > 0:
        raise ValueError(f"the budget must be > 0 (parameters, or a fraction <= 1), got {budget:g}")
    return budget * sum(params.values()) if budget <= 1 else budget


def choose_blocks(scores, params, budget, rank=8):
    """Greedy under the budget: blocks by falling score, each kept if the total still fits; blocks scoring <= 0
    only while nothing is chosen yet (the best block that fits is always chosen). -> (blocks, "in0=8,out3=8")."""
    limit, chosen, used = resolve_budget(budget, params), [], 0
    for b in sorted(scores, key=lambda b: -scores[b]):
        if params[b] and used + params[b] <= limit and (scores[b] > 0 or not chosen):
            chosen.append(b)
            used += params[b]
    if not chosen:
        smallest = min(p for p in params.values() if p)
        raise ValueError(f"no block fits a budget of {limit:.0f} parameters (the smallest block needs {smallest})")
    chosen = [b for b in COARSE if b in chosen]
    return chosen, ",".join(f"{b}={rank}" for b in chosen)


# ------------------------------------------------------------------------------- (b) weights of the trained files

def _factors(entries):
    """read_adapter_file's U-Net entries -> {module path: (scale, up [out, r], down [r, in * kh * kw])}."""
    return {path: (alpha / down.shape[0], up.float().flatten(1), down.float().flatten(1))
            for part, path, down, up, alpha in entries if part == "unet"}


def _inner(a, b):
    """<dW_a, dW_b>_F of two low-rank updates dW = s * U @ D, without forming them:
    tr((s_a U_a D_a)^T s_b U_b D_b) = s_a s_b sum((U_a^T U_b) * (D_a D_b^T))   ([r_a, r_b] matrices)."""
    (sa, ua, da), (sb, ub, db) = a, b
    return sa * sb * float(((ua.T @ ub) * (da @ db.T)).sum())


def weight_signals(unet, identity, style, text_encoder=None):
    """{block: {"update": ||dW_style|| / ||W||, "overlap": cos(dW_identity, dW_style)}} from the two files (paths)
    and the base weights, each block's modules concatenated; blocks the style file leaves alone are left out."""
    st = _factors(read_adapter_file(style, unet, text_encoder))
    ident = _factors(read_adapter_file(identity, unet, text_encoder))
    sums = {}  # block -> [||dW_s||^2, ||W||^2, ||dW_i||^2, <dW_i, dW_s>]
    for path, f in st.items():
        block = GROUP_OF.get(block_of(path))
        if block is None:
            continue
        layer = unet.get_submodule(path)
        w = layer.base_weight() if hasattr(layer, "base_weight") else layer.weight
        s = sums.setdefault(block, [0.0, 0.0, 0.0, 0.0])
        s[0] += _inner(f, f)
        s[1] += float(w.detach().float().pow(2).sum())
        if path in ident:
            s[3] += _inner(ident[path], f)
    for path, f in ident.items():  # the identity's whole update in the block, also where the style has none
        block = GROUP_OF.get(block_of(path))
        if block in sums:
            sums[block][2] += _inner(f, f)
    return {b: {"update": (s[0] / s[1]) ** 0.5 if s[1] else 0.0,
                "overlap": s[3] / (s[0] * s[2]) ** 0.5 if s[0] and s[2] else 0.0} for b, s in sums.items()}


def weight_scores(unet, identity, style, params=None, text_encoder=None):
    """{block: update * (1 - |overlap|)} (see weight_signals), 0 for blocks the style file does not adapt; with
    `params`, only the blocks that have parameters. -> (scores, signals)."""
    signals = weight_signals(unet, identity, style, text_encoder)
    blocks = [b for b in COARSE if params is None or params[b]]
    scores = {b: signals[b]["update"] * (1 - abs(signals[b]["overlap"])) if b in signals else 0.0 for b in blocks}
    return scores, signals


# -------------------------------------------------------------------------------- (a) ablation at inference

def make_draws(latents, context, n=4, seed=0, timesteps=1000):
    """Fixed (noise, timestep) draws: every image n times. latents (N, 4, h, w) scaled VAE means, context
    (N, 77, d) -> {"z0", "noise": (N n, 4, h, w), "t": (N n,), "ctx": (N n, 77, d)}, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z0 = latents.float().cpu().repeat_interleave(n, 0)  # image i's draws at rows i n .. i n + n - 1
    noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, timesteps, (len(z0),), generator=g)
    return {"z0": z0, "noise": noise, "t": t,
            "ctx": context.cpu().repeat_interleave(n, 0)}


def draw_losses(unet, alphas_cumprod, draws, chunk=16, grad=False):
    """The noise-prediction MSE of every draw, as train.py trains it:
    z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  L = ||eps - unet(z_t, t, ctx)||^2 / (C H W). -> (draws,) float32."""
    p, losses = next(unet.parameters()), []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(draws["t"]), chunk):
            z0, noise, t, ctx = (draws[k][i:i + chunk].to(p.device) for k in ("z0", "noise", "t", "ctx"))
            a = alphas_cumprod.to(p.device).float()[t][:, None, None, None]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            eps = unet(zt.to(p.dtype), t, ctx.to(p.dtype)).float()
            losses.append(((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(losses)


def denoising_loss(unet, alphas_cumprod, draws, chunk=16, grad=False):
    """draw_losses' mean: a float; with grad=True a tensor (backward through it)."""
    total = draw_losses(unet, alphas_cumprod, draws, chunk, grad).mean()
    return total if grad else float(total)


def _with_blocks(unet, name, on):
    """Per-block weights of adapter `name`: 1 in the coarse blocks `on` (and BASE, the text encoder), 0 elsewhere."""
    set_weight(unet, name, block_weights={"BASE": 1.0, **{b: 1.0 for b in on}})


def ablation_scores(unet, alphas_cumprod, style_draws, identity_draws, params, style="style", identity="identity",
                    harm_weight=1.0):
    """Keep-only and leave-one-out of adapter `style`'s blocks, next to adapter `identity` (both loaded in `unet`,
    see the module docstring). -> (scores, {"losses": {setting: [L_S, L_I]}, "benefit", "harm", "B", "se"}). The
    style adapter's block weights are left at 1.

    se_b is the score's standard error over the draws: benefit_b and harm_b are means of per-draw differences on the
    same draws, so  se_b^2 = var(benefit draws) / n_S / (|B| p_b / P)^2 + harm_weight^2 var(harm draws) / n_I / B^2,
    with the draws taken as independent and B as exact. A score within two of them of 0 is not settled by the draws
    (more images or draws per image settle it)."""
    blocks = [b for b in COARSE if params[b]]
    per_draw = {}

    def measure(title, on):
        _with_blocks(unet, style, on)
        per_draw[title] = [draw_losses(unet, alphas_cumprod, d).double().cpu() for d in (style_draws, identity_draws)]
        return per_draw[title]

    try:
        (s_all, i_all), (s_none, i_none) = measure("all", COARSE), measure("none", ())
        benefit, harm = {}, {}  # per draw
        for b in blocks:
            (s_only, i_only), (s_wo, i_wo) = measure(f"only {b}", (b,)), measure(f"all but {b}", set(COARSE) - {b})
            benefit[b] = ((s_none - s_only) + (s_wo - s_all)) / 2
            harm[b] = ((i_only - i_none) + (i_all - i_wo)) / 2
    finally:
        set_weight(unet, style, block_weights=dict.fromkeys(BLOCKS, 1.0))
    B, P = float(s_none.mean() - s_all.mean()), sum(params[b] for b in blocks)
    scale = abs(B) or 1.0
    share = {b: params[b] / P for b in blocks}
    mean = {name: {b: float(v.mean()) for b, v in per_block.items()}
            for name, per_block in (("benefit", benefit), ("harm", harm))}
    scores = {b: mean["benefit"][b] / scale / share[b] - harm_weight * mean["harm"][b] / scale for b in blocks}
    error = lambda x: float(x.var() / len(x)) if len(x) > 1 else float("nan")  # squared standard error of a mean
    se = {b: (error(benefit[b]) / (scale * share[b]) ** 2 + harm_weight ** 2 * error(harm[b]) / scale ** 2) ** 0.5
          for b in blocks}
    return scores, {"losses": {t: [float(s.mean()), float(i.mean())] for t, (s, i) in per_draw.items()},
                    **mean, "B": B, "se": se}


# ------------------------------------------------------------------------------------ (c) Fisher at the base

def fisher_scores(unet, alphas_cumprod, style_draws, identity_draws, params, algo="lora", chunks=4):
    """The Fisher score of the module docstring, at the model as it is (no adapter active: load none). The weights
    are those the adapter would touch (target_paths); their requires_grad flags are restored afterwards.
    -> (scores, {"fisher": F_b, "cos": cos_b})."""
    paths = [p for p, _, _ in target_paths(unet, rank_table(1), ALGOS[algo])]
    weights = {p: unet.get_submodule(p).weight for p in paths}
    flags = {p: w.requires_grad for p, w in weights.items()}
    blocks, chunks = [b for b in COARSE if params[b]], min(chunks, len(style_draws["t"]), len(identity_draws["t"]))

    def grads(draws, k):  # the gradient of the loss on chunk k of the draws, per block: {block: [flat grads]}
        part = {key: v[k::chunks] for key, v in draws.items()}
        g = torch.autograd.grad(denoising_loss(unet, alphas_cumprod, part, grad=True), list(weights.values()))
        out = {}
        for p, gi in zip(weights, g):
            out.setdefault(GROUP_OF[block_of(p)], []).append(gi.float().flatten())
        return {b: torch.cat(v) for b, v in out.items()}

    try:
        for w in weights.values():
            w.requires_grad_(True)
        fisher, mean_s, mean_i = dict.fromkeys(blocks, 0.0), {}, {}
        for k in range(chunks):
            gs, gi = grads(style_draws, k), grads(identity_draws, k)
            for b in blocks:
                fisher[b] += float(gs[b].pow(2).sum()) / chunks
                mean_s[b] = mean_s.get(b, 0) + gs[b] / chunks
                mean_i[b] = mean_i.get(b, 0) + gi[b] / chunks
    finally:
        for p, w in weights.items():
            w.requires_grad_(flags[p])
    cos = {b: float(torch.nn.functional.cosine_similarity(mean_s[b], mean_i[b], dim=0)) for b in blocks}
    F, P = sum(fisher.values()) or 1.0, sum(params[b] for b in blocks)
    scores = {b: fisher[b] / F / (params[b] / P) * (1 - abs(cos[b])) for b in blocks}
    return scores, {"fisher": fisher, "cos": cos}


# ------------------------------------------------------------------------------- (d) a counterfactual probe

def block_outputs(unet):
    """[(kohya block, module)] of the U-Net's blocks (input_blocks.1-11, middle_block, output_blocks.0-11): the
    modules whose outputs the probe compares."""
    top = re.compile(r"(input|output)_blocks\.\d+|middle_block")
    return [(block_of(path), m) for path, m in unet.named_modules() if top.fullmatch(path) and block_of(path) in
            GROUP_OF]


@torch.no_grad()
def probe_scores(unet, alphas_cumprod, draws, style_swapped, identity_swapped, params, chunk=16):
    """The probe score of the module docstring. The three make_draws results must share noise, timesteps and
    context (make_draws with the same n and seed does that); only their z0 differ. -> (scores, {"style": S_b,
    "identity": I_b})."""
    p = next(unet.parameters())
    sums = {k: dict.fromkeys(COARSE, 0.0) for k in ("norm", "style", "identity")}
    outputs = {}  # kohya block -> a copy of its output in the forward just run (copied: later layers may work in place)
    hooks = [m.register_forward_hook(lambda m, args, out, b=b: outputs.__setitem__(b, out.float().clone()))
             for b, m in block_outputs(unet)]

    def forward(z0, i):  # the U-Net on draws i .. i + chunk with this z0 -> {kohya block: output}
        noise, t, ctx = (draws[k][i:i + chunk].to(p.device) for k in ("noise", "t", "ctx"))
        a = alphas_cumprod.to(p.device).float()[t][:, None, None, None]
        z0 = z0[i:i + chunk].to(p.device)
        unet((a.sqrt() * z0 + (1 - a).sqrt() * noise).to(p.dtype), t, ctx.to(p.dtype))
        return dict(outputs)

    try:
        for i in range(0, len(draws["t"]), chunk):
            h = forward(draws["z0"], i)
            for b, out in h.items():
                sums["norm"][GROUP_OF[b]] += float(out.pow(2).sum())
            for key, swapped in (("style", style_swapped), ("identity", identity_swapped)):
                for b, out in forward(swapped["z0"], i).items():
                    sums[key][GROUP_OF[b]] += float((h[b] - out).pow(2).sum())
    finally:
        for hook in hooks:
            hook.remove()
    blocks = [b for b in COARSE if params[b]]
    S, I = ({b: sums[key][b] / sums["norm"][b] for b in blocks} for key in ("style", "identity"))
    total, P = sum(S.values()) or 1.0, sum(params[b] for b in blocks)
    scores = {b: S[b] / total / (params[b] / P) * (S[b] / (S[b] + I[b]) if S[b] + I[b] else 0.0) for b in blocks}
    return scores, {"style": S, "identity": I}
