"""Thin ``nn.Module`` wrappers that give each exported graph its named, flat tensor I/O.

Each wrapper calls the model's pure inference functions (``HitaGPT.prefill`` / ``decode`` with
``inplace=False``, ``HitaTokenizer.decode``) and nothing else: no math lives here, so an exported
graph computes exactly what eager PyTorch computes. What the wrappers add is the calling convention
of the :mod:`~hita.export.spec` specs: caches flattened to ``k0, v0, k1, v1, ...`` in spec order, the
position as an int64 ``[1]`` tensor (or ``[B]``, one per row, for in-flight batching: the same
wrapper, traced with the spec's position shape), the pos128 rule fixed at construction, and (for prefill) the
zero cache allocated inside the graph so a runtime feeds only class ids.

:meth:`SpecGraph.args` turns a ``{name: tensor}`` feed into the positional arguments of
``forward``; exporters and validators use it so that no one reorders tensors by hand.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from torch import Tensor, nn

from .spec import DECODE_STEP, DECODER, PREFILL, ExportSpec

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["SpecGraph", "DecoderGraph", "PrefillGraph", "DecodeStepGraph", "build_graph"]


def _interleave(k: list[Tensor], v: list[Tensor]) -> tuple[Tensor, ...]:
    """[k0, k1, ...], [v0, v1, ...] -> (k0, v0, k1, v1, ...): the spec's cache order."""
    return tuple(t for pair in zip(k, v) for t in pair)


class SpecGraph(nn.Module):
    """Base: a module whose ``forward`` takes the spec's inputs and returns its outputs in order."""

    graph_name: str

    def args(self, feed: Mapping[str, Tensor], spec: ExportSpec) -> tuple:
        """Positional ``forward`` arguments from a ``{input name: tensor}`` feed."""
        return tuple(feed[n] for n in spec.input_names)

    def dynamic_shapes(self, spec: ExportSpec, dims: Mapping[str, object] | object) -> tuple:
        """``torch.export`` dynamic shapes matching :meth:`args`: ``{axis: Dim}`` per tensor
        (``None`` for fully static tensors).

        Args:
            spec: the graph's spec.
            dims: axis name -> ``torch.export.Dim``, or one ``Dim`` used for every dynamic axis
                (the hita specs have a single one, ``batch``).
        """
        pick = dims.__getitem__ if isinstance(dims, Mapping) else (lambda _name: dims)
        return tuple({a: pick(n) for a, n in t.dynamic_axes.items()} or None for t in spec.inputs)


class DecoderGraph(SpecGraph):
    """``holistic_ids [B, Nh], patch_ids [B, Np] -> image [B, 3, H, W]`` float32 (unclamped)."""

    graph_name = DECODER

    def __init__(self, tokenizer: "HitaTokenizer"):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, holistic_ids: Tensor, patch_ids: Tensor) -> Tensor:
        return self.tokenizer.decode(holistic_ids, patch_ids).float()  # (B, 3, H, W)


class PrefillGraph(SpecGraph):
    """``class_ids [B] -> logits [B, V], present.{i}.key/value [B, H, S, hd]``.

    The zero cache is made inside the graph with the batch taken from ``class_ids``; its dtype is
    the GPT's weight dtype.
    """

    graph_name = PREFILL

    def __init__(self, gpt: "HitaGPT"):
        super().__init__()
        self.gpt = gpt

    def forward(self, class_ids: Tensor) -> tuple[Tensor, ...]:
        k, v = self.gpt.new_caches(class_ids.shape[0], device=class_ids.device)  # n_layer x (B, H, S, hd)
        logits, k, v = self.gpt.prefill(class_ids, k, v, inplace=False)           # (B, V)
        return (logits, *_interleave(k, v))


class DecodeStepGraph(SpecGraph):
    """``token [B], position [1] or [B], past_key_values.* -> logits [B, V], present.*``.

    Caches arrive as one tuple ``(k0, v0, k1, v1, ...)`` because ``n_layer`` varies by preset and
    ``forward`` cannot have a named argument per cache; the exporter names them from the spec.

    Args:
        gpt: the GPT.
        pos128: embedding rule at position n_holistic (``"reference"`` or ``"consistent"``), baked
            into the graph.
    """

    graph_name = DECODE_STEP

    def __init__(self, gpt: "HitaGPT", pos128: str = "reference"):
        super().__init__()
        self.gpt = gpt
        self.pos128 = pos128

    def forward(self, token: Tensor, position: Tensor, past_key_values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        k, v = list(past_key_values[0::2]), list(past_key_values[1::2])
        logits, k, v = self.gpt.decode(token, position, k, v, pos128=self.pos128, inplace=False)  # (B, V)
        return (logits, *_interleave(k, v))

    def args(self, feed: Mapping[str, Tensor], spec: ExportSpec) -> tuple:
        names = spec.input_names
        return feed[names[0]], feed[names[1]], tuple(feed[n] for n in names[2:])

    def dynamic_shapes(self, spec: ExportSpec, dims: Mapping[str, object] | object) -> tuple:
        flat = super().dynamic_shapes(spec, dims)
        return flat[0], flat[1], tuple(flat[2:])


def build_graph(name: str, gpt: "HitaGPT", tokenizer: "HitaTokenizer", pos128: str = "reference") -> SpecGraph:
    """The wrapper for graph ``name`` (in eval mode; wrappers share the given modules)."""
    if name == DECODER:
        return DecoderGraph(tokenizer).eval()
    if name == PREFILL:
        return PrefillGraph(gpt).eval()
    if name == DECODE_STEP:
        return DecodeStepGraph(gpt, pos128).eval()
    raise ValueError(f"unknown graph {name!r}; graphs are {DECODER}, {PREFILL}, {DECODE_STEP}")
