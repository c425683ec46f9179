"""The artifacts folder: a flat set of engine files plus ``manifest.json`` that vouches for them.

Engine-neutral: the ONNX, AOTInductor and TensorRT exporters all write through
:func:`write_artifacts` and every runtime opens a folder with :func:`load_manifest` first. The
manifest records what produced the files (presets and full configs, the pos128 rule, dtype, device,
tool versions, source checkpoint hashes), the I/O signature of every graph and the sha256 and size
of every file. A runtime reads only the manifest, never the training code, and refuses a folder
whose files are not exactly the ones exported (style rule 11: never trust a file because it exists).

Writes are atomic: files are assembled in a hidden sibling folder, ``manifest.json`` is written
last, everything is fsynced, then the folder is renamed into place. A crash leaves either the old
folder or the new one, never a half-written folder with a manifest; an existing folder is replaced
only when it is itself a hita artifacts folder. A killed export can leave a hidden
``.<name>.work-*`` / ``.<name>.tmp-*`` / ``.<name>.old-*`` folder beside ``<name>``: safe to delete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from hita.checkpoint import file_sha256
from hita.config import GPTConfig, TokenizerConfig

from .errors import ArtifactError
from .spec import GraphSignature

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ENGINES",
    "ArtifactError",
    "Manifest",
    "sha256_file",
    "staging_dir",
    "write_artifacts",
    "load_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENGINES = ("onnx", "aoti", "tensorrt")
_CHECKSUM_KEY = "manifest_sha256"


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Manifest:
    """What an artifacts folder holds and what produced it.

    Fields:
        engine: ``"onnx"``, ``"aoti"`` or ``"tensorrt"``.
        tokenizer_preset, gpt_preset: preset names (``"hita-v"``, ``"GPT-B"``).
        tokenizer_config, gpt_config: the full config dicts (``Config.to_dict()``), so a runtime can
            rebuild the exact configs even for a non-preset model.
        pos128: embedding rule at position n_holistic baked into the decode graph
            (``"reference"`` or ``"consistent"``, spec 8.1).
        precision: hidden dtype of the GPT graphs (``"float32"``, ...); the decoder is float32.
        device: device the artifacts were built and validated for (``"cpu"``, ``"cuda"``).
        versions: tool versions as strings (``torch``, ``onnx``, ``onnxruntime``, ``opset``, ...).
        graphs: graph name -> ``{"file": name, "inputs": [...], "outputs": [...]}`` (a
            :class:`~hita.export.spec.GraphSignature` dict plus the file), engine extras allowed.
        files: file name -> ``{"sha256": hex, "size": bytes}``; filled in by :func:`write_artifacts`.
        checkpoints: ``{"gpt": sha256 | None, "tokenizer": sha256 | None}`` of the source
            checkpoint files when known.
        options: engine-specific facts a runtime may rely on (exporter used, external data, whether
            in-place KV binding was verified, TensorRT profiles, ...).
        created: UTC ISO-8601 time of the export.
        format_version: layout version of this manifest; runtimes refuse other versions.
    """

    engine: str
    tokenizer_preset: str
    tokenizer_config: dict[str, Any]
    gpt_preset: str
    gpt_config: dict[str, Any]
    pos128: str
    precision: str
    device: str
    versions: dict[str, str]
    graphs: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_utc_now)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Hold JSON-native values only (tuples -> lists), so a manifest equals its reloaded self.
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), dict):
                object.__setattr__(self, f.name, json.loads(json.dumps(getattr(self, f.name))))
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine kind {self.engine!r}; use one of {', '.join(ENGINES)}")
        for g in self.graphs.values():
            _check_file_name(g.get("file", ""))

    # -- typed views -----------------------------------------------------------------------

    @property
    def tokenizer_cfg(self) -> TokenizerConfig:
        return TokenizerConfig.from_dict(self.tokenizer_config)

    @property
    def gpt_cfg(self) -> GPTConfig:
        return GPTConfig.from_dict(self.gpt_config)

    def signature(self, graph: str) -> GraphSignature:
        """The recorded I/O signature of ``graph``.

        Raises:
            ArtifactError: the manifest has no such graph.
        """
        if graph not in self.graphs:
            raise ArtifactError(
                f"{MANIFEST_NAME}: no graph {graph!r} (has {', '.join(self.graphs) or 'none'}); "
                f"re-run `hita export --engine {self.engine}`"
            )
        return GraphSignature.from_dict(self.graphs[graph])

    def graph_file(self, graph: str) -> str:
        """File name that holds ``graph`` (``"decode_step.onnx"``)."""
        self.signature(graph)
        return self.graphs[graph]["file"]

    # -- (de)serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Pretty JSON with a checksum of the content, so an edit after export is detected."""
        body = self.to_dict()
        body[_CHECKSUM_KEY] = _content_sha256(body)
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """Strict: unknown or missing keys raise ``ArtifactError`` (checksum key excepted)."""
        body = {k: v for k, v in d.items() if k != _CHECKSUM_KEY}
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(body) - names), sorted(required - set(body))
        if unknown or missing:
            raise ArtifactError(
                f"{MANIFEST_NAME}: unknown keys {unknown}, missing keys {missing}; the folder was not "
                "written by this hita version; re-run `hita export`"
            )
        try:
            return cls(**body)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{MANIFEST_NAME}: invalid content ({e}); re-run `hita export`") from None


