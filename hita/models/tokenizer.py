"""Hita image tokenizer: image <-> (holistic tokens, patch tokens), spec sections 1-3.

Encode (spec 1.3): CNN encoder -> 21x21 feature map; optional frozen DINOv2 tokens projected to the
transformer width; ``encode_transformer`` mixes learned carrier tokens with them (full attention),
then a causal transformer over [carriers ; patches]; two cosine VQs give 128 holistic + 441 patch ids.

Decode (spec 1.5): both codebooks (l2-normalised rows) -> post projections -> ``decode_transformer``, a
causal "fusion" transformer over [holistic ; patch], read ``shift_k`` positions early -> CNN decoder.
Because of the shift, the last ``shift_k`` patch tokens never reach the pixels (spec 8.3).

State-dict keys and registration order match the released checkpoints (spec 2). The DINOv2 backbone is
not part of them: it is attached on demand by ``load_backbone(path)``, its keys are dropped from
``state_dict()`` and tolerated as missing/unexpected by ``load_state_dict``. Decoding never needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hita.config import TokenizerConfig
from hita.models.cnn import Decoder, Encoder
from hita.models.dinov2 import DinoV2, DinoV2Features, load_dinov2
from hita.models.transformer import Transformer
from hita.models.vq import QuantizerOutput, VectorQuantizer

BACKBONE = "backbone"  # every state-dict key containing this substring belongs to the frozen DINOv2


@dataclass
class TokenizerOutput:
    """Result of ``HitaTokenizer.reconstruct``.

    recon: (B, 3, H, W) unclamped reconstruction. quant_loss: scalar, vq + commit of both quantisers
    (the entropy term has weight 0 in every released recipe and is not computed). vfm_loss: scalar
    ``mean(1 - cos)`` of the Hita-U feature head, None without it. holistic_ids (B, Nh) and
    patch_ids (B, Np): int64 token ids."""

    recon: Tensor
    quant_loss: Tensor
    vfm_loss: Tensor | None
    holistic_ids: Tensor
    patch_ids: Tensor


def _learned(*shape: int) -> nn.Parameter:
    """Learned token / position table, N(0, 0.02). The reference's exact init is not part of the
    contract (only trained weights are); this is the usual ViT choice."""
    return nn.Parameter(torch.randn(*shape) * 0.02)


def _transformer(cfg: TokenizerConfig, attention: str) -> Transformer:
    return Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden, cfg.dropout, attention)


def _to_map(tokens: Tensor, grid: int) -> Tensor:  # (B, g*g, C) raster order -> (B, C, g, g)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)


def _to_tokens(fmap: Tensor) -> Tensor:  # (B, C, g, g) -> (B, g*g, C) raster order
    return fmap.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Holistic encoder (`encode_transformer`)
# ----------------------------------------------------------------------------------------------


class ProjMLP(nn.Module):
    """DINOv2 width -> transformer width: Linear(no bias), LN, ReLU, Linear(no bias), LN (``proj.mlp``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(),
            nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class EncodeTransformer(nn.Module):
    """CNN features (+ DINOv2 tokens) -> (patch features, holistic slots).

    transformer1 attends fully over [carriers ; DINOv2 tokens ; patches] (no DINOv2 part without a
    backbone); the DINOv2 outputs are dropped; transformer2 is causal over [carriers ; patches], so
    holistic tokens see only earlier holistic tokens and patch i sees all holistic + patches <= i."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.n_holistic, self.n_patch, self.grid = cfg.n_holistic, cfg.n_patch, cfg.grid
        self.carrier_tokens = _learned(1, cfg.n_holistic, cfg.dim)
        self.pos_embed = _learned(1, cfg.n_patch, cfg.dim)
        if cfg.backbone is not None:
            self.proj = ProjMLP(cfg.backbone_dim, cfg.dim)
        self.norm_pre1 = nn.LayerNorm(cfg.dim)
        self.transformer1 = _transformer(cfg, "cross")
        self.norm_pre2 = nn.LayerNorm(cfg.dim)
        self.transformer2 = _transformer(cfg, "attention3")
        # Placeholder slot: filled by HitaTokenizer.attach_backbone, never saved.
        self.register_module(BACKBONE, None)

    def forward(self, h: Tensor, vfm_tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        """h: (B, C, g, g); vfm_tokens: (B, 1 + N, backbone_dim) or None.
        Returns z (B, C, g, g) and slots (B, Nh, C)."""
        b = h.shape[0]
        parts = [self.carrier_tokens.expand(b, -1, -1)]  # (B, Nh, C)
        if vfm_tokens is not None:
            parts.append(self.proj(vfm_tokens))  # (B, 1 + N, C)
        parts.append(_to_tokens(h) + self.pos_embed)  # (B, Np, C)
        x = self.transformer1(self.norm_pre1(torch.cat(parts, dim=1)))
        x = torch.cat([x[:, : self.n_holistic], x[:, -self.n_patch:]], dim=1)  # (B, Nh + Np, C)
        x = self.transformer2(self.norm_pre2(x))  # causal (mask None)
        return _to_map(x[:, self.n_holistic:], self.grid), x[:, : self.n_holistic]


# ----------------------------------------------------------------------------------------------
# Fusion decoder (`decode_transformer`)
# ----------------------------------------------------------------------------------------------


class DecodeTransformer(nn.Module):
    """Causal fusion of projected holistic and patch codes -> the CNN decoder's input map.

    Output cell j is sequence position ``Nh - shift_k + j``: cells 0..shift_k-1 come from the last
    holistic positions and cell j >= shift_k from patch token j - shift_k (which sees every holistic
    token and patches 0..j-shift_k, not patch j itself). Hita-U adds a feature head (``vfm``)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.n_holistic, self.n_patch, self.grid = cfg.n_holistic, cfg.n_patch, cfg.grid
        self.shift_k, self.vfm_grid = cfg.shift_k, cfg.vfm_grid
        self.position_embedding = _learned(1, cfg.n_patch, cfg.dim)
        self.slot_position_embedding = _learned(1, cfg.n_holistic, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.transformer = _transformer(cfg, "attention3")
        if cfg.vfm_recon:
            self.mask_embedding = _learned(1, 1, cfg.dim)
            self.norm_vfm = nn.LayerNorm(cfg.dim)
            self.proj = nn.Linear(cfg.dim, cfg.backbone_dim)
        # The reference Xavier-initialises this module's linears (and, by a bug, not the encoder's).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, slots: Tensor, h: Tensor) -> Tensor:
        """slots: (B, Nh, C) projected holistic codes; h: (B, C, g, g) projected patch codes.
        Returns the fused map (B, C, g, g)."""
        x = torch.cat([slots + self.slot_position_embedding, _to_tokens(h) + self.position_embedding], dim=1)
        x = self.transformer(self.norm(x))  # causal over Nh + Np positions (mask None)
        start = self.n_holistic - self.shift_k
        return _to_map(x[:, start: start + self.n_patch], self.grid)  # (B, C, g, g)

    def vfm_queries(self) -> Tensor:
        """(1, vfm_grid**2, C): the patch position table bicubic-resized to vfm_grid x vfm_grid, plus
        ``mask_embedding``. The resize passes scale_factor (vfm_grid + 0.1) / grid (16.1/21) as the
        reference does, so sample coordinates follow that factor, not vfm_grid / grid."""
        g, c = self.grid, self.position_embedding.shape[-1]
        pos = self.position_embedding.reshape(1, g, g, c).permute(0, 3, 1, 2)  # (1, C, g, g)
        pos = F.interpolate(pos, scale_factor=(self.vfm_grid + 0.1) / g, mode="bicubic", align_corners=False)
        if pos.shape[-1] != self.vfm_grid:
            raise ValueError(f"VFM query grid came out {pos.shape[-1]}, expected {self.vfm_grid}")
        return _to_tokens(pos) + self.mask_embedding

    def vfm(self, slots: Tensor) -> Tensor:
        """Hita-U head (spec 1.6): slots (B, Nh, C), without slot positions -> (B, vfm_grid**2, backbone_dim).

        Runs the same (shared-weight) transformer over [slots ; queries] after ``norm_vfm``."""
        queries = self.vfm_queries()  # (1, Nq, C)
        x = torch.cat([slots, queries.expand(slots.shape[0], -1, -1)], dim=1)  # (B, Nh + Nq, C)
        n = x.shape[1]
        # True = may attend: holistic rows causal (so never see queries); query rows see everything.
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask[self.n_holistic:] = True
        x = self.transformer(self.norm_vfm(x), mask)
        return self.proj(x[:, self.n_holistic:])  # (B, Nq, backbone_dim)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class HitaTokenizer(nn.Module):
    """Hita tokenizer (Hita-V / Hita-U / small presets). Submodules in the reference's registration
    order (spec 1.2), which is also the state-dict key order."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.encode_transformer = EncodeTransformer(cfg)
        self.decode_transformer = DecodeTransformer(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.patch_code_dim, cfg.commit_beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.patch_code_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.patch_code_dim, cfg.z_channels, kernel_size=1)
        self.slot_quantize = VectorQuantizer(cfg.codebook_size, cfg.holistic_code_dim, cfg.commit_beta)
        self.pre_slots_quant = nn.Linear(cfg.dim, cfg.holistic_code_dim)
        self.post_slots_quant = nn.Linear(cfg.holistic_code_dim, cfg.dim)
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_ignore_backbone_keys)

    # -- backbone ---------------------------------------------------------------------------------

    @property
    def backbone(self) -> DinoV2Features | None:
        return self.encode_transformer.backbone

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Attach the frozen DINOv2 from a local weights file (``dinov2_vitl14_reg4_pretrain.pth``)."""
        if self.cfg.backbone is None:
            raise ValueError(f"tokenizer preset {self.cfg.name!r} has no backbone; nothing to load")
        self.attach_backbone(load_dinov2(path, self.cfg.backbone))

    def attach_backbone(self, vit: DinoV2) -> None:
        """Attach an already-built ViT as the frozen backbone (moved to this model's device/dtype)."""
        if self.cfg.backbone is None:
            raise ValueError(f"tokenizer preset {self.cfg.name!r} has no backbone")
        if vit.dim != self.cfg.backbone_dim:
            raise ValueError(f"backbone width {vit.dim} != config backbone_dim {self.cfg.backbone_dim}")
        ref = self.encode_transformer.carrier_tokens
        self.encode_transformer.backbone = DinoV2Features(vit, self.cfg.backbone_image_size).to(
            device=ref.device, dtype=ref.dtype
        )

    def init_nonpersistent_buffers(self, device: torch.device) -> None:
        """Rebuild non-persistent buffers on ``device`` (used after a meta-device load). Only an
        attached backbone has any (ImageNet mean/std); the saved modules have none."""
        if self.backbone is not None:
            vit = self.backbone.pretrained_encoder
            self.encode_transformer.backbone = DinoV2Features(vit, self.cfg.backbone_image_size).to(device)

    def _backbone_tokens(self, images: Tensor) -> Tensor | None:
        if self.cfg.backbone is None:
            return None
        if self.backbone is None:
            raise RuntimeError(
                f"tokenizer {self.cfg.name!r} encodes with a frozen {self.cfg.backbone} backbone that is "
                "not loaded; call load_backbone(path_to_local_weights) first (decoding does not need it)"
            )
        return self.backbone(images)  # (B, 1 + N, backbone_dim), no grad

    # -- encode -----------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        s = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}) in [-1, 1], got {tuple(images.shape)}")

    def encode_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """images (B, 3, H, W) in [-1, 1] -> z (B, C, g, g), slots (B, Nh, C), backbone tokens or None."""
        self._check_images(images)
        vfm_tokens = self._backbone_tokens(images)
        z, slots = self.encode_transformer(self.encoder(images), vfm_tokens)
        return z, slots, vfm_tokens

    def quantize_features(self, z: Tensor, slots: Tensor) -> tuple[QuantizerOutput, QuantizerOutput]:
        """z (B, C, g, g), slots (B, Nh, C) -> (patch VQ output, holistic VQ output).

        Patch: zq (B, e, g, g), ids (B, g*g) raster order. Holistic: zq (B, Nh, eh), ids (B, Nh)."""
        p = self.quantize(self.quant_conv(z).permute(0, 2, 3, 1))  # channel-last (B, g, g, e)
        p = p._replace(zq=p.zq.permute(0, 3, 1, 2), indices=p.indices.flatten(1))
        s = self.slot_quantize(self.pre_slots_quant(slots))  # (B, Nh, eh)
        return p, s

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> holistic_ids (B, Nh) int64, patch_ids (B, Np) int64."""
        z, slots, _ = self.encode_features(images)
        p, s = self.quantize_features(z, slots)
        return s.indices, p.indices

    # -- decode -----------------------------------------------------------------------------------

    def lookup(self, holistic_ids: Tensor, patch_ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids -> unit-norm codes: holistic (B, Nh, eh), patch (B, e, g, g)."""
        cfg = self.cfg
        if holistic_ids.dim() != 2 or holistic_ids.shape[1] != cfg.n_holistic:
            raise ValueError(f"holistic_ids must be (B, {cfg.n_holistic}), got {tuple(holistic_ids.shape)}")
        if patch_ids.shape != (holistic_ids.shape[0], cfg.n_patch):
            raise ValueError(f"patch_ids must be (B, {cfg.n_patch}) with the holistic batch size, "
                             f"got {tuple(patch_ids.shape)}")
        patch = self.quantize.lookup(patch_ids).view(-1, cfg.grid, cfg.grid, cfg.patch_code_dim)
        return self.slot_quantize.lookup(holistic_ids), patch.permute(0, 3, 1, 2)

    def fuse_codes(self, holistic_codes: Tensor, patch_codes: Tensor) -> Tensor:
        """Unit-norm codes -> fused map (B, C, g, g), the CNN decoder's input."""
        return self.decode_transformer(self.post_slots_quant(holistic_codes), self.post_quant_conv(patch_codes))

    def fuse(self, holistic_ids: Tensor, patch_ids: Tensor) -> Tensor:
        """Token ids -> fused map (B, C, g, g); exposed so the shift_k causality can be probed."""
        return self.fuse_codes(*self.lookup(holistic_ids, patch_ids))

    def decode(self, holistic_ids: Tensor, patch_ids: Tensor) -> Tensor:
        """holistic_ids (B, Nh), patch_ids (B, Np) int64 -> float32 images (B, 3, H, W), unclamped."""
        return self.decoder(self.fuse(holistic_ids, patch_ids)).float()

    # -- training forward -------------------------------------------------------------------------

    def reconstruct(self, images: Tensor) -> TokenizerOutput:
        """Encode, quantise (straight-through) and decode ``images``; also the training loss terms."""
        z, slots, vfm_tokens = self.encode_features(images)
        p, s = self.quantize_features(z, slots)
        holistic = self.post_slots_quant(s.zq)  # (B, Nh, C)
        recon = self.decoder(self.decode_transformer(holistic, self.post_quant_conv(p.zq)))
        quant_loss = p.vq_loss + p.commit_loss + s.vq_loss + s.commit_loss
        vfm_loss = None
        if self.cfg.vfm_recon:
            pred = self.decode_transformer.vfm(holistic)  # (B, Nq, backbone_dim)
            target = vfm_tokens[:, 1:]  # DINOv2 patch tokens, (B, N, backbone_dim)
            if pred.shape != target.shape:
                raise ValueError(f"VFM head predicts {tuple(pred.shape)} but the backbone gives "
                                 f"{tuple(target.shape)}; vfm_grid must equal the backbone's patch grid")
            vfm_loss = (1.0 - F.cosine_similarity(pred, target.to(pred.dtype), dim=-1, eps=1e-6)).mean()
        return TokenizerOutput(recon, quant_loss, vfm_loss, s.indices, p.indices)


# ----------------------------------------------------------------------------------------------
# Checkpoint hooks: the backbone never enters a Hita checkpoint (spec 2.2, 3)
# ----------------------------------------------------------------------------------------------


def _drop_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and BACKBONE in k[len(prefix):]]:
        del state_dict[key]


def _ignore_backbone_keys(module: nn.Module, incompatible_keys) -> None:
    # Released files carry no backbone weights, so an attached backbone reports them missing; a file that
    # does carry them (someone's full dump) must not fail either: backbone weights come from load_backbone.
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if BACKBONE not in k]
