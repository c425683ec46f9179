"""Model configurations: frozen dataclasses with derived sizes and a registry of named presets.

Numbers follow the architecture contract (spec sections 1.1, 4.1, 4.2). Derived sizes (FFN hidden
widths, head dims, token counts, cache length) are properties, never typed twice. Preset names are
exact: an unknown name is a ``ValueError`` that lists the valid ones (no fuzzy matching).

Configs also arrive from files (safetensors metadata, export manifests), so every field is checked
when a config is built: its type, a range set generously above every real preset (a forged
``grid=100000`` or ``n_layer=10**6`` would otherwise ask for terabytes), and an estimate of the
parameter count against :data:`MAX_PARAMS`. A bad field is a one-line ``ValueError`` naming the
field, the value and the allowed range.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

# Largest model a config may describe (GPT-2B, the biggest released model, has 2.25e9 parameters).
MAX_PARAMS = 20e9
# Longest config / preset name (names end up in messages and file metadata).
MAX_NAME_LEN = 100


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


def _short(value: Any) -> str:
    try:
        r = repr(value)
    except ValueError:  # an int too long to print (Python's digit limit)
        return f"<{type(value).__name__} too large to print>"
    return r if len(r) <= 60 else r[:57] + "..."


def _field_error(kind: str, name: Any, field: str, problem: str) -> ValueError:
    where = f"{kind} config {name!r}" if isinstance(name, str) and _name_ok(name) else f"{kind} config"
    return ValueError(f"{where}: {field} {problem}; fix the config or use a preset")


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LEN and name.isprintable()


def _int_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Preset:
    """Mixin: preset registry lookup, field validation, (de)serialisation to a JSON-able dict."""

    PRESETS: ClassVar[dict[str, Any]]
    KIND: ClassVar[str]
    # field -> (type, low, high): "int" / "float" are range-checked (inclusive, a float's high may
    # be exclusive via `_OPEN_HIGH`), "ints" is a tuple of ints (each in range, its length in
    # `_TUPLE_LEN`), "bool" / "str" / "optstr" are type-checked.
    BOUNDS: ClassVar[dict[str, tuple[str, float, float]]]
    _OPEN_HIGH: ClassVar[frozenset[str]] = frozenset()
    _TUPLE_LEN: ClassVar[dict[str, tuple[int, int]]] = {}

    def _check_fields(self) -> None:
        """Type and range of every field; normalises ints given for floats and lists given for tuples."""
        kind, name = self.KIND, getattr(self, "name", None)
        if not isinstance(name, str) or not _name_ok(name):
            raise _field_error(kind, None, "name", f"must be a printable string of 1 to {MAX_NAME_LEN} characters "
                               f"(got {_short(name)})")
        for field, (typ, lo, hi) in self.BOUNDS.items():
            v = getattr(self, field)
            if typ == "int":
                if not _int_ok(v):
                    raise _field_error(kind, name, field, f"must be an integer in [{lo}, {hi}] (got {_short(v)})")
                if not lo <= v <= hi:
                    raise _field_error(kind, name, field, f"= {_short(v)} is outside the allowed range [{lo}, {hi}]")
            elif typ == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise _field_error(kind, name, field, f"must be a number in [{lo}, {hi}] (got {_short(v)})")
                open_high = field in self._OPEN_HIGH
                if not (math.isfinite(v) and lo <= v and (v < hi if open_high else v <= hi)):
                    rng = f"[{lo}, {hi})" if open_high else f"[{lo}, {hi}]"
                    raise _field_error(kind, name, field, f"= {_short(v)} is outside the allowed range {rng}")
                object.__setattr__(self, field, float(v))
            elif typ == "ints":
                n_lo, n_hi = self._TUPLE_LEN[field]
                if isinstance(v, list):
                    v = tuple(v)
                    object.__setattr__(self, field, v)
                if not (isinstance(v, tuple) and n_lo <= len(v) <= n_hi and all(_int_ok(x) for x in v)):
                    raise _field_error(kind, name, field, f"must be a list of {n_lo} to {n_hi} integers "
                                       f"(got {_short(v)})")
                bad = [x for x in v if not lo <= x <= hi]
                if bad:
                    raise _field_error(kind, name, field, f"= {_short(v)} has entries outside the allowed range "
                                       f"[{lo}, {hi}]")
            elif typ == "bool":
                if not isinstance(v, bool):
                    raise _field_error(kind, name, field, f"must be true or false (got {_short(v)})")
            elif typ in ("str", "optstr"):
                if v is None and typ == "optstr":
                    continue
                if not (isinstance(v, str) and _name_ok(v)):
                    what = "null or " if typ == "optstr" else ""
                    raise _field_error(kind, name, field, f"must be {what}a printable string of 1 to {MAX_NAME_LEN} "
                                       f"characters (got {_short(v)})")

    def _check_size(self) -> None:
        n = self.param_estimate()
        if n > MAX_PARAMS:
            raise _field_error(self.KIND, self.name, "model size",
                               f"is about {n / 1e9:.3g}e9 parameters (estimated from the config), above the "
                               f"{MAX_PARAMS / 1e9:g}e9 limit")

    def param_estimate(self) -> int:
        """Approximate parameter count (weights of every saved tensor), computed from the config alone."""
        raise NotImplementedError

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
        """Build a config from a JSON-like dict; unknown, missing or bad fields are one-line ``ValueError``s."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.KIND} config must be a JSON object (got {type(d).__name__}); fix the config")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(map(str, set(d) - names))
        if unknown:
            shown = ", ".join(_short(k) for k in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise ValueError(f"unknown {cls.KIND} config keys: {shown}; valid keys: {', '.join(sorted(names))}")
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{cls.KIND} config lacks the keys {', '.join(missing)}; fix the config")
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
    # Released models: image 336, ch 128 x (1,1,2,2,4), dim 512, depth 3, 8 heads of 64, 128 carriers,
    # codebook 16384, DINOv2 ViT-L (1024 wide, 224 px), grid 21.
    BOUNDS: ClassVar[dict[str, tuple[str, float, float]]] = {
        "image_size": ("int", 1, 4096),
        "ch": ("int", 1, 4096),
        "ch_mult": ("ints", 1, 64),
        "num_res_blocks": ("int", 1, 16),
        "z_channels": ("int", 1, 16384),
        "dim": ("int", 1, 16384),
        "depth": ("int", 1, 256),
        "num_heads": ("int", 1, 256),
        "head_dim": ("int", 1, 1024),
        "mlp_dim": ("int", 1, 65536),
        "dropout": ("float", 0.0, 1.0),
        "n_holistic": ("int", 1, 4096),
        "shift_k": ("int", 0, 4096),
        "codebook_size": ("int", 2, 2**20),
        "patch_code_dim": ("int", 1, 4096),
        "holistic_code_dim": ("int", 1, 4096),
        "commit_beta": ("float", 0.0, 1000.0),
        "backbone": ("optstr", 0, 0),
        "backbone_dim": ("int", 1, 16384),
        "backbone_image_size": ("int", 1, 4096),
        "vfm_recon": ("bool", 0, 0),
        "vfm_grid": ("int", 1, 128),
    }
    _OPEN_HIGH: ClassVar[frozenset[str]] = frozenset({"dropout"})
    _TUPLE_LEN: ClassVar[dict[str, tuple[int, int]]] = {"ch_mult": (1, 8)}
    MAX_GRID: ClassVar[int] = 128

    def __post_init__(self) -> None:
        self._check_fields()
        if not 1 <= self.grid <= self.MAX_GRID:
            raise _field_error(self.KIND, self.name, "image_size",
                               f"= {self.image_size} gives a {self.grid}x{self.grid} token grid (downsample "
                               f"{self.downsample}), outside the allowed range [1, {self.MAX_GRID}]")
        bad_widths = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad_widths:
            raise _field_error(self.KIND, self.name, "ch x ch_mult",
                               f"give CNN widths {bad_widths} that are not multiples of 32 (GroupNorm has 32 groups)")
        if self.dim != self.z_channels:
            raise ValueError(f"tokenizer dim ({self.dim}) must equal z_channels ({self.z_channels})")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.downsample}")
        if not 0 <= self.shift_k <= self.n_holistic:
            raise ValueError(f"shift_k {self.shift_k} must lie in [0, n_holistic={self.n_holistic}]")
        if self.vfm_recon and self.backbone is None:
            raise ValueError("vfm_recon needs a backbone (its target is the backbone's patch features)")
        self._check_size()

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

    def param_estimate(self) -> int:
        """Approximate parameter count of the saved tensors (CNN, transformers, embeddings, codebooks;
        biases and norms left out), within a few percent of the real count; no model is built."""
        widths = [self.ch * m for m in self.ch_mult]

        def res(ci: int, co: int) -> int:
            return 9 * ci * co + 9 * co * co + (ci * co if ci != co else 0)

        def attn(c: int) -> int:
            return 4 * c * c

        top, nrb = widths[-1], self.num_res_blocks
        mid = 2 * res(top, top) + attn(top)
        n = 27 * self.ch + mid + 9 * top * self.z_channels  # encoder: conv_in, mid, conv_out
        ci = self.ch
        for i, co in enumerate(widths):  # encoder levels; attention on the deepest; downsample after the others
            last = i == len(widths) - 1
            n += sum(res(ci if j == 0 else co, co) for j in range(nrb)) + (nrb * attn(co) if last else 9 * co * co)
            ci = co
        n += 9 * self.z_channels * top + mid + 27 * widths[0]  # decoder: conv_in, mid, conv_out
        ci = top
        for k, co in enumerate(reversed(widths)):  # decoder levels, deepest first, one more res block each
            n += sum(res(ci if j == 0 else co, co) for j in range(nrb + 1))
            n += (nrb + 1) * attn(co) if k == 0 else 0
            n += 9 * co * co if k < len(widths) - 1 else 0
            ci = co
        layer = 4 * self.dim * self.inner_dim + 3 * self.dim * self.ffn_hidden
        n += 3 * self.depth * layer  # transformer1, transformer2, the decoder's fusion transformer
        n += 2 * (self.n_patch + self.n_holistic) * self.dim  # position embeddings, carriers, slot positions
        n += self.codebook_size * (self.patch_code_dim + self.holistic_code_dim)
        n += 2 * self.dim * (self.patch_code_dim + self.holistic_code_dim)
        if self.backbone is not None:
            n += self.backbone_dim * self.dim + self.dim * self.dim
        if self.vfm_recon:
            n += self.dim * self.backbone_dim
        return n


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
    # Largest released model, GPT-2B: dim 1920, 48 layers, 32 heads; vocab 16384, 1000 classes, grid 21.
    BOUNDS: ClassVar[dict[str, tuple[str, float, float]]] = {
        "dim": ("int", 1, 16384),
        "n_layer": ("int", 1, 256),
        "n_head": ("int", 1, 256),
        "vocab_size": ("int", 2, 2**20),
        "num_classes": ("int", 1, 10**6),
        "n_holistic": ("int", 1, 4096),
        "grid": ("int", 1, 128),
        "multiple_of": ("int", 1, 65536),
        "norm_eps": ("float", 1e-12, 1.0),
        "rope_base": ("float", 2.0, 1e9),
        "token_dropout": ("float", 0.0, 1.0),
        "resid_dropout": ("float", 0.0, 1.0),
        "ffn_dropout": ("float", 0.0, 1.0),
        "class_dropout": ("float", 0.0, 1.0),
    }
    _OPEN_HIGH: ClassVar[frozenset[str]] = frozenset({"token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"})

    def __post_init__(self) -> None:
        self._check_fields()
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        self._check_size()

    def param_estimate(self) -> int:
        """Parameter count of the saved tensors, computed from the config (exact for this architecture)."""
        d, v = self.dim, self.vocab_size
        layer = 4 * d * d + 3 * d * self.ffn_hidden + 2 * d  # wqkv + wo, w1 / w3 / w2, two RMSNorms
        # token + slot embeddings, class table (+ null row), [holistic | patch] output heads, slot positions, norm
        return 2 * v * d + (self.num_classes + 1) * d + 2 * v * d + self.n_holistic * d + self.n_layer * layer + d

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
