"""Pre-norm transformer layers used by Hita's holistic encoder and fusion decoder (spec 1.3).

One ``Layer`` = ``x + Attn(LN1(x))`` then ``x + SwiGLU(LN2(x))`` (LayerNorm eps 1e-5, no final norm
inside ``Transformer``). Two attention flavours exist only because the reference picked the class by a
constructor flag, and their parameter names differ, which the checkpoints pin:

- ``CrossAttention`` (encoder transformer1, full attention): ``to_q/to_k/to_v`` without bias and
  ``to_out.0`` with bias followed by dropout; no mask, no attention-probability dropout.
- ``Attention3`` (encoder transformer2 and the fusion decoder): ``q_proj/k_proj/v_proj/out_proj`` with
  bias; scaled-dot-product attention with attention-probability dropout while training.

Masks here are boolean with **True = may attend** (SDPA's convention). The reference passed
True = blocked and inverted it inside ``Attention3``; callers of this module never invert.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a; b] = w12(x)``: w1 and w2 fused row-wise into ``w12`` (the first
    ``hidden`` rows are w1), which is how the released checkpoints store them. No dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, dim)
        a, b = self.w12(x).chunk(2, dim=-1)  # 2 x (B, L, hidden)
        return self.w3(F.silu(a) * b)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _split_heads(x: Tensor, n_heads: int) -> Tensor:  # (B, L, H*hd) -> (B, H, L, hd)
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:  # (B, H, L, hd) -> (B, L, H*hd)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Full (bidirectional) multi-head self-attention with the ``to_q/to_k/to_v/to_out.0`` layout.

    Scale 1/sqrt(head_dim). Dropout acts on the output projection only (``to_out.1``)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x: (B, L, dim)
        if mask is not None:
            raise ValueError("CrossAttention is the full-attention flavour and takes no mask")
        q, k, v = (_split_heads(p(x), self.n_heads) for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.to_out(_merge_heads(out))  # (B, L, dim)


class Attention3(nn.Module):
    """Multi-head self-attention with the ``q_proj/k_proj/v_proj/out_proj`` layout (all with bias).

    ``mask``: boolean, broadcastable to (B, H, L, L), True = may attend. ``None`` means causal
    (lower-triangular, diagonal included) — the reference's fallback when no mask is passed, and what
    both of its callers (encoder transformer2, fusion decoder) use for the token path."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, inner, bias=True)
        self.k_proj = nn.Linear(dim, inner, bias=True)
        self.v_proj = nn.Linear(dim, inner, bias=True)
        self.out_proj = nn.Linear(inner, dim, bias=True)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x: (B, L, dim)
        q, k, v = (_split_heads(p(x), self.n_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        p_drop = self.dropout if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self.out_proj(_merge_heads(out))  # (B, L, dim)


ATTENTION = {"cross": CrossAttention, "attention3": Attention3}


# ----------------------------------------------------------------------------------------------
# Layer / stack
# ----------------------------------------------------------------------------------------------


class Layer(nn.Module):
    """Pre-norm residual block: ``x + attn1(norm1(x))``, then ``x + ffnet(norm2(x))``."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, ffn_hidden: int, dropout: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = ATTENTION[attention](dim, n_heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ffnet = SwiGLUFFN(dim, ffn_hidden)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L, dim)
        x = x + self.attn1(self.norm1(x), mask)
        return x + self.ffnet(self.norm2(x))


class Transformer(nn.Module):
    """A stack of ``depth`` layers under ``layers.{i}``; no final norm (callers own their norms)."""

    def __init__(self, dim: int, depth: int, n_heads: int, head_dim: int, ffn_hidden: int, dropout: float,
                 attention: str):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention flavour {attention!r}; valid: {sorted(ATTENTION)}")
        self.layers = nn.ModuleList(
            Layer(dim, n_heads, head_dim, ffn_hidden, dropout, attention) for _ in range(depth)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L, dim)
        for layer in self.layers:
            x = layer(x, mask)
        return x
