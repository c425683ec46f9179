"""Discriminators of the tokenizer recipes (spec 6.1): PatchGAN for Hita-V, DINO heads for Hita-U.

* ``PatchGAN``: pix2pix NLayer discriminator (ndf 64, 3 layers, BatchNorm, 4×4 convs), input [-1, 1],
  output a map of logits [B, 1, h, w].
* ``DinoDiscriminator``: a frozen DINO ViT-S/16 read at its patch embedding and after blocks 2, 5, 8,
  11 (each patch token plus the CLS token), and five trainable heads (spectral-norm Conv1d k1,
  BatchNormLocal over virtual batches of 8, LeakyReLU, a residual spectral-norm Conv1d k9 block with
  circular padding scaled by 1/√2, then a spectral-norm Conv1d to one channel). Logits [B, ΣN].
  The ViT weights come from a local file (DINO's ``dino_deitsmall16_pretrain.pth`` key names);
  only the heads are trained and saved.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# PatchGAN
# ----------------------------------------------------------------------------------------------


class PatchGAN(nn.Module):
    """NLayer PatchGAN: conv-s2 + LReLU, (n_layers − 1) × [conv-s2, BN, LReLU], conv-s1, BN, LReLU, conv → 1."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1]
        return self.main(x)  # (B, 1, h, w)


# ----------------------------------------------------------------------------------------------
# Frozen DINO ViT (v1) feature extractor
# ----------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, dim)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).flatten(2))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """DINO ViT (v1) with timm / DINO key names; ``features`` returns the hooked token sequences."""

    def __init__(self, dim: int = 384, depth: int = 12, n_heads: int = 6, patch_size: int = 16, image_size: int = 224):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(_Block(dim, n_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # present in the weights; the hooks read before it

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DinoViT":
        """Build from a DINO checkpoint; width and depth follow the file, heads = width / 64."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such DINO ViT weights file; pass dino_deitsmall16_pretrain.pth")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        for entry in ("teacher", "model", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(entry), dict):
                sd = sd[entry]
        for prefix in ("module.", "backbone."):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("head")}
        if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
            raise ValueError(f"{path}: not a DINO ViT state dict (no cls_token / patch_embed); pass the DINO ViT-S/16 file")
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        side = math.isqrt(sd["pos_embed"].shape[1] - 1)
        model = cls(dim, depth, max(1, dim // 64), patch, side * patch)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: DINO ViT weights do not fit ({str(e).splitlines()[0]})") from None
        with torch.no_grad():  # zero the key bias: softmax is invariant to it (as the reference does)
            for blk in model.blocks:
                blk.attn.qkv.bias[dim:2 * dim] = 0.0
        return model.requires_grad_(False).eval()

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        pe = self.pos_embed
        side = math.isqrt(pe.shape[1] - 1)
        if (gh, gw) == (side, side):
            return pe
        grid = pe[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def features(self, x: Tensor, hooks: tuple[int, ...]) -> list[Tensor]:
        """Token sequences [B, 1+N, dim] after the patch embedding and after each block in ``hooks``."""
        p = self.patch_embed.proj(x)  # (B, dim, gh, gw)
        gh, gw = p.shape[-2:]
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), p.flatten(2).transpose(1, 2)], dim=1)
        t = t + self._pos_embed(gh, gw)
        out = [t]
        for i, blk in enumerate(self.blocks[: max(hooks) + 1]):
            t = blk(t)
            if i in hooks:
                out.append(t)
        return out


# ----------------------------------------------------------------------------------------------
# DINO discriminator heads
# ----------------------------------------------------------------------------------------------


class BatchNormLocal(nn.Module):
    """Batch norm over groups of ``virtual_bs`` samples (statistics over batch-in-group and length)."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L)
        groups = math.ceil(x.shape[0] / self.virtual_bs)
        if x.shape[0] % groups:
            raise ValueError(f"BatchNormLocal: batch {x.shape[0]} does not split into {groups} equal groups; "
                             f"use a per-process batch that is a multiple of {self.virtual_bs} or at most it")
        g = x.view(groups, -1, *x.shape[1:])  # (G, B/G, C, L)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) / torch.sqrt(var + self.eps)
        return g.view_as(x) * self.weight[None, :, None] + self.bias[None, :, None]


def _sn_conv(c_in: int, c_out: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular"))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class DiscHead(nn.Module):
    def __init__(self, channels: int, virtual_bs: int = 8):
        super().__init__()

        def block(k: int) -> nn.Sequential:
            return nn.Sequential(_sn_conv(channels, channels, k), BatchNormLocal(channels, virtual_bs), nn.LeakyReLU(0.2))

        self.main = nn.Sequential(block(1), _Residual(block(9)))
        self.cls = _sn_conv(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N)
        return self.cls(self.main(x))  # (B, 1, N)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT + trainable heads. Input [-1, 1]; logits [B, Σ tokens over the 5 hooks].

    Images larger than ``input_size`` are randomly cropped to it with probability ``p_crop`` (one crop
    per call, drawn from torch's global RNG) and otherwise area-resized; other sizes are resized.
    The ViT is held outside the module tree: it is neither trained, nor saved, nor averaged.
    """

    HOOKS = (2, 5, 8, 11)

    def __init__(self, vit: DinoViT, input_size: int = 224, p_crop: float = 0.5, virtual_bs: int = 8):
        super().__init__()
        if len(vit.blocks) <= max(self.HOOKS):
            raise ValueError(f"the DINO ViT has {len(vit.blocks)} blocks; the discriminator reads block {max(self.HOOKS)}")
        self._vit = [vit.requires_grad_(False).eval()]  # a list: not a submodule
        self.input_size, self.p_crop = input_size, p_crop
        self.heads = nn.ModuleList(DiscHead(vit.dim, virtual_bs) for _ in range(len(self.HOOKS) + 1))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def vit(self) -> DinoViT:
        return self._vit[0]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._vit[0] = self._vit[0]._apply(fn)
        return self

    def _prepare(self, x: Tensor) -> Tensor:
        x = (x.float() + 1.0) / 2.0  # [0, 1]
        s = self.input_size
        if x.shape[-1] > s and torch.rand(()) < self.p_crop:
            top = int(torch.randint(0, x.shape[-2] - s + 1, ()))
            left = int(torch.randint(0, x.shape[-1] - s + 1, ()))
            x = x[..., top:top + s, left:left + s]
        elif x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="area")
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        feats = self.vit.features(self._prepare(x), self.HOOKS)
        logits = []
        for f, head in zip(feats, self.heads, strict=True):
            tokens = (f[:, 1:] + f[:, :1]).transpose(1, 2)  # (B, dim, N): patch tokens + CLS readout
            logits.append(head(tokens).flatten(1))  # (B, N)
        return torch.cat(logits, dim=1)
