"""Frozen DINOv2 ViT-L/14 with 4 registers: the Hita tokenizer's vision-foundation-model branch.

Written from the published architecture (spec 1.3 step 2, key list in spec 2.2), not from the DINOv2
code: parameter names match the official ``dinov2_vitl14_reg4_pretrain.pth`` so that file loads
strictly. Weights come only from a local file given by the user (``load_dinov2``); nothing here
downloads anything.

Architecture facts:
- patch embedding: conv 14x14 stride 14, 3 -> 1024; learned ``pos_embed`` for a 37x37 grid plus CLS
  (518 px training size), bicubic-resized (antialiased, to the exact target grid) for other inputs;
- tokens = [CLS ; 4 registers ; patches]; registers get no position embedding;
- 24 pre-norm blocks (LayerNorm eps 1e-6, 16 heads, GELU MLP x4, LayerScale on both branches);
- a final LayerNorm.

``DinoV2Features`` is the wrapper Hita calls: resize to 224, clamp, map [-1, 1] -> ImageNet-normalised,
run without gradients in eval mode, return [CLS ; patch tokens] after the final norm.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, H/p * W/p, dim), raster order."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (rows ordered q, k, v) and ``proj``."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, dim)
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned scale ``gamma`` on a residual branch."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, n_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------
# Vision transformer
# ----------------------------------------------------------------------------------------------


class DinoV2(nn.Module):
    """DINOv2-style ViT with register tokens. Defaults are ViT-L/14-reg4 (304,372,736 parameters);
    the other sizes exist so tests can run the same code on a toy model."""

    def __init__(self, dim: int = 1024, depth: int = 24, n_heads: int = 16, patch_size: int = 14,
                 base_grid: int = 37, n_registers: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.dim = dim
        self.n_registers = n_registers
        self.base_grid = base_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + base_grid * base_grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, dim))
        # Used only by DINOv2's masked-image training objective; kept so the official file loads strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Random init only matters for tests; real use loads the official weights over it.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """(1, 1 + grid_h*grid_w, dim): CLS position plus the patch grid resized from base_grid.

        Resize rule of the register variants: bicubic to the exact target size, antialiased,
        align_corners False, computed in float32."""
        if grid_h == grid_w == self.base_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.base_grid
        patch_pos = patch_pos.float().reshape(1, g, g, self.dim).permute(0, 3, 1, 2)  # (1, dim, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=True,
                                  align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, self.dim)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised image -> final-normed tokens (B, 1 + R + N, dim): [CLS ; regs ; patches]."""
        p = self.patch_embed.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)  # (B, N, dim)
        b = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[-2] // p, x.shape[-1] // p)
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def dinov2_vitl14_reg4() -> DinoV2:
    """The ViT-L/14-reg4 architecture Hita uses, randomly initialised (load weights over it)."""
    return DinoV2(dim=1024, depth=24, n_heads=16, patch_size=14, base_grid=37, n_registers=4)


BACKBONES = {"dinov2_vitl14_reg4": dinov2_vitl14_reg4}


def load_dinov2(path: str | os.PathLike, name: str = "dinov2_vitl14_reg4") -> DinoV2:
    """Build ``name`` and load a local weights file (official ``.pth`` state dict or safetensors),
    strictly. Parameters are created on the meta device first, so no time is spent on a random init."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights {path!r} not found; download dinov2_vitl14_reg4_pretrain.pth from the "
            "DINOv2 release yourself and pass its local path"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path!r} is not a plain state dict of tensors (expected the official DINOv2 file)")
    with torch.device("meta"):
        model = BACKBONES[name]()
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not hold {name} weights: {e}") from None
    return model


# ----------------------------------------------------------------------------------------------
# Hita's wrapper
# ----------------------------------------------------------------------------------------------


def _gaussian_kernel1d(size: int, sigma: float, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    k = torch.exp(-x.pow(2) / (2.0 * sigma * sigma))
    return k / k.sum()


def antialiased_resize(x: Tensor, size: int) -> Tensor:
    """Square bicubic resize (align_corners=True) with a Gaussian pre-blur when downscaling.

    Reproduces what the reference gets from ``kornia.geometry.resize(bicubic, align_corners=True,
    antialias=True)``: for a downscale factor f per axis, sigma = max((f - 1) / 2, 0.001), an odd
    kernel of size max(int(4 * sigma), 3), a separable normalised Gaussian with reflect borders, then
    plain ``F.interpolate``. For 336 -> 224 (f = 1.5) that is a 3x3 Gaussian with sigma 0.25. This is
    kornia's approximation of antialiasing, not torch's ``antialias=True`` resampling; the two differ.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    factors = (h / size, w / size)
    if max(factors) > 1.0:
        sig = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        ks = [max(int(4.0 * s), 3) for s in sig]
        ks = [k + 1 if k % 2 == 0 else k for k in ks]
        c = x.shape[1]
        ky = _gaussian_kernel1d(ks[0], sig[0], x).view(1, 1, -1, 1).expand(c, 1, -1, 1)
        kx = _gaussian_kernel1d(ks[1], sig[1], x).view(1, 1, 1, -1).expand(c, 1, 1, -1)
        x = F.pad(x, (ks[1] // 2, ks[1] // 2, ks[0] // 2, ks[0] // 2), mode="reflect")
        x = F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)  # horizontal, then vertical pass
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)


class DinoV2Features(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> frozen DINOv2 tokens (B, 1 + N, dim) = [CLS ; patches].

    Always eval and gradient-free: the backbone is a fixed feature extractor whose patch tokens are
    both an encoder input and the Hita-U reconstruction target. Registers are dropped."""

    def __init__(self, vit: DinoV2, image_size: int = 224):
        super().__init__()
        self.image_size = image_size
        self.pretrained_encoder = vit.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "DinoV2Features":
        # Frozen feature extractor: stays in eval whatever the parent's mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = antialiased_resize(images, self.image_size).clamp(-1.0, 1.0)
        x = ((x + 1.0) / 2.0 - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # ImageNet-normalised
        tokens = self.pretrained_encoder.forward_features(x)  # (B, 1 + R + N, dim)
        r = self.pretrained_encoder.n_registers
        return torch.cat([tokens[:, :1], tokens[:, 1 + r:]], dim=1)  # (B, 1 + N, dim)
