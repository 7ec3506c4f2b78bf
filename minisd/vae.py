"""The SD 1.x VAE (LDM's `AutoencoderKL`), with the official parameter names.

Image (B, 3, H, W) in [-1, 1]  <->  latents (B, z, H/f, W/f), f = 2 ** (len(ch_mult) - 1).
The diffusion model works on latents * scale_factor (0.18215 for SD 1.x).
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are scaled by this before the U-Net sees them

    @property
    def downscale(self):
        return 2 ** (len(self.ch_mult) - 1)


def Norm(cfg, c):
    return nn.GroupNorm(cfg.norm_groups, c, eps=1e-6)  # eps 1e-6 everywhere in the VAE


class ResnetBlock(nn.Module):
    def __init__(self, cfg, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Norm(cfg, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Norm(cfg, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 omitted)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, cfg, c):
        super().__init__()
        self.norm = Norm(cfg, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # the 1x1 convs as matmuls over pixels: q, k, v come out with unit stride along C, which SDPA's fused kernels
        # need (else it falls back to the math path, which stores the HW x HW attention matrix)
        q, k, v = (F.linear(h, m.weight.flatten(1), m.bias)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, cfg, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(cfg, c, c), AttnBlock(cfg, c), ResnetBlock(cfg, c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(cfg, chans[i] if j == 0 else chans[i + 1], chans[i + 1])
                                         for j in range(cfg.num_res_blocks)])
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(chans[i + 1])
            self.down.append(level)
        self.mid = Mid(cfg, chans[-1])
        self.norm_out = Norm(cfg, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(cfg, chans[-1])
        # up.i is indexed by resolution like the encoder's down.i: up.3 runs first, up.0 last.
        self.up = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            cin = chans[min(i + 1, len(chans) - 1)]
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(cfg, cin if j == 0 else chans[i], chans[i])
                                         for j in range(cfg.num_res_blocks + 1)])
            if i != 0:
                level.upsample = Upsample(chans[i])
            self.up.append(level)
        self.norm_out = Norm(cfg, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """Image in [-1, 1] -> (mean, logvar) of the latent Gaussian, unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latents -> image in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))
