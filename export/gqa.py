"""The decode step for ONNX Runtime: ``com.microsoft.GroupQueryAttention`` over the filled cache
prefix, in place, and only the output-head half the step needs (``--attention gqa``).

Why: the plain decode graph attends over every static cache slot under a mask, and the dynamo
exporter's decomposition of that attention transposes and rescales the whole K cache in every
layer, then scatters the new k/v into a copy of the cache. ONNX Runtime's CPU kernel for
``GroupQueryAttention`` (GQA) does all of it in one node: it writes the new k/v at slot
``seqlens_k[b]`` of a static BNSH cache (in place when past and present are bound to the same
buffer, detected by pointer), and attends only over slots ``0..seqlens_k[b]`` of each row. It is an
ONNX Runtime contrib op, so this is a variant for ONNX Runtime; the plain graph stays the default
and the one TensorRT builds (:mod:`~hita.export.trt_support` refuses this one).

How the graph stays exactly the model (checked against the eager plain wrapper by the export driver,
like every graph):

- **Positions outside the op** (``do_rotary=0``). q and k get the model's own treatment
  (``Attention.project``: learned slot rows below Nh, 2D RoPE with interleaved pairs above, and the
  all-zero RoPE row at Nh, so q = k = 0 there) before GQA sees them. GQA's built-in rotary knows
  neither slot rows nor per-grid-cell tables, so nothing of it is used.
- **Layout.** GQA takes q/k/v as ``[B, 1, H*hd]`` (BSH) and the cache as ``[B, H, S, hd]`` (BNSH),
  which is the spec's cache layout: ``num_heads = kv_num_heads = n_head``, ``scale = 1/sqrt(hd)``
  (the SDPA default the model uses).
- **Prefix.** ``seqlens_k = position`` (int32, one per row: the slot written, which is also the last
  slot attended, as the eager mask ``arange(S) <= pos`` says) and ``total_sequence_length =
  max(position) + 1``. Both are computed inside the graph from ``position``, so the graph keeps the
  spec's I/O and every runtime feeds it as before; per-row positions (``row_positions``) fall out
  naturally.
- **Cache slots beyond the prefix** are neither read nor written (measured on ONNX Runtime 1.32
  CPU: NaN there leaves the logits bit-identical; with separate past/present buffers the op writes
  only the prefix and leaves later present slots zero). Validation therefore runs the graph with
  the cache bound in place, as runtimes do, and :func:`check_gqa_step` records both facts.
- **Head half.** Steps below Nh use the holistic half of the 2V head, the others the patch half,
  chosen with ONNX ``If`` (``torch.cond`` at export) over two weight initializers. Measured on
  GPT-B's head (768 x 16384 per half, ORT 1.32 CPU): ``If`` is bit-identical to the full MatMul and
  reads half the bytes, while gathering the half from a stacked ``[2, dim, V]`` weight copies it on
  every call and was 2-3x slower than the full head. With per-row positions, a batch whose rows
  are all on one side takes that half; a mixed batch (rows on both sides of Nh, only in-flight
  batching) computes both halves and picks per row, as eager does.

Requirements: float32 (the only dtype here with a CPU GQA kernel besides fp16, which hita does not
export) and ``head_dim % 8 == 0`` (the CPU kernel's rule; every preset has 32 or 64).

Why a custom op at export rather than rewriting the exported plain graph: the exporter's SDPA
decomposition (Transpose, Mul, MatMul, Where, Softmax, ...) changes with torch versions and would
have to be pattern-matched node by node; here the traced module calls one torch op,
``hita::gqa_decode_attention``, whose eager meaning is the model's attention step and whose ONNX
translation is the GQA node, so the graph holds exactly one GQA node per layer by construction.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hita.models.gpt import write_cache

from .ort_binding import bind_inplace

from .graphs import DecodeStepGraph, _interleave
from .spec import ExportSpec

if TYPE_CHECKING:
    from hita.config import GPTConfig
    from hita.models.gpt import HitaGPT

__all__ = [
    "ATTENTIONS",
    "GQA_OP",
    "GqaDecodeStepGraph",
    "LayerwiseDecodeStepGraph",
    "check_gqa_export",
    "translation_table",
    "inplace_runner",
    "check_gqa_step",
]

ATTENTIONS = ("plain", "gqa")
GQA_OP = ("com.microsoft", "GroupQueryAttention")


def check_gqa_export(gpt_cfg: "GPTConfig", dtype: str) -> None:
    """:class:`ValueError` (one line) when the GQA decode step cannot represent this model."""
    if dtype != "float32":
        raise ValueError(f"--attention gqa exports float32 only (ONNX Runtime's CPU GroupQueryAttention has no "
                         f"{dtype} kernel); export {dtype} with --attention plain")
    if gpt_cfg.head_dim % 8:
        raise ValueError(f"--attention gqa needs head_dim % 8 == 0 (ONNX Runtime's CPU kernel); GPT "
                         f"{gpt_cfg.name!r} has head_dim {gpt_cfg.head_dim}: use --attention plain")


# ----------------------------------------------------------------------------------------------
# The op: eager meaning (the model's attention step) and ONNX meaning (one GQA node)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("hita::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor,
    total_sequence_length: Tensor, num_heads: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode position: write k/v (``[B, 1, H*hd]``) at slot ``seqlens_k[b]`` of each row's
    cache ``[B, H, S, hd]`` and attend over slots ``0..seqlens_k[b]``. Returns the attention output
    ``[B, 1, H*hd]`` and the written caches.

    This eager body is what ``torch.export`` traces through for shapes only; it uses the model's
    own ``write_cache`` and SDPA under the model's mask, so the wrapper run eagerly equals the model.
    ``total_sequence_length`` is GQA's batch bound (``max(seqlens_k) + 1``); eager does not need it.
    """
    b, h, s, hd = k_cache.shape
    pos = seqlens_k.long()  # (B,)
    qh, kh, vh = (t.view(b, 1, h, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, 1, hd) each
    k_cache = write_cache(k_cache, kh, pos, inplace=False)  # (B, H, S, hd)
    v_cache = write_cache(v_cache, vh, pos, inplace=False)
    mask = (torch.arange(s, device=pos.device) <= pos[:, None]).view(b, 1, 1, s)  # (B, 1, 1, S)
    y = F.scaled_dot_product_attention(qh, k_cache, v_cache, attn_mask=mask, scale=scale)  # (B, H, 1, hd)
    return y.transpose(1, 2).flatten(2), k_cache, v_cache  # (B, 1, H*hd)


@gqa_decode_attention.register_fake
def _gqa_fake(q, k, v, k_cache, v_cache, seqlens_k, total_sequence_length, num_heads, scale):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


def _gqa_schema():
    """The slice of GQA's contrib schema the exporter needs to emit the node (onnx itself does not
    register com.microsoft schemas): the seven inputs used, three outputs, three attributes."""
    from onnx.defs import OpSchema

    p = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        GQA_OP[1], GQA_OP[0], 1,
        inputs=[p("query", "T"), p("key", "T"), p("value", "T"), p("past_key", "T"), p("past_value", "T"),
                p("seqlens_k", "M"), p("total_sequence_length", "M")],
        outputs=[p("output", "T"), p("present_key", "T"), p("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 q/k/v and cache"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, "query heads"),
                    attr("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    attr("scale", OpSchema.AttrType.FLOAT, "softmax scale")],
    )


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the op becomes one GQA node
    (``do_rotary`` left at 0: positions are applied before the op)."""
    import onnxscript

    gqa = onnxscript.values.Op(onnxscript.values.Opset(GQA_OP[0], 1), GQA_OP[1], _gqa_schema())

    def to_onnx(q, k, v, k_cache, v_cache, seqlens_k, total_sequence_length, num_heads: int, scale: float):
        return gqa(q, k, v, k_cache, v_cache, seqlens_k, total_sequence_length,
                   num_heads=num_heads, kv_num_heads=num_heads, scale=scale)

    return {torch.ops.hita.gqa_decode_attention.default: to_onnx}


# ----------------------------------------------------------------------------------------------
# The graph wrapper
# ----------------------------------------------------------------------------------------------


class LayerwiseDecodeStepGraph(DecodeStepGraph):
    """``HitaGPT.decode`` spelled out layer by layer over the model's own modules, with two seams an
    engine variant fills: how one position attends over the cache (:meth:`_attend`) and the output
    head, which computes only the half each row needs (:meth:`_head`). The spec's I/O is unchanged.

    Why one base: the ONNX Runtime variant (:class:`GqaDecodeStepGraph`, one GQA node per layer) and
    the AOTInductor variant (``hita.export.aoti.PrefixDecodeStepGraph``, attention over the filled
    prefix) differ only in the attention call, so the embedding choice, the position treatment, the
    block structure and the head-half logic live here once. ``forward`` uses the embedding choice,
    ``_row_positions``, ``Attention.project``, ``wo``, the FFN and the norms of the model itself; the
    export driver validates every subclass against the plain wrapper (``HitaGPT.decode``), so any
    drift fails the export.

    Args:
        gpt: the GPT (eval).
        pos128: embedding rule at position Nh, baked in.
    """

    head_holistic: Tensor
    head_patch: Tensor

    def __init__(self, gpt: "HitaGPT", pos128: str = "reference"):
        super().__init__(gpt, pos128)
        v = gpt.cfg.vocab_size
        w = gpt.output.weight.detach()  # (2V, dim): [holistic | patch]
        # Separate constants so each branch reads its own weight (an ONNX If branch its own
        # initializer): no slicing or gathering of the head at run time.
        self.register_buffer("head_holistic", w[:v].clone(), persistent=False)  # (V, dim)
        self.register_buffer("head_patch", w[v:].clone(), persistent=False)  # (V, dim)

    def _attention_context(self, position: Tensor, batch: int, slots: int) -> Any:
        """Per-step values every layer's :meth:`_attend` shares (computed once per forward)."""
        return None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor,
                ctx: Any) -> tuple[Tensor, Tensor, Tensor]:
        """One layer's attention step: q, k, v ``(B, H, 1, hd)`` (positioned) and the layer's cache
        ``(B, H, S, hd)`` -> the attention output ``(B, 1, H*hd)`` (before ``wo``) and the written
        caches."""
        raise NotImplementedError

    def forward(self, token: Tensor, position: Tensor, past_key_values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        gpt, cfg = self.gpt, self.gpt.cfg
        nh = cfg.n_holistic
        first_tok = nh if self.pos128 == "reference" else nh + 1  # as HitaGPT.decode
        use_slot = (position < first_tok).view(-1, 1)  # (R, 1)
        x = torch.where(use_slot, gpt.slot_embeddings(token), gpt.tok_embeddings(token))  # (B, dim)
        x = gpt.tok_dropout(x[:, None])  # (B, 1, dim)
        pe = gpt._row_positions(position)
        ctx = self._attention_context(position, token.shape[0], past_key_values[0].shape[2])
        new_k, new_v = [], []
        for layer, kc, vc in zip(gpt.layers, past_key_values[0::2], past_key_values[1::2]):
            att = layer.attention
            q, k, v = att.project(layer.attention_norm(x), pe)  # (B, H, 1, hd) each, positioned
            y, kc, vc = self._attend(q, k, v, kc, vc, position, ctx)  # y: (B, 1, H*hd)
            h = x + att.resid_dropout(att.wo(y))  # (B, 1, dim)
            x = h + layer.feed_forward(layer.ffn_norm(h))
            new_k.append(kc)
            new_v.append(vc)
        h = gpt.norm(x[:, 0])  # (B, dim)
        return (self._head(h, position).to(h.dtype), *_interleave(new_k, new_v))

    def _head(self, h: Tensor, position: Tensor) -> Tensor:
        """Logits ``[B, V]`` from the half of the head each row needs: ``torch.cond`` (an ONNX
        ``If``, an AOTInductor branch) over the two halves, so a step reads half the head's bytes."""
        hol = position < self.gpt.cfg.n_holistic  # (R,)
        w_hol, w_patch = self.head_holistic, self.head_patch

        def holistic(h: Tensor) -> Tensor:
            return F.linear(h, w_hol).float()  # (B, V)

        def patch(h: Tensor) -> Tensor:
            return F.linear(h, w_patch).float()  # (B, V)

        if isinstance(position.shape[0], int) and position.shape[0] == 1:  # one position: one half
            return torch.cond(hol.all(), holistic, patch, (h,))

        def mixed(h: Tensor) -> Tensor:  # rows on both sides of Nh (in-flight batching only)
            return torch.where(hol.view(-1, 1), holistic(h), patch(h))

        def not_all_holistic(h: Tensor) -> Tensor:
            return torch.cond((~hol).all(), patch, mixed, (h,))

        return torch.cond(hol.all(), holistic, not_all_holistic, (h,))


class GqaDecodeStepGraph(LayerwiseDecodeStepGraph):
    """The decode step with GQA attention and the needed head half; the spec's I/O unchanged.

    :class:`LayerwiseDecodeStepGraph` with the attention call replaced by
    :func:`gqa_decode_attention` (one ``GroupQueryAttention`` node per layer in ONNX).

    Args:
        gpt: the GPT (float32, eval).
        pos128: embedding rule at position Nh, baked in.
    """

    def _attention_context(self, position: Tensor, batch: int, slots: int) -> tuple[Tensor, Tensor, float]:
        seqlens_k = position.to(torch.int32).expand(batch)  # (B,): slot written = last slot attended
        total = (position.max() + 1).to(torch.int32)  # (): GQA's batch bound
        return seqlens_k, total, 1.0 / math.sqrt(self.gpt.cfg.head_dim)

    def _attend(self, q, k, v, k_cache, v_cache, position, ctx):
        seqlens_k, total, scale = ctx
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))  # (B, 1, H*hd) each
        return gqa_decode_attention(q, k, v, k_cache, v_cache, seqlens_k, total, self.gpt.cfg.n_head, scale)


