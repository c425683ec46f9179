"""Eager PyTorch step executor: the reference backend every other backend is compared against.

Runs :class:`~hita.models.gpt.HitaGPT` step by step with a static KV cache that lives in this object
(allocated by ``gpt.new_caches`` in :meth:`TorchExecutor.start`, updated in place), and decodes
images with :class:`~hita.models.tokenizer.HitaTokenizer` in float32 (the reference keeps the
tokenizer in fp32 even when the GPT runs in bf16, spec 5). Everything runs under
``torch.inference_mode``. No sampling happens here (see ``runtimes/loop.py``).

On CUDA, ``cuda_graphs=True`` captures the decode step once per batch (gpt-fast style): the cache
is static and written in place, the token and position live in fixed device buffers, and the step
has no data-dependent host control flow (positions act through gathers and masks), so one graph
serves all 568 steps. Each step is then a buffer copy and one graph replay instead of hundreds of
kernel launches from Python, which is what bounds small-batch decode on a GPU.

In-flight batching (``row_positions``): ``decode`` also takes one position per row, ``add_rows``
prefills newcomers into fresh caches and appends them, ``keep_rows`` drops finished rows. A
per-row step runs eagerly even with ``cuda_graphs`` (the captured graph bakes in one batch and a
``[1]`` position), and any change of the batch drops the captured graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hita.config import check_pair

from .executor import StepExecutor, check_keep_rows, check_positions

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["TorchExecutor"]

_POS128 = ("reference", "consistent")


class TorchExecutor(StepExecutor):
    """:class:`StepExecutor` over eager torch modules.

    Args:
        gpt: the GPT. It is moved to ``device``/``dtype`` and put in eval mode (in place: the
            caller's module is changed).
        tokenizer: the tokenizer for :meth:`decode_image`, or ``None`` for token-only use. Moved to
            ``device`` in float32 and put in eval mode.
        device: torch device for both models and the cache.
        dtype: GPT weight and KV-cache dtype (the reference evaluates in bf16).
        pos128: embedding table for the token fed at position ``n_holistic``: ``"reference"``
            (``tok_embeddings``, what the released generation code does and what the published FIDs
            used) or ``"consistent"`` (``slot_embeddings``, what training does); spec 8.1.
    """

    name = "torch-eager"
    row_positions = True

    def __init__(
        self,
        gpt: "HitaGPT",
        tokenizer: "HitaTokenizer | None" = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        pos128: str = "reference",
        cuda_graphs: bool = False,
    ) -> None:
        if pos128 not in _POS128:
            raise ValueError(f"pos128 must be one of {_POS128}, got {pos128!r} (see spec section 8.1)")
        if tokenizer is not None:
            check_pair(tokenizer.cfg, gpt.cfg)
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_itemsize = dtype.itemsize
        self.pos128 = pos128
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device; drop it on the CPU")
        self.cuda_graphs = cuda_graphs
        self._graph: torch.cuda.CUDAGraph | None = None
        self.gpt = gpt.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = None if tokenizer is None else tokenizer.to(self.device, torch.float32).eval()
        self.gpt_config = gpt.cfg
        self.tokenizer_config = None if tokenizer is None else tokenizer.cfg
        self._k: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] | None = None
        self._batch = 0

    # -- GPT steps ---------------------------------------------------------------------------

    def start(self, batch: int) -> None:
        """Allocate zeroed caches for ``batch`` rows. See :meth:`StepExecutor.start`."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self._k = self._v = None  # free the old cache (and graph) before allocating the new one
        self._graph = None
        with torch.inference_mode():
            self._k, self._v = self.gpt.new_caches(batch, dtype=self.dtype, device=self.device)
            self._tok_buf = torch.zeros(batch, dtype=torch.int64, device=self.device)   # [B]
            self._pos_buf = torch.ones(1, dtype=torch.int64, device=self.device)        # [1]
        self._batch = batch

    def _check_rows(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self._k is None or self._batch == 0:
            raise RuntimeError(f"{self.name}: call start(batch) before {what}")
        if t.dim() != 1 or t.shape[0] != self._batch:
            raise ValueError(
                f"{self.name}.{what} expects [{self._batch}] ids (the batch given to start), "
                f"got shape {tuple(t.shape)}"
            )
        return t.to(self.device, torch.int64)

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.prefill`. Returns logits ``[B, V]`` in the GPT dtype."""
        ids = self._check_rows(class_ids, "prefill")                          # [B]
        with torch.inference_mode():
            logits, self._k, self._v = self.gpt.prefill(ids, self._k, self._v, inplace=True)
        return logits                                                          # [B, V]

    def decode(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode`. Returns logits ``[B, V]`` in the GPT dtype."""
        toks = self._check_rows(tokens, "decode")                              # [B]
        pos = check_positions(pos, self._batch, self.gpt_config.seq_len - 1, self.name)
        if isinstance(pos, torch.Tensor):                                      # one position per row
            with torch.inference_mode():
                logits, self._k, self._v = self.gpt.decode(
                    toks, pos.to(self.device), self._k, self._v, pos128=self.pos128, inplace=True
                )
            return logits                                                      # [B, V]
        with torch.inference_mode():
            self._tok_buf.copy_(toks)
            self._pos_buf.fill_(pos)
            if self.cuda_graphs:
                if self._graph is None:
                    self._capture()
                self._graph.replay()
                return self._graph_logits                                      # [B, V], static
            logits, self._k, self._v = self.gpt.decode(
                self._tok_buf, self._pos_buf, self._k, self._v, pos128=self.pos128, inplace=True
            )
        return logits                                                          # [B, V]

    def kv_cache(self) -> list[torch.Tensor]:
        """The live KV cache as ``[k0, v0, k1, v1, ...]``, each ``[B, H, S, hd]`` in the GPT dtype.

        The same order and layout as :meth:`OrtExecutor.kv_cache`, so a caller that records what the
        decode step saw (calibration) reads either executor one way. The tensors are the executor's
        own buffers, returned read-only in spirit: the next :meth:`decode` overwrites them in place
        and :meth:`start` replaces them, so copy what you keep, and never write into them.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        if self._k is None or self._v is None:
            raise RuntimeError(f"{self.name}: no KV cache yet; call start(batch) first")
        return [t for pair in zip(self._k, self._v) for t in pair]

    # -- in-flight batching -------------------------------------------------------------------

    def keep_rows(self, rows: torch.Tensor) -> None:
        """See :meth:`StepExecutor.keep_rows`. The kept rows are copied into new caches."""
        idx = check_keep_rows(rows, self._batch if self._k is not None else 0, self.name).to(self.device)
        with torch.inference_mode():
            if self._k is not None:
                self._k = [c.index_select(0, idx) for c in self._k]                # k x [B', H, S, hd]
                self._v = [c.index_select(0, idx) for c in self._v]
            self._resized(idx.shape[0])

    def add_rows(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.add_rows`. Returns logits ``[n, V]`` in the GPT dtype."""
        if class_ids.dim() != 1 or class_ids.shape[0] < 1:
            raise ValueError(f"{self.name}.add_rows expects class ids [n], n >= 1, got shape {tuple(class_ids.shape)}")
        ids = class_ids.to(self.device, torch.int64)                           # [n]
        with torch.inference_mode():
            k, v = self.gpt.new_caches(ids.shape[0], dtype=self.dtype, device=self.device)
            logits, k, v = self.gpt.prefill(ids, k, v, inplace=True)          # [n, V]
            if self._k is not None and self._batch:
                k = [torch.cat(pair) for pair in zip(self._k, k)]              # [B + n, H, S, hd]
                v = [torch.cat(pair) for pair in zip(self._v, v)]
            self._k, self._v = k, v
            self._resized(k[0].shape[0])
        return logits

    def _resized(self, batch: int) -> None:
        self._graph = None
        self._batch = batch
        self._tok_buf = torch.zeros(batch, dtype=torch.int64, device=self.device)   # [B]
        self._pos_buf = torch.ones(1, dtype=torch.int64, device=self.device)        # [1]

    def _step(self) -> torch.Tensor:
        logits, _, _ = self.gpt.decode(self._tok_buf, self._pos_buf, self._k, self._v, pos128=self.pos128,
                                       inplace=True)
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (allocator and cuBLAS workspaces settle), then capture one step.
        Warm-up runs write the current token's slot, which the real step rewrites with the same
        values, so they leave the cache as it would be."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._step()
        self._graph = graph

    # -- pixels ------------------------------------------------------------------------------

    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode_image`. Returns float32 ``[n, 3, H, W]`` on ``device``."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{self.name} was built without a tokenizer, so it cannot decode images; "
                "pass tokenizer=HitaTokenizer(...) to TorchExecutor or use generate_tokens"
            )
        with torch.inference_mode():
            images = self.tokenizer.decode(
                holistic_ids.to(self.device, torch.int64), patch_ids.to(self.device, torch.int64)
            )
        return images.float()                                                  # [n, 3, H, W]
