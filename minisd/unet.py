"""The Stable Diffusion 1.x U-Net (LDM's `UNetModel`), with the official parameter names.

Every module name below is the one in CompVis' checkpoint, so
`unet.load_state_dict({k.removeprefix("model.diffusion_model."): v ...})` just works.

    input_blocks.0            conv_in
    input_blocks.1..11        (ResBlock [+ SpatialTransformer]) x num_res_blocks, then Downsample, per level
    middle_block              ResBlock, SpatialTransformer, ResBlock
    output_blocks.0..11       (ResBlock [+ SpatialTransformer]) x (num_res_blocks + 1) [+ Upsample], per level
    out                       GroupNorm, SiLU, conv_out
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels that carry a SpatialTransformer
    num_heads: int = 8  # SD 1.x: a fixed head count; head width = channels // 8
    context_dim: int = 768
    norm_groups: int = 32


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim); cos first, then sin (LDM order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        # GroupNorm eps 1e-5 (PyTorch's default) in ResBlocks; the transformers and the VAE use 1e-6.
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


def attention(q, k, v, heads):
    """Multi-head scaled dot-product attention: q (B, N, C), k and v (B, M, C) -> (B, N, C)."""
    B, N, C = q.shape
    q, k, v = (t.view(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, tokens, head_dim)
    h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
    return h.transpose(1, 2).reshape(B, N, C)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


def geglu(a, gate):
    """The gated GELU of the feed-forward: a * gelu(gate) (exact, erf GELU)."""
    return a * F.gelu(gate)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        return geglu(*self.proj(x).chunk(2, dim=-1))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)  # cross-attention to the text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, context_dim, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)  # SD 1.x: 1x1 convs, not Linear (that is SD 2.x)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


def upsample(x):
    """Nearest-neighbour 2x upsampling (before the Upsample block's 3x3 convolution)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(upsample(x))


class TimestepEmbedSequential(nn.Sequential):
    """A block: passes the time embedding to ResBlocks and the text context to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # recompute each block's activations in the backward pass
        mc, g, heads, ctx = cfg.model_channels, cfg.norm_groups, cfg.num_heads, cfg.context_dim
        emb_dim = 4 * mc
        res = lambda cin, cout: ResBlock(cin, cout, emb_dim, g)
        attn = lambda c: SpatialTransformer(c, ctx, heads, g)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context):
        """x (B, 4, h, w) latents, t (B,) or scalar integer timesteps, context (B, 77, context_dim)
        -> eps (B, 4, h, w)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.embed_time(t, x.dtype)
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else (lambda b, *a: b(*a))
        hs, h = [], x
        for block in self.input_blocks:
            h = run(block, h, emb, context)
            hs.append(h)
        h = run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def embed_time(self, t, dtype):
        """Integer timesteps t (B,) -> the time embedding (B, 4 * model_channels) that every ResBlock reads."""
        return self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))

    @staticmethod
    def _checkpointed(block, *args):
        # the U-Net draws no random numbers (dropout 0): no RNG state to save and restore, which also lets a
        # checkpointed step be captured in a CUDA graph (minisd.fast.TrainStepGraph)
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
