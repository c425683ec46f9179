"""AOTInductor step executor: runs the ``.pt2`` packages of ``hita export --engine aoti``.

Opening a folder checks, before anything is loaded: the manifest (format version, content
checksum, engine ``"aoti"``, every file's size and sha256, via
:func:`~hita.export.manifest.load_manifest`), then the device kind and the exact torch version the
packages were compiled with: an AOTInductor package is a compiled shared library tied to both.
Every refusal is one :class:`~hita.export.errors.ArtifactError` line with the cause and the fix.

KV cache: ``prefill.pt2`` returns a fresh cache (``present.*``); this executor keeps those tensors
and hands them to ``decode_step.pt2``, which writes slot ``pos`` of each one in place and returns
only the logits (see :mod:`hita.export.aoti` for why). A CPU export's decode step also attends only
over the filled cache prefix and computes one head half (``options.attention`` ``"prefix"``); it is
driven exactly like the plain one, so nothing here depends on which it is. No sampling happens here.

A folder whose decode step takes ``position [batch]`` (exported with ``row_positions``) gives an
executor with ``row_positions`` (in-flight batching): ``add_rows`` runs the prefill package on the
newcomers and appends their caches, ``keep_rows`` keeps a copy of the surviving rows.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hita.export.errors import ArtifactError
from hita.export.manifest import Manifest, check_unchanged, load_manifest, verified_copy
from hita.export.spec import DECODE_STEP, DECODER, DTYPES, PREFILL, has_row_positions

from .executor import StepExecutor, check_keep_rows, check_positions

__all__ = ["AotiExecutor", "check_aoti_manifest"]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the aoti runtime runs on 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but this torch has no usable CUDA GPU; use --device cpu")
    return dev


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def check_aoti_manifest(manifest: Manifest, root: str | Path, device: torch.device) -> None:
    """Refuse packages built for another device kind or torch version, or without the in-place
    decode-step contract this executor drives.

    Args:
        manifest: a manifest already checked by :func:`load_manifest` (``expect_engine="aoti"``).
        root: the artifacts folder, for messages.
        device: where the packages will run.
    Raises:
        ArtifactError: one line naming the cause and the fix.
    """
    fix = "re-run `hita export --engine aoti`"
    if manifest.device != device.type:
        raise ArtifactError(
            f"{root}: packages were compiled for device {manifest.device!r} and cannot run on {device.type!r}; "
            f"export for this device with `hita export --engine aoti --device {device.type}` "
            f"or run with --device {manifest.device}"
        )
    built_with = manifest.versions.get("torch", "unknown")
    if built_with != torch.__version__:
        raise ArtifactError(
            f"{root}: packages were compiled with torch {built_with} but this is torch {torch.__version__}; "
            f"AOTInductor packages load only in the torch version that built them; re-export with this torch "
            f"or install torch=={_public(built_with)}"
        )
    for graph in (DECODER, PREFILL, DECODE_STEP):
        manifest.signature(graph)  # raises ArtifactError naming the missing graph
    step = manifest.graphs[DECODE_STEP]
    past = [t["name"] for t in step["inputs"][2:]]
    if step.get("mutates") != past or [t["name"] for t in step["outputs"]] != ["logits"]:
        raise ArtifactError(
            f"{root}: decode_step.pt2 does not declare the in-place KV cache this runtime drives "
            f"(outputs {[t['name'] for t in step['outputs']]}); {fix} with this hita"
        )


class AotiExecutor(StepExecutor):
    """:class:`StepExecutor` over an AOTInductor artifacts folder.

    Args:
        artifacts_dir: folder written by :func:`hita.export.aoti.export_aoti`.
        device: ``"cpu"`` or ``"cuda[:i]"``; must match the device kind the packages were built for.
        verify_files: hash every file against the manifest (``False`` checks sizes only).
        expect_manifest_sha256: pin: refuse any manifest but this one (``.pt2`` files are code).
    Raises:
        ArtifactError: missing/changed files, another engine, device kind or torch version.
        ValueError: a bad device string.
    """

    name = "aoti"

    def __init__(self, artifacts_dir: str | Path, device: str | torch.device = "cpu", *, verify_files: bool = True,
                 expect_manifest_sha256: str | None = None):
        self.device = _device(device)
        self.root = Path(artifacts_dir)
        fingerprints: dict = {}
        self.manifest = load_manifest(self.root, expect_engine="aoti", verify_files=verify_files,
                                      expect_sha256=expect_manifest_sha256, fingerprints=fingerprints)
        check_aoti_manifest(self.manifest, self.root, self.device)
        self.gpt_config = self.manifest.gpt_cfg
        self.tokenizer_config = self.manifest.tokenizer_cfg
        self.pos128 = self.manifest.pos128
        self.row_positions = has_row_positions(self.manifest.signature(DECODE_STEP))
        index = self.device.index if self.device.index is not None else (0 if self.device.type == "cuda" else -1)
        # A package is code: load private copies made from the bytes that were hashed, so a folder
        # changed after the check cannot slip a different shared library in.
        with tempfile.TemporaryDirectory(prefix="hita-aoti-") as private:
            self._prefill = self._load(PREFILL, index, private)
            self._decode = self._load(DECODE_STEP, index, private)
            self._decoder = self._load(DECODER, index, private)
        check_unchanged(self.root, fingerprints)
        self.kv_itemsize = DTYPES[self.manifest.precision].itemsize
        self._cache: tuple[torch.Tensor, ...] | None = None
        self._batch = 0

    def _load(self, graph: str, index: int, private: str):
        path = verified_copy(self.root, self.manifest, self.manifest.graph_file(graph), private)
        try:
            return torch._inductor.aoti_load_package(str(path), device_index=index)
        except Exception as e:  # noqa: BLE001 - any loader failure is an unusable artifact
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(
                f"{path.name}: AOTInductor could not load the package ({first}); re-run `hita export --engine aoti`"
            ) from None

    # -- GPT steps ---------------------------------------------------------------------------

    def start(self, batch: int) -> None:
        """Forget the previous cache; the prefill package allocates a fresh one for ``batch`` rows."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self._cache = None
        self._batch = batch

    def _rows(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self._batch == 0:  # never started, or every row left
            raise RuntimeError(f"{self.name}: call start(batch) before {what}")
        if t.dim() != 1 or t.shape[0] != self._batch:
            raise ValueError(
                f"{self.name}.{what} expects [{self._batch}] ids (the batch given to start), got shape {tuple(t.shape)}"
            )
        return t.to(self.device, torch.int64).contiguous()

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.prefill`. Returns logits ``[B, V]`` on the device."""
        ids = self._rows(class_ids, "prefill")                                   # [B]
        with torch.no_grad():
            logits, *cache = self._prefill(ids)                                  # [B, V], 2 x n_layer caches
        self._cache = tuple(cache)
        return logits

    def decode(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode`. Updates the cache in place; returns logits ``[B, V]``."""
        toks = self._rows(tokens, "decode")                                      # [B]
        if self._cache is None:
            raise RuntimeError(f"{self.name}: call prefill before decode")
        pos = check_positions(pos, self._batch, self.gpt_config.seq_len - 1, self.name)
        if isinstance(pos, torch.Tensor):
            if not self.row_positions:
                raise ValueError(f"{self.root}: this decode step takes one position for all rows; "
                                 "export with row_positions for per-row positions")
            p = pos.to(self.device)                                              # [B]
        else:
            p = torch.full((self._batch if self.row_positions else 1,), pos, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            return self._decode(toks, p, self._cache)                            # [B, V]

    # -- in-flight batching -------------------------------------------------------------------

    def keep_rows(self, rows: torch.Tensor) -> None:
        """See :meth:`StepExecutor.keep_rows`."""
        self._need_rows("keep_rows")
        idx = check_keep_rows(rows, self._batch if self._cache is not None else 0, self.name).to(self.device)
        if self._cache is not None:
            self._cache = tuple(c.index_select(0, idx) for c in self._cache)     # each [B', H, S, hd]
        self._batch = idx.shape[0]

    def add_rows(self, class_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.add_rows`. Returns logits ``[n, V]`` on the device."""
        self._need_rows("add_rows")
        if class_ids.dim() != 1 or class_ids.shape[0] < 1:
            raise ValueError(f"{self.name}.add_rows expects class ids [n], n >= 1, got shape {tuple(class_ids.shape)}")
        with torch.no_grad():
            logits, *cache = self._prefill(class_ids.to(self.device, torch.int64).contiguous())
        if self._cache is not None and self._batch:
            cache = [torch.cat(pair) for pair in zip(self._cache, cache)]
        self._cache = tuple(cache)
        self._batch = self._cache[0].shape[0]
        return logits

    def _need_rows(self, what: str) -> None:
        if not self.row_positions:
            raise NotImplementedError(f"{self.name}.{what}: {self.root} has a decode step with one position for "
                                      "all rows; export with row_positions to change a running batch")

    # -- pixels ------------------------------------------------------------------------------

    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`StepExecutor.decode_image`. Returns float32 ``[n, 3, H, W]`` on the device."""
        with torch.no_grad():
            return self._decoder(
                holistic_ids.to(self.device, torch.int64).contiguous(), patch_ids.to(self.device, torch.int64).contiguous()
            ).float()
