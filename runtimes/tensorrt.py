"""TensorRT step executor over ``hita export --engine tensorrt`` folders, with CUDA-graph decode.

Opening a folder verifies, before TensorRT sees a byte: the manifest and every engine file (size,
sha256, pin) and that the engines were built for this TensorRT version and this GPU
(:func:`~hita.export.tensorrt.check_engine_host`; a foreign engine is refused in one line with the
rebuild command). Engines are deserialized from the bytes that were hashed.

Per batch (``start``): the rows pick an optimisation profile, and every buffer is allocated once on
the GPU: class ids, token, position, logits and the KV cache. The decode step's cache is either
aliased (``TensorScatter`` engines: TensorRT's KV-cache update writes the slot in place, the output
*is* the input buffer) or ping-ponged between two sets. Each step writes the token and position
into their fixed buffers and replays a CUDA graph of ``execute_async_v3`` (one graph in place, two
for ping-pong), captured on a private stream after one warm-up run (TensorRT's rule after a shape
change). Logits stay on the GPU: the shared loop samples there, so no step syncs with the host.

Engines built from a decode step with ``position [batch]`` (``row_positions`` exports) run here
with every row at one position (the buffer is filled per step); changing a running batch
(``add_rows`` / ``keep_rows``) is not implemented for TensorRT yet, so ``row_positions`` stays
False and ``hita serve`` admits newcomers at sequence start.

TensorRT and CUDA are needed only here, imported lazily.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hita.export.errors import ArtifactError
from hita.export.manifest import check_unchanged, load_manifest
from hita.export.spec import DECODE_STEP, DECODER, DTYPES, PREFILL, graph_specs, has_row_positions

from .executor import StepExecutor, check_positions

__all__ = ["TensorRTExecutor"]


class TensorRTExecutor(StepExecutor):
    """:class:`~hita.runtimes.executor.StepExecutor` over ``decoder.engine``, ``prefill.engine`` and
    ``decode_step.engine``.

    Args:
        artifacts_dir: folder written by :func:`hita.export.tensorrt.export_tensorrt` or
            :func:`~hita.export.tensorrt.build_from_onnx`.
        device: the CUDA device (``"cuda"``, ``"cuda:1"``).
        cuda_graphs: capture and replay the decode step (``False``: plain ``execute_async_v3``).
        verify_files: hash every engine on load (``False``: sizes only).
        expect_manifest_sha256: pin: refuse any manifest but this one (engines are code).
    """

    name = "tensorrt"

    def __init__(self, artifacts_dir: str | os.PathLike, device: str = "cuda", cuda_graphs: bool = True,
                 verify_files: bool = True, expect_manifest_sha256: str | None = None) -> None:
        from hita.export.tensorrt import check_engine_host
        from hita.export.trt_engine import TrtEngine

        self.artifacts_dir = Path(artifacts_dir)
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the tensorrt runtime runs on a CUDA GPU, got device {device!r}; use --device cuda")
        fingerprints: dict = {}
        self.manifest = load_manifest(self.artifacts_dir, expect_engine="tensorrt", verify_files=verify_files,
                                      expect_sha256=expect_manifest_sha256, fingerprints=fingerprints)
        check_engine_host(self.manifest, self.artifacts_dir)
        self.gpt_config, self.tokenizer_config = self.manifest.gpt_cfg, self.manifest.tokenizer_cfg
        self.specs = graph_specs(self.tokenizer_config, self.gpt_config, dtype=self.manifest.precision,
                                 max_batch=int(self.manifest.options.get("max_batch", 16)),
                                 row_positions=has_row_positions(self.manifest.signature(DECODE_STEP)))
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self._engines = {g: TrtEngine((self.artifacts_dir / self.manifest.graph_file(g)).read_bytes(),
                                      self.manifest.graph_file(g), self.device)
                         for g in (DECODER, PREFILL, DECODE_STEP)}
        check_unchanged(self.artifacts_dir, fingerprints)
        step = self._engines[DECODE_STEP]
        self._aliased = {o: a for o in step.outputs if (a := step.aliased_input(o)) is not None}
        self.kv_binding = "inplace" if self._aliased else "pingpong"
        rows = [p[step.inputs[0]] for p in step.profiles]
        self.max_rows: int = max(r[2][0] for r in rows)
        self.batch_buckets = tuple(sorted(r[2][0] for r in rows))
        self.kv_itemsize = DTYPES[self.manifest.precision].itemsize
        self.cuda_graphs = cuda_graphs
        self._stream = torch.cuda.Stream(self.device)
        self._batch = 0
        self._graphs: list[Any] = []

    # -- buffers -----------------------------------------------------------------------------

    def start(self, batch: int) -> None:
        """Pick the profile for ``batch`` rows, allocate every buffer and bind it. See
        :meth:`StepExecutor.start`."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if batch > int(self.max_rows or 0):
            raise ValueError(f"{self.name}: {batch} rows exceed the engines' profile maximum {self.max_rows}; "
                             "rebuild with a larger --max-batch or generate fewer images per call")
        self._batch, self._graphs, self._kv = 0, [], []  # free the old cache before allocating the new one
        pre, dec = self.specs[PREFILL], self.specs[DECODE_STEP]
        sizes = {"batch": batch}

        def empty(t) -> torch.Tensor:
            return torch.empty(t.concrete_shape(sizes), dtype=t.torch_dtype, device=self.device)

        self._class_ids = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._token = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._position = empty(dec.inputs[1]).fill_(1)                        # [1] or [B]
        self._logits = empty(dec.outputs[0])                                   # [B, V]
        n_sets = 1 if self._aliased else 2
        self._kv = [[empty(t) for t in dec.inputs[2:]] for _ in range(n_sets)]  # each [B, H, S, hd]
        with torch.cuda.stream(self._stream):
            for name in (PREFILL, DECODE_STEP):
                eng = self._engines[name]
                eng.select(eng.profile_for(batch, eng.inputs[0]), self._stream)
            self._engines[PREFILL].bind({"class_ids": self._class_ids, pre.output_names[0]: self._logits,
                                         **dict(zip(pre.output_names[1:], self._kv[0]))})
        self._cur, self._batch, self._prefilled = 0, batch, False

    def _bind_step(self, src: int) -> None:
        dec = self.specs[DECODE_STEP]
        dst = (src + 1) % len(self._kv)
        self._engines[DECODE_STEP].bind({
            "token": self._token, "position": self._position, dec.output_names[0]: self._logits,
            **dict(zip(dec.input_names[2:], self._kv[src])), **dict(zip(dec.output_names[1:], self._kv[dst]))})

    def _capture(self) -> None:
        """One CUDA graph per cache direction, each after a warm-up run (TensorRT sizes its
        resources on the first run after a shape change; the graph bakes addresses and shapes in)."""
        step = self._engines[DECODE_STEP]
        for src in range(len(self._kv)):
            self._bind_step(src)
            step.execute(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                step.execute(self._stream)
            self._graphs.append(graph)

    def _rows(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self._batch == 0:
            raise RuntimeError(f"{self.name}: call start(batch) before {what}")
        if t.dim() != 1 or t.shape[0] != self._batch:
            raise ValueError(f"{self.name}.{what} expects [{self._batch}] ids, got shape {tuple(t.shape)}")
        return t

    # -- GPT steps ---------------------------------------------------------------------------

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.prefill`. Logits ``[B, V]`` on the GPU (valid until the next call)."""
        ids = self._rows(class_ids, "prefill")
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._class_ids.copy_(ids, non_blocking=True)
            self._engines[PREFILL].execute(self._stream)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._cur, self._prefilled = 0, True
        return self._logits

    def decode(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode`. Logits ``[B, V]`` on the GPU (valid until the next call).
        One position for every row (``row_positions`` is False here)."""
        ids = self._rows(tokens, "decode")
        if not self._prefilled:
            raise RuntimeError(f"{self.name}: call prefill(class_ids) after start(batch) and before decode")
        pos = check_positions(pos, self._batch, self.gpt_config.seq_len - 1, self.name)
        if isinstance(pos, torch.Tensor):
            raise ValueError(f"{self.name} runs every row at one position; per-row positions are not implemented here")
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._token.copy_(ids, non_blocking=True)
            self._position.fill_(int(pos))
            if self.cuda_graphs:
                if not self._graphs:
                    self._capture()
                self._graphs[self._cur].replay()
            else:
                self._bind_step(self._cur)
                self._engines[DECODE_STEP].execute(self._stream)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._cur = (self._cur + 1) % len(self._kv)
        return self._logits

    # -- pixels ------------------------------------------------------------------------------

    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode_image`. Float32 ``[n, 3, H, W]`` on the GPU."""
        cfg = self.manifest.tokenizer_cfg
        if holistic_ids.dim() != 2 or patch_ids.dim() != 2 or holistic_ids.shape[1] != cfg.n_holistic \
                or patch_ids.shape[1] != cfg.n_patch or holistic_ids.shape[0] != patch_ids.shape[0]:
            raise ValueError(f"decode_image expects holistic_ids [n, {cfg.n_holistic}] and patch_ids "
                             f"[n, {cfg.n_patch}], got {tuple(holistic_ids.shape)} and {tuple(patch_ids.shape)}")
        eng = self._engines[DECODER]
        limit = eng.profiles[-1][eng.inputs[0]][2][0]
        parts = []
        for i in range(0, holistic_ids.shape[0], limit):  # the decoder profile caps images per call
            feed = {"holistic_ids": holistic_ids[i:i + limit], "patch_ids": patch_ids[i:i + limit]}
            (image,) = eng.run(feed, "holistic_ids", self._stream)
            parts.append(image)
        return torch.cat(parts)