def _content_sha256(body: Mapping[str, Any]) -> str:
    canon = json.dumps({k: v for k, v in body.items() if k != _CHECKSUM_KEY}, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_file_name(name: str) -> None:
    # Flat folders only: a name is a single path component (no "..", no subfolders, not the manifest).
    if not name or name in (".", "..", MANIFEST_NAME) or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"artifact file name {name!r} must be a plain, visible file name other than {MANIFEST_NAME}")


# One hashing routine for checkpoints and artifacts (1 MiB chunks: multi-GB engines stay out of memory).
sha256_file = file_sha256


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder next to ``out_dir`` (same filesystem, so moving files out is a rename),
    removed on exit. Exporters write their files here, then pass them to :func:`write_artifacts`.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_artifacts_folder(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file() or not any(path.iterdir())


def write_artifacts(
    out_dir: str | os.PathLike, files: Mapping[str, str | os.PathLike], manifest: Manifest
) -> Manifest:
    """Write ``files`` and their manifest to ``out_dir`` atomically.

    Steps: make a hidden sibling temp folder; move each file in (a rename on the same filesystem,
    else a copy), hash it and fsync it; write ``manifest.json`` last (with sha256 and size of every
    file) and fsync it and the folder; rename any existing ``out_dir`` aside, rename the new folder
    into place, delete the old one. If anything fails before the swap, ``out_dir`` is untouched.
    Linux cannot swap two folders in one step, so a reader that looks during the two renames may
    briefly see no folder; it never sees a mixed one.

    Args:
        out_dir: destination folder; replaced if it exists and is empty or holds a ``manifest.json``.
        files: artifact file name -> path of the finished file. The files are **moved** (consumed).
        manifest: the manifest; its ``files`` entries are (re)computed here.
    Returns:
        The manifest as written (with ``files`` filled in).
    Raises:
        ArtifactError: ``out_dir`` exists and is not a hita artifacts folder (it is never deleted),
            or a graph names a file that is not in ``files``.
        ValueError: a file name is not a plain name.
    """
    out = Path(out_dir).absolute()
    for name in files:
        _check_file_name(name)
    missing = sorted({g["file"] for g in manifest.graphs.values()} - set(files))
    if missing:
        raise ArtifactError(f"manifest lists graph files {missing} that were not produced; export is incomplete")
    if out.exists() and (not out.is_dir() or not _is_artifacts_folder(out)):
        raise ArtifactError(
            f"{out}: exists and is not a hita artifacts folder (no {MANIFEST_NAME}); refusing to replace it; "
            "choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {}
        for name, src in files.items():
            dst = tmp / name
            try:
                os.replace(src, dst)
            except OSError:  # another filesystem: copy instead of rename
                shutil.copyfile(src, dst)
            _fsync_path(dst)
            entries[name] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
        final = dataclasses.replace(manifest, files=entries)
        mpath = tmp / MANIFEST_NAME
        with open(mpath, "w", encoding="utf-8") as f:
            f.write(final.to_json())
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        _fsync_path(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_manifest(
    artifacts_dir: str | os.PathLike,
    expect_engine: str | None = None,
    *,
    verify_files: bool = True,
) -> Manifest:
    """Open an artifacts folder and prove that its files are the ones exported.

    Checks, in order: the folder and ``manifest.json`` exist; the manifest parses, has this
    format version and an intact content checksum; the engine kind is ``expect_engine``; every
    listed file exists with the recorded size and sha256; every graph's file is listed.

    Args:
        artifacts_dir: the folder written by :func:`write_artifacts`.
        expect_engine: refuse a folder of another engine kind (``"onnx"``, ...); ``None`` accepts any.
        verify_files: hash every file (seconds for multi-GB engines); ``False`` checks sizes only.
    Returns:
        The :class:`Manifest`.
    Raises:
        ArtifactError: one line naming the file, the cause and the fix.
    """
    root = Path(artifacts_dir)
    fix = f"re-run `hita export --engine {expect_engine or '<engine>'}`"
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifacts folder; create it with `hita export`")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(
            f"{mpath}: missing (not a hita artifacts folder, or the export did not finish); {fix}"
        )
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{mpath}: not a JSON object; {fix}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format version {version!r}, this hita reads version {FORMAT_VERSION}; "
            f"re-export with this hita ({fix})"
        )
    if raw.get(_CHECKSUM_KEY) != _content_sha256(raw):
        raise ArtifactError(f"{mpath}: content changed after export (checksum mismatch); {fix}")
    manifest = Manifest.from_dict(raw)
    fix = f"re-run `hita export --engine {manifest.engine}`"
    if expect_engine is not None and manifest.engine != expect_engine:
        raise ArtifactError(
            f"{root}: holds a {manifest.engine!r} export, expected {expect_engine!r}; point to an "
            f"{expect_engine} artifacts folder or run `hita export --engine {expect_engine}`"
        )
    for graph, info in manifest.graphs.items():
        if info["file"] not in manifest.files:
            raise ArtifactError(f"{mpath}: graph {graph!r} names {info['file']!r}, which is not listed; {fix}")
    for name, entry in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{name}: missing from {root}; {fix}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(
                f"{name}: {size} bytes, manifest says {entry['size']} (truncated or replaced after export); {fix}"
            )
        if verify_files and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{name}: sha256 mismatch (file changed after export); {fix}")
    return manifest
