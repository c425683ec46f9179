"""The step-executor interface: what a backend must do so the shared decode loop can drive it.

An executor owns a GPT (as eager modules, an ONNX session, a TensorRT engine, ...) plus its KV cache,
and optionally a tokenizer decoder. It runs exactly one forward per call and never samples: the loop
(``runtimes/loop.py``) does CFG mixing, filtering and the draw (``runtimes/sampling.py``) for every
backend alike, so two executors that return equal logits generate equal tokens.

Call sequence for one batch of ``B`` rows (``B = 2n`` with CFG: n conditional rows, then n null-class
rows)::

    ex.start(B)
    logits = ex.prefill(class_ids)                  # position 0 -> logits for holistic token 0
    for pos in 1 .. n_holistic + n_patch - 1:
        logits = ex.decode(prev_tokens, pos)        # feeds token pos-1 at position pos
    images = ex.decode_image(holistic_ids, patch_ids)

What an executor declares so the loop, servers and GPUs can use it without knowing its backend:

- ``device``: where its logits live. The loop casts them to float32 *there* and samples there
  (:func:`~hita.runtimes.sampling.sample` runs on any device), so a GPU executor never syncs on a
  host copy per token; ``sampling="host"`` (parity mode) copies float32 logits to the CPU instead.
- ``max_rows``: the most rows one :meth:`StepExecutor.start` accepts (an engine's profile maximum),
  ``None`` for no limit. The loop splits a request into chunks that fit, CFG rows counted; every
  image keeps its noise row, so chunking never changes an image.
- ``batch_buckets``: row counts the executor is built or captured for (CUDA graphs, engine
  profiles); ``()`` means any. The loop prefers the largest bucket that fits when it chunks.
- :meth:`StepExecutor.kv_cache_bytes`: memory one sequence of ``rows`` rows needs, so callers can
  refuse a batch that cannot fit before allocating it.
- ``row_positions``: whether :meth:`StepExecutor.decode` takes one position per row and the batch
  can change between steps (:meth:`StepExecutor.keep_rows`, :meth:`StepExecutor.add_rows`). A server
  uses that for in-flight batching: requests that arrive while others decode join at the next step
  (prefill for the newcomers, decode for the rest) and finished rows leave. Executors without it
  serve batches that start together (the server then admits newcomers only at sequence start).

In-flight call sequence (``row_positions`` executors)::

    logits_new = ex.add_rows(class_ids)             # prefill newcomers at position 0, appended last
                                                    # (to an empty or a running batch)
    logits = ex.decode(tokens, positions)           # positions int64 [B]: each row's own step
    ex.keep_rows(rows)                              # drop finished rows (ascending row indices)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from hita.config import GPTConfig, TokenizerConfig

__all__ = ["StepExecutor", "validate_class_ids", "check_positions", "check_keep_rows"]


class StepExecutor(ABC):
    """One forward step of the Hita GPT (and the tokenizer decoder) on some backend.

    Attributes:
        gpt_config: the :class:`~hita.config.GPTConfig` of the GPT this executor runs (token layout,
            vocab size, number of classes, null class).
        tokenizer_config: the :class:`~hita.config.TokenizerConfig` of the decoder, or ``None`` when
            the executor cannot decode images.
        name: short backend name for reports (``"torch-eager"``, ``"onnxruntime"``, ...).

    Tensors: inputs may arrive on the CPU; an executor moves them to its device. Returned logits
    may live on the CPU or the executor's device and have the GPT's dtype; the loop casts them.
    """

    gpt_config: GPTConfig
    tokenizer_config: TokenizerConfig | None
    name: str
    device: torch.device = torch.device("cpu")
    max_rows: int | None = None
    batch_buckets: tuple[int, ...] = ()
    kv_itemsize: int = 4
    row_positions: bool = False

    def kv_cache_bytes(self, rows: int) -> int:
        """Bytes of the KV cache for ``rows`` rows (k and v, every layer, the static length)."""
        c = self.gpt_config
        return 2 * c.n_layer * rows * c.n_head * c.cache_len * c.head_dim * self.kv_itemsize

    def chunk_rows(self, rows_per_image: int) -> int | None:
        """Images per chunk so that ``images * rows_per_image`` fits ``max_rows`` (largest bucket
        that fits when buckets are declared); ``None`` when there is no limit.

        Raises:
            ValueError: not even one image fits.
        """
        fits = [b for b in self.batch_buckets if b % rows_per_image == 0 and
                (self.max_rows is None or b <= self.max_rows)]
        cap = max(fits) if fits else self.max_rows
        if cap is None:
            return None
        if cap < rows_per_image:
            raise ValueError(
                f"{self.name} runs at most {cap} rows per step, and one image needs {rows_per_image} "
                "(CFG doubles the rows); rebuild the engine with a larger batch or set --cfg-scale 1"
            )
        return cap // rows_per_image

    @abstractmethod
    def start(self, batch: int) -> None:
        """Allocate (or reset) the KV cache for a new sequence of ``batch`` rows.

        Args:
            batch: number of rows, CFG null-class rows included.
        """

    @abstractmethod
    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Run position 0 (the class token) for every row.

        Args:
            class_ids: int64 ``[B]``; ids in ``[0, num_classes]`` (``num_classes`` = CFG null class).
        Returns:
            logits ``[B, V]`` of the holistic head (predicting holistic token 0).
        """

    @abstractmethod
    def decode(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Feed one token per row at sequence position ``pos`` and return the next-token logits.

        Args:
            tokens: int64 ``[B]``, the token at sequence index ``pos - 1`` (holistic token ``pos - 1``
                while ``pos <= n_holistic``, else patch token ``pos - 1 - n_holistic``).
            pos: position in ``1 .. n_holistic + n_patch - 1`` for every row, or (``row_positions``
                executors only) an int64 tensor ``[B]`` of one such position per row.
        Returns:
            logits ``[B, V]`` of the head that each row's position selects (holistic if
            ``pos < n_holistic``, else patch), predicting sequence index ``pos``.
        """

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the running batch, in this order (in-flight batching: finished
        or cancelled sequences leave). ``row_positions`` executors implement it.

        Args:
            rows: int64 ``[B']``, strictly increasing indices into the current batch; may be empty.
        """
        raise NotImplementedError(f"{self.name} cannot change a running batch (row_positions is False)")

    def add_rows(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Prefill new sequences (position 0) and append their rows after the running ones, whose
        caches are untouched. ``row_positions`` executors implement it.

        Args:
            class_ids: int64 ``[n]``, as in :meth:`prefill` (CFG null rows included by the caller).
        Returns:
            logits ``[n, V]`` of the holistic head for the new rows (a tensor the next call does not
            overwrite).
        """
        raise NotImplementedError(f"{self.name} cannot change a running batch (row_positions is False)")

    @abstractmethod
    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """Turn tokens into pixels with the tokenizer decoder.

        Args:
            holistic_ids: int64 ``[n, n_holistic]``.
            patch_ids: int64 ``[n, n_patch]``.
        Returns:
            float32 ``[n, 3, H, W]``, unclamped, nominally in ``[-1, 1]``.
        """


def validate_class_ids(class_ids: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """Check user class ids and return them as an int64 CPU tensor.

    The null class (``num_classes``) is reserved for the CFG unconditional rows, which the loop adds
    itself, so it is rejected here.

    Args:
        class_ids: 1-D tensor or sequence of ints.
        num_classes: number of real classes of the GPT (``gpt_config.num_classes``).
    Returns:
        int64 CPU tensor ``[n]``.
    Raises:
        ValueError: empty input, wrong shape or dtype, or an id outside ``[0, num_classes)``.
    """
    if isinstance(class_ids, torch.Tensor):
        if class_ids.dtype.is_floating_point or class_ids.dtype.is_complex or class_ids.dtype == torch.bool:
            raise ValueError(f"class ids must be integers, got a {class_ids.dtype} tensor")
        ids = class_ids.detach().to("cpu", torch.int64)
    else:
        values = list(class_ids)
        if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in values):
            raise ValueError(f"class ids must be integers, got {values!r}")
        ids = torch.tensor([v.__index__() for v in values], dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"class ids must be a 1-D list (one id per image), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("no class ids given; pass at least one class id per image to generate")
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class id {int(bad[0])} out of range [0, {num_classes}) for this GPT; "
            f"use ids 0..{num_classes - 1} (id {num_classes} is the CFG null class, added by the loop)"
        )
    return ids


def check_positions(pos: int | torch.Tensor, rows: int, last: int, name: str) -> int | torch.Tensor:
    """Validate a decode position: an int for every row, or an int64 tensor ``[rows]`` per row.

    Args:
        pos: what :meth:`StepExecutor.decode` received.
        rows: the running batch size.
        last: the last valid position (``seq_len - 1``).
        name: the executor's name, for messages.
    Returns:
        ``pos`` as an ``int``, or as an int64 CPU tensor ``[rows]``.
    Raises:
        ValueError: out of range, wrong shape or dtype.
    """
    if not isinstance(pos, torch.Tensor):
        if not 1 <= int(pos) <= last:
            raise ValueError(f"decode position {pos} out of range [1, {last}] for this GPT")
        return int(pos)
    if pos.dtype != torch.int64 or pos.dim() != 1 or pos.shape[0] != rows:
        raise ValueError(f"{name}.decode per-row positions must be int64 [{rows}], got {pos.dtype} {tuple(pos.shape)}")
    p = pos.detach().cpu()
    if rows and not (1 <= int(p.min()) and int(p.max()) <= last):
        raise ValueError(f"decode positions {p.tolist()} out of range [1, {last}] for this GPT")
    return p


def check_keep_rows(rows: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate :meth:`StepExecutor.keep_rows` indices: int64, 1-D, strictly increasing, in range.

    Returns:
        ``rows`` as an int64 CPU tensor.
    Raises:
        ValueError: otherwise.
    """
    r = torch.as_tensor(rows).detach().cpu()
    if r.dtype != torch.int64 or r.dim() != 1:
        raise ValueError(f"{name}.keep_rows expects int64 row indices [k], got {r.dtype} {tuple(r.shape)}")
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= batch or bool((r[1:] <= r[:-1]).any())):
        raise ValueError(f"{name}.keep_rows needs strictly increasing indices in [0, {batch}), got {r.tolist()}")
    return r
