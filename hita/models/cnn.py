"""Convolutional encoder and decoder of the Hita tokenizer (LlamaGen "VQ-16" layout).

The pixel side of Hita is LlamaGen's VQ-16 CNN, unchanged apart from ``z_channels``: an encoder that
downsamples by ``2 ** (len(ch_mult) - 1)`` (336 -> 21 for the released models) and a mirror-image
decoder. Module and parameter names follow spec sections 2.1/2.2 exactly (``conv_blocks.{i}.res.{j}``,
``.attn.{j}``, ``.downsample.conv``, ``.upsample.conv``, ``mid.{0,1,2}``, ``norm_out``, ``conv_out``)
so released checkpoints load without renaming.

Layout facts (spec 1.3 / 1.5):
- every norm is GroupNorm(32 groups, eps 1e-6, affine); every conv has a bias;
- attention blocks exist only at the deepest level (last encoder level, first decoder block);
- the decoder runs deepest level first with ``num_res_blocks + 1`` res blocks per level and no
  upsample after its last block.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hita.config import TokenizerConfig


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as used by every CNN norm of the VQ-16 layout."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3, GN, swish, dropout, conv3x3, plus a skip (1x1 ``nin_shortcut`` when the
    channel count changes, identity otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A parameter-free Identity when the width is kept: the 1x1 conv's presence is part of the
        # checkpoint key set, so it must exist exactly where the reference has one.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:  # x: (B, Cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with 1x1-conv q/k/v and
    output projection and a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, H*W, C): one head of width C
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        # softmax(q k^T / sqrt(C)) v; SDPA's default scale is exactly 1/sqrt(C) for one head of width C.
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one pixel, then a 3x3 stride-2 conv with no padding
    (the asymmetric pad keeps 2n -> n exact, as in the reference)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Res blocks of one resolution level, each followed by an attention block at the deepest level
    only (elsewhere ``attn`` is an empty list and adds no keys)."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, with_attn: bool, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout) for j in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_res if with_attn else 0))

    def blocks(self, x: Tensor) -> Tensor:
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class EncoderLevel(_Level):
    """Encoder level: res/attn blocks, then ``downsample`` (Identity, no keys, on the last level)."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, last: bool, dropout: float):
        super().__init__(in_ch, out_ch, n_res, with_attn=last, dropout=dropout)
        self.downsample = nn.Identity() if last else Downsample(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.blocks(x))


class DecoderLevel(_Level):
    """Decoder level: res/attn blocks, then ``upsample`` (Identity, no keys, on the last block)."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, first: bool, last: bool, dropout: float):
        super().__init__(in_ch, out_ch, n_res, with_attn=first, dropout=dropout)
        self.upsample = nn.Identity() if last else Upsample(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.blocks(x))


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    """Bottleneck ``mid.{0,1,2}`` = Res, Attn, Res at the deepest width."""
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> feature map (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, cfg: TokenizerConfig, dropout: float = 0.0):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n_levels = len(widths)
        self.conv_in = nn.Conv2d(3, cfg.ch, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            self.conv_blocks.append(
                EncoderLevel(in_ch, out_ch, cfg.num_res_blocks, last=i == n_levels - 1, dropout=dropout)
            )
            in_ch = out_ch
        self.mid = _mid(in_ch, dropout)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 3, H, W)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level(h)  # ... -> (B, ch*ch_mult[-1], H/f, W/f)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Feature map (B, z_channels, g, g) -> image (B, 3, g*f, g*f), unbounded (callers clamp).

    ``conv_blocks.k`` is resolution level ``L = len(ch_mult) - 1 - k`` (deepest first)."""

    def __init__(self, cfg: TokenizerConfig, dropout: float = 0.0):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n_levels = len(widths)
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, kernel_size=3, padding=1)
        self.mid = _mid(in_ch, dropout)
        self.conv_blocks = nn.ModuleList()
        for k in range(n_levels):
            out_ch = widths[n_levels - 1 - k]
            self.conv_blocks.append(DecoderLevel(
                in_ch, out_ch, cfg.num_res_blocks + 1, first=k == 0, last=k == n_levels - 1, dropout=dropout
            ))
            in_ch = out_ch
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # z: (B, z_channels, g, g)
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], g, g)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)  # ... -> (B, ch*ch_mult[0], g*f, g*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, g*f, g*f)
