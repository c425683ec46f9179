"""Hita's class-conditional autoregressive GPT (``HitaGPT``).

Follows the architecture contract, spec sections 4 (model), 5 (generation) and 8 (decisions on odd
behaviour). Those sections describe Hita's ``autoregressive/models/gpt.py``, a LlamaGen GPT extended
with holistic tokens. This file was written from those facts; it contains no code from Hita,
LlamaGen or gpt-fast. The state_dict keys and shapes equal spec 4.9, so the released checkpoints
load unchanged.

Sequence positions p: 0 = class token, 1..Nh = holistic tokens 0..Nh-1, Nh+1.. = patch tokens
(Nh = ``cfg.n_holistic``, 128 when released). Holistic and patch tokens have separate input tables
(``slot_embeddings`` / ``tok_embeddings``) and separate halves of a 2V-wide output head (holistic
columns first). Position information enters every attention layer, on q and k only (spec 4.4):

* p < Nh: the learned row ``slot_pos[p]`` is added, split per head (no RoPE);
* p == Nh: 2D RoPE with the all-zero table row, so q = k = 0 there. This is a quirk (spec 8.2), kept
  because the released weights were trained with it;
* p > Nh: 2D RoPE of patch cell p - Nh - 1 (interleaved pairs).

The input embedding at position Nh (spec 8.1) is selected by ``pos128``:

* ``"reference"`` (default for generation): the token fed at position Nh (holistic token Nh-1) is
  embedded with ``tok_embeddings``, as in the released generation code. The published FIDs were
  produced this way, so this default reproduces them.
* ``"consistent"``: that token is embedded with ``slot_embeddings``, as in training. KV-cache logits
  then equal the training forward at every position.

Inference is step-wise and pure. The KV caches are plain tensors owned by the caller
(``new_caches``). ``prefill`` feeds the class token. ``decode`` feeds one token at a tensor position
``pos`` without Python branching on its value, so one graph serves every position under torch.export
and ONNX export. ``pos`` is one position for the whole batch or one per row (in-flight batching:
requests that started at different steps decode together).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hita.config import GPTConfig

POS128_MODES = ("reference", "consistent")


def _check_pos128(pos128: str) -> None:
    if pos128 not in POS128_MODES:
        raise ValueError(
            f"pos128 must be one of {POS128_MODES}: 'reference' embeds the token fed at position "
            f"n_holistic with tok_embeddings (released generation code, published FIDs), "
            f"'consistent' with slot_embeddings (as in training); got {pos128!r}"
        )


# ----------------------------------------------------------------------------------------------
# Positions: learned slot rows (holistic part) and 2D RoPE (patch part)
# ----------------------------------------------------------------------------------------------


def rope_table_2d(grid: int, head_dim: int, base: float, device=None) -> Tensor:
    """The (cos, sin) table [grid*grid + 1, head_dim/2, 2] for 2D RoPE. Row 0 is all zero.

    Cell (r, c) gets the angles [r*theta_0.., c*theta_0..] with theta_k = base^(-2k/half) for
    k < half/2. Rows follow raster order after the prepended zero row. LlamaGen reserved the zero
    row for its class token; in Hita it lands on position Nh (spec 4.4). The table is float32, as in
    the reference.
    """
    half = head_dim // 2
    exponent = torch.arange(0, half, 2, dtype=torch.float32, device=device)[: half // 2] / half
    theta = 1.0 / (base**exponent)  # (half/2,)
    steps = torch.arange(grid, dtype=torch.float32, device=device)  # (grid,)
    ang = torch.outer(steps, theta)  # (grid, half/2)
    cell = torch.cat(
        [ang[:, None, :].expand(grid, grid, -1), ang[None, :, :].expand(grid, grid, -1)], dim=-1
    )  # (grid, grid, half): row angles then column angles
    table = torch.stack([cell.cos(), cell.sin()], dim=-1).flatten(0, 1)  # (grid*grid, half, 2)
    return torch.cat([table.new_zeros(1, half, 2), table])  # (grid*grid + 1, half, 2)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2m], x[2m+1]) of x (B, T, H, hd) by the angles in rope.

    rope is (T, hd/2, 2), or (B, 1, hd/2, 2) for one decode position per row. The math runs in float32 and the result is cast back, as in the reference.
    With the zero row, cos = sin = 0, so the output is exactly 0.
    """
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]  # (B, T, H, hd/2)
    # Leading axes pass through, so per-row decode tables (B, 1, hd/2, 2) broadcast row by row.
    cos, sin = rope[..., None, :, 0], rope[..., None, :, 1]  # (T, 1, hd/2) or (B, 1, 1, hd/2)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, H, hd)