# ----------------------------------------------------------------------------------------------
# Running and checking the exported graph in ONNX Runtime
# ----------------------------------------------------------------------------------------------


def inplace_runner(sess, spec: ExportSpec):
    """A validation runner (``feed -> [logits, present...]``) that runs the GQA decode step with the
    cache bound in place, on copies of the fed caches. In place is how runtimes run it and the only
    binding in which every present slot is defined (separate buffers leave the slots beyond the
    prefix zero), so this is what the driver compares slot by slot with eager."""

    def run(feed: Mapping[str, Tensor]) -> list[Tensor]:
        np_feed = {k: v.detach().cpu().numpy() for k, v in feed.items()}
        binding, _, logits, caches = bind_inplace(sess, spec, np_feed)
        sess.run_with_iobinding(binding)
        return [torch.from_numpy(logits.numpy().copy())] + [torch.from_numpy(c.numpy().copy()) for c in caches]

    return run


def check_gqa_step(sess, spec: ExportSpec, feed: Mapping[str, Tensor], positions: Sequence[int]) -> dict[str, bool]:
    """Facts about the GQA decode step the executor relies on, over consecutive steps at
    ``positions`` (one position for all rows) from ``feed``:

    - ``kv_inplace_verified``: the cache bound in place gives bit-identical logits and prefix slots
      ``0..pos`` to separate past/present buffers (so in-place and ping-pong executors agree);
    - ``prefix_only_verified``: NaN written into every slot beyond the position of the first step
      leaves that step's logits bit-identical (attention reads only the filled prefix).
    """
    past = spec.input_names[2:]
    np_feed = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feed.items()}
    b = np_feed["token"].shape[0]
    per_row = spec.inputs[1].shape == ("batch",)

    def at(p: int) -> np.ndarray:
        return np.full((b if per_row else 1,), p, dtype=np.int64)

    separate, same = dict(np_feed), True
    binding, position, logits, caches = bind_inplace(sess, spec, dict(np_feed, position=at(positions[0])))
    for p in positions:
        separate["position"] = at(p)
        outs = sess.run(None, separate)  # separate buffers: present slots beyond p come back zero
        separate.update(zip(past, outs[1:]))
        position.update_inplace(at(p))
        sess.run_with_iobinding(binding)
        same &= np.array_equal(logits.numpy(), outs[0])
        same &= all(np.array_equal(c.numpy()[:, :, : p + 1], o[:, :, : p + 1]) for c, o in zip(caches, outs[1:]))
    first = positions[0]
    garbage = dict(np_feed, position=at(first))
    for n in past:
        garbage[n] = garbage[n].copy()
        garbage[n][:, :, first + 1:] = np.nan
    clean = sess.run(None, dict(np_feed, position=at(first)))[0]
    prefix_only = np.array_equal(sess.run(None, garbage)[0], clean)
    return {"kv_inplace_verified": bool(same), "prefix_only_verified": bool(prefix_only)}
