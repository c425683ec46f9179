"""ONNX Runtime step executor over an exported artifacts folder (``hita export --engine onnx``).

Trust first: the folder's manifest is verified (every file's size and sha256, format version,
engine kind) before any session opens, and each session's declared inputs/outputs are compared with
the manifest's signature, which is itself re-derived from the recorded configs. A folder that fails
any check is refused with a one-line :class:`ArtifactError` / :class:`SignatureError`.

Speed: the GPT graphs run through IO binding. ``start(batch)`` allocates every buffer once as an
``OrtValue`` on the session's device: the KV cache, the logits, the token, the position. Each step
only writes the token and position in place and calls ``run_with_iobinding``; the cache never
passes through numpy. Two cache strategies:

- ``"inplace"``: one buffer per cache tensor, bound as both ``past_key_values.i`` (input) and
  ``present.i`` (output). Half the memory, no rebinding. ONNX Runtime does not document aliasing
  an input with an output; the exporter checks that it is bit-exact for this graph on the CPU
  provider and records ``kv_inplace_verified`` in the manifest.
- ``"pingpong"``: two buffer sets, A -> B then B -> A, two bindings built once. Always safe.

``"auto"`` (default) picks ``"inplace"`` only where it was verified (CPU provider and the manifest
flag), else ``"pingpong"``.

A folder exported with ``--attention gqa`` (:mod:`hita.export.gqa`) has the same graph I/O: its decode
step derives GroupQueryAttention's ``seqlens_k`` / ``total_sequence_length`` from ``position`` inside
the graph, so it is fed and bound exactly like the plain one. In place, the op writes the new slot
into the bound cache and reads only the filled prefix; ping-pong also works (the op copies the
prefix into the other set, later slots stay zero and are never read). It is exported float32 for
ONNX Runtime's CPU kernel and validated there only, so its default provider is the CPU one.

Logits come back as a torch tensor that shares memory with the bound output ``OrtValue`` (DLPack,
zero-copy on CPU and CUDA, any dtype including bfloat16). It is overwritten by the next call, so a
caller that keeps logits across steps must copy them (the shared loop consumes them at once).

In-flight batching: a folder whose decode step takes ``position [batch]`` (exported with
``row_positions``, as ``hita serve`` does) gives an executor with ``row_positions``: ``decode`` takes
one position per row, ``add_rows`` prefills newcomers in their own session run and
``keep_rows`` drops finished rows. Both re-allocate the bound buffers for the new batch and copy the
kept cache rows over (a join or a leave costs one cache copy; a step costs nothing extra).

``onnxruntime`` is imported only here, when an executor is built. The CPU provider is the default;
with ``onnxruntime-gpu`` installed, the CUDA provider is used first when available, and every
bound buffer lives on the GPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hita.export.errors import ArtifactError, SignatureError
from hita.export.manifest import Manifest, check_unchanged, load_manifest
from hita.export.spec import (
    DECODE_STEP,
    DECODER,
    DTYPES,
    PREFILL,
    GraphSignature,
    TensorSpec,
    graph_specs,
    has_row_positions,
)

from .executor import StepExecutor, check_keep_rows, check_positions

__all__ = ["OrtExecutor", "KV_BINDINGS", "session_signature"]

KV_BINDINGS = ("auto", "inplace", "pingpong")

# ONNX Runtime type strings -> spec dtype names, and spec names -> ONNX TensorProto element types.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}
_ONNX_ELEM = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7, "int32": 6, "bool": 9}
_FIX = "re-run `hita export --engine onnx`"


def session_signature(sess: Any) -> GraphSignature:
    """What an ``InferenceSession`` declares: names, dtypes, shapes (unnamed dynamic dims -> ``"?"``)."""

    def spec(arg: Any) -> TensorSpec:
        dims = tuple("?" if d is None else d for d in arg.shape)
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), dims)

    return GraphSignature(tuple(map(spec, sess.get_inputs())), tuple(map(spec, sess.get_outputs())))


def _default_providers(ort: Any) -> list:
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else [
        "CPUExecutionProvider"
    ]


class OrtExecutor(StepExecutor):
    """:class:`~hita.runtimes.executor.StepExecutor` over ``decoder.onnx``, ``prefill.onnx`` and
    ``decode_step.onnx``.

    Args:
        artifacts_dir: folder written by :func:`hita.export.onnx.export_onnx`.
        providers: ONNX Runtime execution providers, names or ``(name, options)`` pairs, e.g.
            ``[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]``. Default: CUDA
            then CPU when the CUDA provider is available, else CPU.
        threads: intra-op threads per session (``None``: ONNX Runtime's default, one per core).
        kv_binding: ``"auto"``, ``"inplace"`` or ``"pingpong"`` (see the module docstring).
        verify_files: hash every artifact file on load (``False``: sizes only; faster for multi-GB
            folders that were verified before).
        expect_manifest_sha256: pin: refuse any manifest but this one.
    Raises:
        ArtifactError: the folder or manifest fails verification, or a file cannot be loaded.
        SignatureError: a graph's declared I/O differs from the manifest.
        ValueError: unknown ``kv_binding``.
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifacts_dir: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        threads: int | None = None,
        kv_binding: str = "auto",
        verify_files: bool = True,
        expect_manifest_sha256: str | None = None,
    ) -> None:
        if kv_binding not in KV_BINDINGS:
            raise ValueError(f"kv_binding must be one of {KV_BINDINGS}, got {kv_binding!r}")
        self.artifacts_dir = Path(artifacts_dir)
        fingerprints: dict = {}
        self.manifest = load_manifest(self.artifacts_dir, expect_engine="onnx", verify_files=verify_files,
                                      expect_sha256=expect_manifest_sha256, fingerprints=fingerprints)
        self.gpt_config, self.tokenizer_config = _configs(self.manifest)
        self.row_positions = has_row_positions(self.manifest.signature(DECODE_STEP))
        self.specs = graph_specs(self.tokenizer_config, self.gpt_config, dtype=self.manifest.precision,
                                 row_positions=self.row_positions)
        for graph, spec in self.specs.items():
            try:
                spec.signature.check(self.manifest.signature(graph), "manifest.json", spec.description, _FIX)
            except SignatureError as e:
                raise ArtifactError(f"{e}; the recorded configs and graph signatures disagree") from None

        import onnxruntime as ort  # lazy: `import hita` must work without onnxruntime

        self._ort = ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.attention = str(self.manifest.options.get("attention", "plain"))
        if providers is None:  # a gqa step is made and validated for the CPU kernel
            providers = ["CPUExecutionProvider"] if self.attention == "gqa" else _default_providers(ort)
        providers = list(providers)
        self._sessions = {g: self._open(g, so, providers) for g in (DECODER, PREFILL, DECODE_STEP)}
        check_unchanged(self.artifacts_dir, fingerprints)
        self.providers = self._sessions[DECODE_STEP].get_providers()
        self.device_type, self.device_id = _device_of(self._sessions[DECODE_STEP])
        self.device = torch.device(self.device_type, self.device_id) if self.device_type == "cuda" else torch.device("cpu")
        self.kv_itemsize = DTYPES[self.manifest.precision].itemsize
        verified = bool(self.manifest.options.get("kv_inplace_verified")) and self.device_type == "cpu"
        self.kv_binding = ("inplace" if verified else "pingpong") if kv_binding == "auto" else kv_binding
        self._batch = 0
        self._prefilled = False
        # The decoder's activations are large (GPT-B's hita-v: ~2.6 GB for 8 images) and ORT's arena
        # keeps its peak after a run, and grew again on the next (3.1 -> 5.7 GB RSS over two
        # identical 8-image calls). Shrinking the arena after each decoder run returned RSS to the
        # weights alone at the same speed (15.3 / 18.4 s vs 14.9 / 14.6 s, measured). The step
        # graphs keep the arena: small, hot and called hundreds of times per image.
        self._release = ort.RunOptions()
        where = f"gpu:{self.device_id}" if self.device_type == "cuda" else "cpu:0"
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", where)

    # -- loading -----------------------------------------------------------------------------

    def _open(self, graph: str, so: Any, providers: list) -> Any:
        spec = self.specs[graph]
        file = self.manifest.graph_file(graph)
        try:
            sess = self._ort.InferenceSession(str(self.artifacts_dir / file), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NotImplemented types
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if "NOT_IMPLEMENTED" in first:  # intact file, but the provider lacks a kernel (bf16 on CPU)
                raise ArtifactError(
                    f"{file}: providers {providers} cannot run this {self.manifest.precision} graph ({first}); "
                    "use a provider with kernels for that dtype (CUDA) or export another precision"
                ) from None
            raise ArtifactError(f"{file}: ONNX Runtime cannot load it ({first}); {_FIX}") from None
        self.manifest.signature(graph).check(session_signature(sess), file, spec.description, _FIX)
        return sess

    # -- buffers -----------------------------------------------------------------------------

    def _alloc(self, shape: Sequence[int], dtype: str) -> Any:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), _ONNX_ELEM[dtype], self.device_type, self.device_id
        )

    def start(self, batch: int) -> None:
        """Allocate the cache, logits, token and position buffers for ``batch`` rows and build the
        IO bindings. See :meth:`StepExecutor.start`.

        The cache is not zeroed here: ``prefill`` writes the whole cache (its graph starts from zeros).
        """
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self._batch, self._prefilled = 0, False
        # Drop the old bindings and buffers first so two caches never coexist (GBs for large GPTs).
        self._prefill_binding = self._decode_bindings = self._kv = self._logits_t = None
        sizes = {"batch": batch}
        pre, dec = self.specs[PREFILL], self.specs[DECODE_STEP]
        kv_specs = dec.inputs[2:]
        n_sets = 1 if self.kv_binding == "inplace" else 2
        self._kv = [[self._alloc(t.concrete_shape(sizes), t.dtype) for t in kv_specs] for _ in range(n_sets)]
        logits_spec = dec.outputs[0]
        self._logits = self._alloc(logits_spec.concrete_shape(sizes), logits_spec.dtype)
        self._class_ids = self._alloc((batch,), "int64")
        self._token = self._alloc((batch,), "int64")
        self._position = self._alloc(dec.inputs[1].concrete_shape(sizes), "int64")  # [1] or [B]
        self._logits_t = torch.from_dlpack(self._logits)  # [B, V], shares memory with the OrtValue

        self._prefill_binding = self._sessions[PREFILL].io_binding()
        self._prefill_binding.bind_ortvalue_input("class_ids", self._class_ids)
        self._prefill_binding.bind_ortvalue_output(pre.output_names[0], self._logits)
        for name, buf in zip(pre.output_names[1:], self._kv[0]):
            self._prefill_binding.bind_ortvalue_output(name, buf)
        # Binding i reads cache set i and writes set (i + 1) % n_sets: one binding when in place.
        self._decode_bindings = [self._decode_binding(i, (i + 1) % n_sets) for i in range(n_sets)]
        self._cur = 0  # cache set that holds the current cache
        self._batch = batch

    def _decode_binding(self, src: int, dst: int) -> Any:
        spec = self.specs[DECODE_STEP]
        b = self._sessions[DECODE_STEP].io_binding()
        b.bind_ortvalue_input("token", self._token)
        b.bind_ortvalue_input("position", self._position)
        for name, buf in zip(spec.input_names[2:], self._kv[src]):
            b.bind_ortvalue_input(name, buf)
        b.bind_ortvalue_output(spec.output_names[0], self._logits)
        for name, buf in zip(spec.output_names[1:], self._kv[dst]):
            b.bind_ortvalue_output(name, buf)
        return b

    def _ids(self, t: torch.Tensor, what: str) -> np.ndarray:
        if self._batch == 0:
            raise RuntimeError(f"{self.name}: call start(batch) before {what}")
        if t.dim() != 1 or t.shape[0] != self._batch:
            raise ValueError(
                f"{self.name}.{what} expects [{self._batch}] ids (the batch given to start), got shape {tuple(t.shape)}"
            )
        return np.ascontiguousarray(t.detach().to("cpu", torch.int64).numpy())

    # -- GPT steps ---------------------------------------------------------------------------

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.prefill`. Returns logits ``[B, V]`` in the export dtype, a view
        of the bound output buffer (valid until the next call)."""
        self._class_ids.update_inplace(self._ids(class_ids, "prefill"))
        self._sessions[PREFILL].run_with_iobinding(self._prefill_binding)
        self._cur, self._prefilled = 0, True
        return self._logits_t

    def decode(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode`. Returns logits ``[B, V]`` in the export dtype, a view of
        the bound output buffer (valid until the next call)."""
        ids = self._ids(tokens, "decode")
        if not self._prefilled:
            raise RuntimeError(f"{self.name}: call prefill(class_ids) after start(batch) and before decode")
        pos = check_positions(pos, self._batch, self.gpt_config.seq_len - 1, self.name)
        if isinstance(pos, torch.Tensor):
            if not self.row_positions:
                raise ValueError(f"{self.artifacts_dir}: this decode step takes one position for all rows; "
                                 "export with row_positions (as `hita serve` does) for per-row positions")
            self._position.update_inplace(np.ascontiguousarray(pos.numpy()))
        else:
            self._position.update_inplace(np.full(self._position.shape(), pos, dtype=np.int64))
        self._token.update_inplace(ids)
        self._sessions[DECODE_STEP].run_with_iobinding(self._decode_bindings[self._cur])
        self._cur = (self._cur + 1) % len(self._kv)
        return self._logits_t

    # -- in-flight batching -------------------------------------------------------------------

    def keep_rows(self, rows: torch.Tensor) -> None:
        """See :meth:`StepExecutor.keep_rows`. Re-allocates the buffers and copies the kept rows."""
        self._need_rows("keep_rows")
        idx = check_keep_rows(rows, self._batch if self._prefilled else 0, self.name)
        kept = [t.index_select(0, idx.to(t.device)) for t in self.kv_cache()] if self._prefilled else []
        self._rebuild(kept)

    def add_rows(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.add_rows`. Returns logits ``[n, V]`` (a new tensor)."""
        self._need_rows("add_rows")
        ids = np.ascontiguousarray(class_ids.detach().to("cpu", torch.int64).numpy())
        if ids.ndim != 1 or ids.shape[0] < 1:
            raise ValueError(f"{self.name}.add_rows expects class ids [n], n >= 1, got shape {ids.shape}")
        logits, *cache = self._sessions[PREFILL].run(None, {"class_ids": ids})   # numpy, [n, V] + caches
        new = [torch.from_numpy(np.asarray(c)) for c in cache]
        if self._prefilled and self._batch:
            new = [torch.cat([old.to("cpu"), n]) for old, n in zip(self.kv_cache(), new)]  # [B + n, ...]
        self._rebuild(new)
        return torch.from_numpy(np.asarray(logits)).to(self.device)

    def _need_rows(self, what: str) -> None:
        if not self.row_positions:
            raise NotImplementedError(
                f"{self.name}.{what}: {self.artifacts_dir} has a decode step with one position for all rows; "
                "export with row_positions (as `hita serve` does) to change a running batch")

    def _rebuild(self, cache: list[torch.Tensor]) -> None:
        """Bind fresh buffers for ``cache[0].shape[0]`` rows and fill them with ``cache``."""
        rows = cache[0].shape[0] if cache else 0
        if rows == 0:
            self._batch, self._prefilled = 0, False
            self._prefill_binding = self._decode_bindings = self._kv = self._logits_t = None
            return
        self.start(rows)
        for dst, src in zip(self._kv_views(0), cache):
            dst.copy_(src)
        self._cur, self._prefilled = 0, True

    def _kv_views(self, which: int) -> list[torch.Tensor]:
        """Torch views of cache set ``which`` (``[k0, v0, ...]``), allocated or not."""
        return [torch.from_dlpack(v) for v in self._kv[which]]

    def kv_cache(self) -> list[torch.Tensor]:
        """The current cache as torch views ``[k0, v0, k1, v1, ...]`` (each ``[B, H, S, hd]``), in the
        spec's ``past_key_values`` order: what the next :meth:`decode` reads. For debugging and
        cross-checks (for example feeding another runner); copy them to keep them."""
        if not self._prefilled:
            raise RuntimeError(f"{self.name}: the cache is empty until prefill(class_ids) has run")
        return [torch.from_dlpack(v) for v in self._kv[self._cur]]

    # -- pixels ------------------------------------------------------------------------------

    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode_image`. Returns float32 CPU ``[n, 3, H, W]``."""
        cfg = self.tokenizer_config
        h, p = holistic_ids.detach().to("cpu", torch.int64), patch_ids.detach().to("cpu", torch.int64)
        if h.dim() != 2 or p.dim() != 2 or h.shape[1] != cfg.n_holistic or p.shape[1] != cfg.n_patch \
                or h.shape[0] != p.shape[0]:
            raise ValueError(
                f"decode_image expects holistic_ids [n, {cfg.n_holistic}] and patch_ids [n, {cfg.n_patch}], "
                f"got {tuple(h.shape)} and {tuple(p.shape)}"
            )
        (image,) = self._sessions[DECODER].run(None, {"holistic_ids": h.numpy(), "patch_ids": p.numpy()},
                                               self._release)
        return torch.from_numpy(image)  # [n, 3, H, W]


def _configs(manifest: Manifest):
    try:
        return manifest.gpt_cfg, manifest.tokenizer_cfg
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest.json: invalid model config ({e}); {_FIX}") from None


def _device_of(sess: Any) -> tuple[str, int]:
    """(OrtValue device type, device id) of the session's first provider."""
    first = sess.get_providers()[0]
    if first == "CUDAExecutionProvider":
        opts = sess.get_provider_options().get(first, {})
        return "cuda", int(opts.get("device_id", 0))
    return "cpu", 0