class Positions(NamedTuple):
    """Per-position q/k treatment for T positions. It is computed once per forward and shared by
    all layers."""

    is_slot: Tensor  # (T, 1, 1) bool: True -> add slot row, False -> RoPE
    slot: Tensor  # (T, H, hd) slot_pos rows split per head (clamped index where unused)
    rope: Tensor  # (T, hd/2, 2) RoPE rows (clamped to the zero row where unused)


def apply_positions(x: Tensor, pe: Positions) -> Tensor:
    """Apply each position's treatment to x (B, T, H, hd). Both branches are computed and one is
    chosen with torch.where, so the same code serves a whole training sequence and a single decode
    position given as a tensor."""
    return torch.where(pe.is_slot, x + pe.slot, apply_rope(x, pe.rope))  # (B, T, H, hd)


def _one_position(pos: Tensor) -> bool:
    """Whether pos is statically one position for every row (shape (1,)). A traced per-row position
    (symbolic batch size) is not, even where the batch could be 1: the graph must serve any batch."""
    return isinstance(pos.shape[0], int) and pos.shape[0] == 1


def write_cache(cache: Tensor, new: Tensor, pos: Tensor, inplace: bool) -> Tensor:
    """Write new (B, H, 1, hd) at sequence index pos of cache (B, H, S, hd): pos is (1,) (every row
    at one index) or (B,) (one index per row, in-flight batching).

    inplace=True uses ``index_copy_`` on the given tensor for one index (the eager fast path) and an
    in-place ``scatter_`` for per-row indices. inplace=False uses an out-of-place ``scatter``, which
    gives a static-shape graph with no growing concat for export. Writes copy values, so every path
    stores the same bits.
    """
    if inplace and _one_position(pos):
        return cache.index_copy_(2, pos, new)
    index = pos.view(-1, 1, 1, 1).expand_as(new)  # (B, H, 1, hd)
    if inplace:
        return cache.scatter_(2, index, new)
    return torch.scatter(cache, 2, index, new)  # (B, H, S, hd)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm, normalised in float32 (stable under bf16), cast back, then scaled by ``weight``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection and no biases. The SDPA scale is
    1/sqrt(hd) and attention dropout is 0. Resid dropout follows ``wo``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def project(self, x: Tensor, pe: Positions) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, hd) from x (B, T, dim), with the position treatment on q and k. It is
        a separate method so that tests can inspect q and k."""
        qkv = self.wqkv(x).unflatten(-1, (3, self.n_head, self.head_dim))  # (B, T, 3, H, hd)
        q, k, v = qkv.unbind(2)  # (B, T, H, hd) each
        q, k = apply_positions(q, pe), apply_positions(k, pe)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd) each

    def _out(self, y: Tensor) -> Tensor:
        return self.resid_dropout(self.wo(y.transpose(1, 2).flatten(2)))  # (B, T, dim)

    def forward(self, x: Tensor, pe: Positions) -> Tensor:
        """Causal attention over a full sequence (training, no cache)."""
        q, k, v = self.project(x, pe)
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x, pe, k_cache, v_cache, pos, mask, inplace):
        """One position: write k/v at index pos, then attend over the whole static cache (mask)."""
        q, k, v = self.project(x, pe)  # (B, H, 1, hd)
        k_cache = write_cache(k_cache, k, pos, inplace)  # (B, H, S, hd)
        v_cache = write_cache(v_cache, v, pos, inplace)  # (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # (B, H, 1, hd)
        return self._out(y), k_cache, v_cache


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) with no biases; dropout on the output."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)). DropPath is identity."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, pe: Positions) -> Tensor:
        h = x + self.attention(self.attention_norm(x), pe)
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x, pe, k_cache, v_cache, pos, mask, inplace):
        a, k_cache, v_cache = self.attention.step(
            self.attention_norm(x), pe, k_cache, v_cache, pos, mask, inplace
        )
        h = x + a  # (B, 1, dim)
        return h + self.feed_forward(self.ffn_norm(h)), k_cache, v_cache


class ClassEmbedding(nn.Module):
    """Class table [num_classes + 1, dim]; the last row is the CFG null class. Class-label dropout
    is not applied here: the trainer replaces labels with ``cfg.null_class`` itself."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_ids: Tensor) -> Tensor:
        return self.embedding_table(class_ids)  # (B, dim)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class HitaGPT(nn.Module):
    """The Hita AR transformer over [class] + Nh holistic + grid**2 patch tokens (spec 4).

    It has no persistent buffers, so the state_dict is exactly spec 4.9. The RoPE table is a
    non-persistent float32 buffer ``freqs_cis`` [grid**2 + 1, hd/2, 2].
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # Registration order = the spec 4.9 key order.
        self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # patch tokens
        self.slot_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # holistic tokens
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, 2 * cfg.vocab_size, bias=False)  # [holistic | patch] heads
        self.slot_pos = nn.Embedding(cfg.n_holistic, cfg.dim)
        self.register_buffer("freqs_cis", self._rope_table(None), persistent=False)
        self.reset_parameters()

    def _rope_table(self, device) -> Tensor:
        return rope_table_2d(self.cfg.grid, self.cfg.head_dim, self.cfg.rope_base, device)

    def reset_parameters(self) -> None:
        """Linear and Embedding weights ~ N(0, 0.02), norms = 1, output head = 0 (spec 4.5)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.output.weight)

    def _apply(self, fn, recurse=True):
        """Rebuild the RoPE table in float32 after .to()/.cuda()/.bfloat16()/to_empty().

        The table is derived data. Casting it with the weights would round the angles to bf16,
        whereas the reference keeps them in float32. After meta-device construction, to_empty()
        would leave the table uninitialised.
        """
        super()._apply(fn, recurse)
        self.freqs_cis = self._rope_table(self.freqs_cis.device)
        return self

    def _positions(self, pos: Tensor) -> Positions:
        """Position treatment for the int64 positions pos (T,). Only gathers are used (slot row
        min(pos, Nh-1), RoPE row max(pos-Nh, 0)), so pos may be a traced tensor. Min/Max, not clamp:
        clamp exports as ONNX Clip, which TensorRT's parser does not take on integers."""
        nh, cfg = self.cfg.n_holistic, self.cfg
        slot = self.slot_pos(torch.minimum(pos, pos.new_tensor(nh - 1))).unflatten(-1, (cfg.n_head, cfg.head_dim))
        rope = self.freqs_cis[torch.maximum(pos - nh, pos.new_tensor(0))]  # (T, hd/2, 2)
        return Positions((pos < nh).view(-1, 1, 1), slot, rope)  # slot: (T, H, hd)

    # -- training ------------------------------------------------------------------------------

    def forward_train(
        self, class_ids: Tensor, holistic_ids: Tensor, patch_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Training forward (spec 4.3, 4.6): causal over [cls, hol 0..Nh-1, patch 0..Np-2].

        Returns the holistic logits (B, Nh, V) (predicting holistic 0..Nh-1) and the patch logits
        (B, Np, V) (predicting patch 0..Np-1). Dropout follows train/eval mode. Class-label dropout
        is the trainer's job.
        """
        cfg, nh = self.cfg, self.cfg.n_holistic
        if holistic_ids.shape[1] != nh or patch_ids.shape[1] != cfg.n_patch:
            raise ValueError(
                f"expected holistic_ids [B, {nh}] and patch_ids [B, {cfg.n_patch}] for GPT "
                f"{cfg.name!r}; got {tuple(holistic_ids.shape)} and {tuple(patch_ids.shape)}"
            )
        x = torch.cat(
            [
                self.cls_embedding(class_ids)[:, None],  # (B, 1, dim)
                self.slot_embeddings(holistic_ids),  # (B, Nh, dim)
                self.tok_embeddings(patch_ids[:, :-1]),  # (B, Np-1, dim)
            ],
            dim=1,
        )  # (B, Nh+Np, dim)
        x = self.tok_dropout(x)
        pe = self._positions(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            x = layer(x, pe)  # (B, T, dim)
        h = self.norm(x)  # (B, T, dim)
        w, v = self.output.weight, cfg.vocab_size
        # Each position only needs its own half of the head: this halves the head's cost.
        hol = F.linear(h[:, :nh], w[:v]).float().to(h.dtype)  # (B, Nh, V)
        patch = F.linear(h[:, nh:], w[v:]).float().to(h.dtype)  # (B, Np, V)
        return hol, patch

    def forward(self, class_ids: Tensor, holistic_ids: Tensor, patch_ids: Tensor):
        """Same as ``forward_train``. Wrappers that call the module (DDP, compile) need it."""
        return self.forward_train(class_ids, holistic_ids, patch_ids)

    # -- inference (caches live outside the module) --------------------------------------------

    def new_caches(self, batch: int, dtype=None, device=None) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed k and v caches: two lists (len n_layer) of [B, n_head, cache_len, head_dim]. The
        dtype and device default to those of the weights."""
        cfg, ref = self.cfg, self.tok_embeddings.weight
        shape = (batch, cfg.n_head, cfg.cache_len, cfg.head_dim)
        dtype, device = dtype or ref.dtype, device or ref.device
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        return k, v

    def _row_positions(self, pos: Tensor) -> Positions:
        """Position treatment for one step at pos (R,), R = 1 (every row at one position) or B (one
        position per row). The tables gain the step's length-1 time axis after the row axis, so they
        broadcast against q/k (B, 1, H, hd) row by row; for R = 1 they hold the same values as
        ``_positions`` and broadcast to the same results."""
        pe = self._positions(pos)
        return Positions(pe.is_slot[:, None], pe.slot[:, None], pe.rope[:, None])  # (R, 1, ...)

    def _step(self, x: Tensor, pos: Tensor, k_caches, v_caches, inplace: bool):
        """Run the input embedding x (B, dim) at position pos, (1,) or (B,), through every layer.
        Returns the final-normed hidden state (B, dim) and the new caches."""
        if len(k_caches) != self.cfg.n_layer or len(v_caches) != self.cfg.n_layer:
            raise ValueError(
                f"expected {self.cfg.n_layer} k and v caches (one per layer; see new_caches), "
                f"got {len(k_caches)} and {len(v_caches)}"
            )
        x = self.tok_dropout(x[:, None])  # (B, 1, dim)
        pe = self._row_positions(pos)
        s = k_caches[0].shape[2]
        mask = (torch.arange(s, device=pos.device) <= pos[:, None]).view(-1, 1, 1, s)  # (R, 1, 1, S)
        new_k, new_v = [], []
        for layer, kc, vc in zip(self.layers, k_caches, v_caches):
            x, kc, vc = layer.step(x, pe, kc, vc, pos, mask, inplace)  # x: (B, 1, dim)
            new_k.append(kc)
            new_v.append(vc)
        return self.norm(x[:, 0]), new_k, new_v  # (B, dim)

    def prefill(self, class_ids: Tensor, k_caches, v_caches, *, inplace: bool = False):
        """Feed the class token at position 0 (k/v written at cache index 0).

        Returns (logits (B, V) of the holistic head, k_caches, v_caches). The logits come from the
        head in float32, cast back to the hidden dtype (spec 4.5).
        """
        pos = torch.zeros(1, dtype=torch.long, device=class_ids.device)  # (1,)
        h, k_caches, v_caches = self._step(
            self.cls_embedding(class_ids), pos, k_caches, v_caches, inplace
        )
        logits = F.linear(h, self.output.weight[: self.cfg.vocab_size]).float()  # (B, V)
        return logits.to(h.dtype), k_caches, v_caches

    def decode(
        self,
        tokens: Tensor,
        pos: Tensor,
        k_caches,
        v_caches,
        *,
        pos128: str = "reference",
        inplace: bool = False,
    ):
        """Feed tokens (B,) int64 at sequence position pos, an int64 tensor of shape (1,) (every row
        at one position) or (B,) (one position per row, so that sequences started at different
        steps share a batch), with 1 <= pos <= Nh+Np-1 (not checked, so that the graph stays
        data-independent).

        Each row's k/v are written at its index pos; attention covers the whole static cache under
        the row's mask arange(S) <= pos. The input table is slot_embeddings for pos < Nh
        ("reference") or pos <= Nh ("consistent"), and tok_embeddings otherwise. Returns (logits
        (B, V), k_caches, v_caches), with each row's logits from the holistic head if its pos < Nh,
        else the patch head. They come from the head in float32, cast back to the hidden dtype.
        Every rule applies per row, and a (1,) position gives bit for bit what it gave before
        per-row positions existed.
        """
        _check_pos128(pos128)
        nh, v = self.cfg.n_holistic, self.cfg.vocab_size
        first_tok = nh if pos128 == "reference" else nh + 1  # first position using tok_embeddings
        use_slot = (pos < first_tok).view(-1, 1)  # (R, 1)
        slot, tok = self.slot_embeddings(tokens), self.tok_embeddings(tokens)  # (B, dim) each
        x = torch.where(use_slot, slot, tok)  # (B, dim)
        h, k_caches, v_caches = self._step(x, pos, k_caches, v_caches, inplace)
        full = F.linear(h, self.output.weight).float()  # (B, 2V)
        logits = torch.where((pos < nh).view(-1, 1), full[:, :v], full[:, v:])  # (B, V)
        return logits.to(h.dtype), k_caches, v_caches

    @torch.no_grad()
    def teacher_forced_logits(
        self,
        class_ids: Tensor,
        holistic_ids: Tensor,
        patch_ids: Tensor,
        use_cache: bool = False,
        pos128: str = "reference",
    ) -> tuple[Tensor, Tensor]:
        """Score given tokens in eval mode. Returns (hol (B, Nh, V), patch (B, Np, V)).

        use_cache=False runs ``forward_train`` without dropout. That is the training embedding
        rule, so pos128 has no effect there. use_cache=True runs prefill and then one decode per
        token; the two agree everywhere only with pos128="consistent". The train/eval mode is
        restored afterwards.
        """
        _check_pos128(pos128)
        was_training = self.training
        self.eval()
        try:
            if not use_cache:
                return self.forward_train(class_ids, holistic_ids, patch_ids)
            k, v = self.new_caches(class_ids.shape[0], device=class_ids.device)
            first, k, v = self.prefill(class_ids, k, v, inplace=True)
            fed = torch.cat([holistic_ids, patch_ids[:, :-1]], dim=1)  # (B, Nh+Np-1)
            outs = [first]
            for p in range(1, fed.shape[1] + 1):
                pos = torch.tensor([p], dtype=torch.long, device=class_ids.device)
                out, k, v = self.decode(fed[:, p - 1], pos, k, v, pos128=pos128, inplace=True)
                outs.append(out)
            logits = torch.stack(outs, dim=1)  # (B, Nh+Np, V)
            nh = self.cfg.n_holistic
            return logits[:, :nh], logits[:, nh:]
        finally:
            self.train(was_training)
