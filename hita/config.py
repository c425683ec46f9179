"""Model configurations: frozen dataclasses with derived sizes and a registry of named presets.

Numbers follow the architecture contract (spec sections 1.1, 4.1, 4.2). Derived sizes (FFN hidden
widths, head dims, token counts, cache length) are properties, never typed twice. Preset names are
exact: an unknown name is a ``ValueError`` that lists the valid ones (no fuzzy matching).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


class _Preset:
    """Mixin: preset registry lookup plus (de)serialisation to a JSON-able dict."""

    PRESETS: ClassVar[dict[str, Any]]
    KIND: ClassVar[str]

    @classmethod
    def from_name(cls, name: str):
        try:
            return cls.PRESETS[name]
        except KeyError:
            valid = ", ".join(cls.PRESETS)
            raise ValueError(f"unknown {cls.KIND} preset {name!r}; valid names: {valid}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.KIND} config keys: {unknown}; valid keys: {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig(_Preset):
    """Hita tokenizer: CNN encoder/decoder (LlamaGen VQ-16 layout), optional frozen DINOv2, 128
    holistic carrier tokens, two cosine VQ codebooks, causal fusion transformer with ``shift_k``."""

    name: str
    image_size: int = 336
    # CNN (LlamaGen VQ-16). Downsample factor = 2 ** (len(ch_mult) - 1).
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 per level
    z_channels: int = 512
    # Transformers (encode transformer1/2, decode fusion transformer).
    dim: int = 512
    depth: int = 3
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048  # before the SwiGLU 2/3 rescale
    dropout: float = 0.1
    n_holistic: int = 128
    shift_k: int = 4
    # Quantizers (both l2-normalised / cosine).
    codebook_size: int = 16384
    patch_code_dim: int = 8
    holistic_code_dim: int = 12
    commit_beta: float = 0.25
    # Frozen vision foundation model. None: no backbone branch at all (small presets).
    backbone: str | None = "dinov2_vitl14_reg4"
    backbone_dim: int = 1024
    backbone_image_size: int = 224
    # Hita-U: VFM feature-reconstruction head on the decoder transformer (training-time only).
    vfm_recon: bool = False
    vfm_grid: int = 16

    PRESETS: ClassVar[dict[str, "TokenizerConfig"]] = {}
    KIND: ClassVar[str] = "tokenizer"

    def __post_init__(self) -> None:
        if self.dim != self.z_channels:
            raise ValueError(f"tokenizer dim ({self.dim}) must equal z_channels ({self.z_channels})")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.downsample}")
        if not 0 <= self.shift_k <= self.n_holistic:
            raise ValueError(f"shift_k {self.shift_k} must lie in [0, n_holistic={self.n_holistic}]")
        if self.vfm_recon and self.backbone is None:
            raise ValueError("vfm_recon needs a backbone (its target is the backbone's patch features)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def n_patch(self) -> int:
        return self.grid * self.grid

    @property
    def n_tokens(self) -> int:
        return self.n_holistic + self.n_patch

    @property
    def ffn_hidden(self) -> int:
        # SwiGLUFFNFused: hidden = ((int(mlp_dim * 2/3) + 7) // 8) * 8  -> 1368 for mlp_dim 2048.
        return ((int(self.mlp_dim * 2 / 3) + 7) // 8) * 8

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


# ----------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig(_Preset):
    """Class-conditional AR GPT over ``[class] + n_holistic holistic + grid**2 patch`` tokens."""

    name: str
    dim: int
    n_layer: int
    n_head: int
    vocab_size: int = 16384
    num_classes: int = 1000
    n_holistic: int = 128
    grid: int = 21
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1

    PRESETS: ClassVar[dict[str, "GPTConfig"]] = {}
    KIND: ClassVar[str] = "gpt"

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def n_patch(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Generated tokens per image (569 for the released layout)."""
        return self.n_holistic + self.n_patch

    @property
    def null_class(self) -> int:
        """Row of the class table used for the CFG unconditional branch."""
        return self.num_classes

    @property
    def cache_len(self) -> int:
        """Static KV-cache length: class token + seq_len positions, rounded up to 8 (570 -> 576)."""
        return find_multiple(self.seq_len + 1, 8)


def _register(cfg) -> None:
    type(cfg).PRESETS[cfg.name] = cfg


for _c in (
    TokenizerConfig("hita-v"),
    TokenizerConfig("hita-u", vfm_recon=True),
    # Small, backbone-free tokenizer for tests and the embedded demo model: 32x32 images, 8x8 grid.
    TokenizerConfig(
        "tiny", image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, dim=64,
        depth=2, num_heads=4, head_dim=16, mlp_dim=192, dropout=0.0, n_holistic=16, shift_k=4,
        codebook_size=512, backbone=None,
    ),
    GPTConfig("GPT-B", dim=768, n_layer=12, n_head=12),
    GPTConfig("GPT-L", dim=1024, n_layer=24, n_head=16),
    GPTConfig("GPT-XL", dim=1280, n_layer=36, n_head=20),
    GPTConfig("GPT-XXL", dim=1536, n_layer=48, n_head=24),
    GPTConfig("GPT-2B", dim=1920, n_layer=48, n_head=32),
    # Matches the `tiny` tokenizer (vocab 512, 16 holistic, 8x8 grid) and Fashion-MNIST's 10 classes.
    GPTConfig(
        "tiny", dim=128, n_layer=4, n_head=4, vocab_size=512, num_classes=10, n_holistic=16, grid=8,
        multiple_of=64,
    ),
):
    _register(_c)


def check_pair(tok: TokenizerConfig, gpt: GPTConfig) -> None:
    """Raise ``ValueError`` when a GPT cannot drive a tokenizer (token layout or vocab differ)."""
    problems = []
    if tok.codebook_size != gpt.vocab_size:
        problems.append(f"codebook_size {tok.codebook_size} != gpt vocab_size {gpt.vocab_size}")
    if tok.n_holistic != gpt.n_holistic:
        problems.append(f"tokenizer n_holistic {tok.n_holistic} != gpt n_holistic {gpt.n_holistic}")
    if tok.grid != gpt.grid:
        problems.append(f"tokenizer grid {tok.grid} != gpt grid {gpt.grid}")
    if problems:
        raise ValueError(
            f"tokenizer {tok.name!r} and GPT {gpt.name!r} do not fit together: " + "; ".join(problems)
        )
