"""The artifacts folder: a flat set of engine files plus ``manifest.json`` that vouches for them.

Engine-neutral: every exporter writes through :func:`write_artifacts` and every runtime opens a
folder with :func:`load_manifest` first. The manifest records what produced the files (presets and
full configs, the pos128 rule, dtype, device, tool versions, source checkpoint hashes), the I/O
signature of every graph and the sha256 and size of every file. A runtime reads only the manifest,
never the training code, and refuses a folder whose listed files are missing, changed or not plain
files. Unlisted extra files are ignored by runtimes (nothing loads them) but make the folder one
:func:`write_artifacts` will not replace.

Integrity: ``manifest.sha256`` holds the sha256 of ``manifest.json``'s bytes in ``sha256sum`` form
(``sha256sum -c manifest.sha256`` works in the folder). Readers hash the bytes they parse (one read),
so Python and the C++ host check the same thing without re-serialising JSON. That proves the folder
is self-consistent, not where it came from: a deployment pins the export it reviewed with
``expect_sha256`` (``--expect-manifest-sha256 HEX``), and ``HITA_REQUIRE_PINNED=1`` refuses folders
of engines that hold executable code (AOTInductor ``.pt2``, TensorRT engines) unless pinned.

Writes are atomic and never destroy what hita did not write: files are assembled in a hidden sibling
folder, ``manifest.json`` and its checksum are written last, everything is fsynced, then the folder
replaces ``out_dir`` with one atomic exchange (``renameat2(RENAME_EXCHANGE)``; two renames where the
filesystem lacks it). An existing ``out_dir`` is replaced only when it is empty or a valid hita
artifacts folder holding exactly the files its manifest lists. Leftover ``.<name>.work-<pid>-*`` /
``.tmp-`` / ``.old-`` folders of dead processes are removed by the next write.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from hita.config import GPTConfig, TokenizerConfig
from hita.util.files import apply_umask, bytes_sha256, file_sha256, fsync_path

from .errors import ArtifactError
from .spec import GraphSignature

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CHECKSUM_NAME",
    "ENGINES",
    "CODE_ENGINES",
    "PIN_ENV",
    "ArtifactError",
    "Manifest",
    "sha256_file",
    "staging_dir",
    "write_artifacts",
    "load_manifest",
    "manifest_sha256",
    "check_unchanged",
    "is_hita_folder",
]

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
CHECKSUM_NAME = "manifest.sha256"
ENGINES = ("onnx", "aoti", "tensorrt")
# Engine kinds whose files are executable code when loaded (shared libraries, plugins).
CODE_ENGINES = ("aoti", "tensorrt")
PIN_ENV = "HITA_REQUIRE_PINNED"
_RESERVED = (MANIFEST_NAME, CHECKSUM_NAME)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
            want = {"graphs": dict, "files": dict, "versions": dict, "checkpoints": dict, "options": dict,
                    "tokenizer_config": dict, "gpt_config": dict}.get(f.name, str)
            if f.name == "format_version":
                want = int
            if not isinstance(getattr(self, f.name), want) or isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be a JSON {'object' if want is dict else want.__name__}")
            if isinstance(getattr(self, f.name), dict):
                object.__setattr__(self, f.name, json.loads(json.dumps(getattr(self, f.name))))
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine kind {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.pos128 not in ("reference", "consistent"):
            raise ValueError(f"pos128 must be 'reference' or 'consistent', got {self.pos128!r}")
        if self.precision not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"precision must be float32, float16 or bfloat16, got {self.precision!r}")
        # Option facts a runtime acts on must have their exact types ("yes" is not True).
        for key, want in (("validated", bool), ("kv_inplace_verified", bool), ("max_batch", int)):
            value = self.options.get(key)
            if value is not None and (type(value) is not want or (want is int and not 1 <= value <= 4096)):
                raise ValueError(f"options.{key} must be a JSON {'boolean' if want is bool else 'integer in 1..4096'}, "
                                 f"got {value!r}")
        for name, g in self.graphs.items():
            if not isinstance(g, dict) or not isinstance(g.get("file"), str):
                raise ValueError(f"graph {name!r} must be an object with a 'file' name")
            _check_file_name(g["file"])
        for name, entry in self.files.items():
            _check_file_name(name)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                    and isinstance(entry.get("size"), int) and entry["size"] >= 0):
                raise ValueError(f"files[{name!r}] must be {{'sha256': 64 hex digits, 'size': bytes}}")
        for key in ("tokenizer_config", "gpt_config"):
            try:
                (TokenizerConfig if key == "tokenizer_config" else GPTConfig).from_dict(getattr(self, key))
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{key}: {e}") from None

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
        """Pretty, key-sorted JSON (its sha256 goes into ``manifest.sha256``)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """Strict: unknown or missing keys and wrongly typed values raise ``ArtifactError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise ArtifactError(
                f"{MANIFEST_NAME}: unknown keys {unknown}, missing keys {missing}; the folder was not "
                "written by this hita version; re-run `hita export`"
            )
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{MANIFEST_NAME}: invalid content ({e}); re-run `hita export`") from None


def _check_file_name(name: str) -> None:
    # Flat folders only: a name is a single visible path component, never the manifest or its checksum.
    if (not isinstance(name, str) or not name or name in (".", "..", *_RESERVED) or "/" in name or "\\" in name
            or name.startswith(".") or "\0" in name):
        raise ValueError(f"artifact file name {name!r} must be a plain, visible file name other than {MANIFEST_NAME}")


# One hashing routine for checkpoints and artifacts.
sha256_file = file_sha256


def manifest_sha256(artifacts_dir: str | os.PathLike) -> str:
    """The sha256 of a folder's ``manifest.json`` bytes: the value to pin a reviewed export with."""
    return bytes_sha256((Path(artifacts_dir) / MANIFEST_NAME).read_bytes())


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    """Remove ``.<name>.{work,tmp,old}-<pid>-*`` folders of processes that no longer run."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(work|tmp|old)-(\d+)-[0-9a-z_]+$")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder next to ``out_dir`` (same filesystem, so moving files out is a rename),
    removed on exit. Exporters write their files here, then pass them to :func:`write_artifacts`.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    tmp = _sibling(out, "work")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_hita_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder hita may replace: empty, or a valid artifacts folder (manifest
    and checksum verify) holding exactly the files its manifest lists and nothing else."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    # One directory handle for the listing and the manifest: a concurrent export may swap the
    # folder at ``path`` meanwhile, and both reads must describe the same folder. If the folder read
    # was swapped out (and is being deleted, so it looks partial), read the one now at ``path``.
    for _ in range(3):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            ours = _is_hita_folder_fd(path, fd)
            if ours or os.stat(path).st_ino == os.fstat(fd).st_ino:
                return ours
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return False


def _is_hita_folder_fd(path: Path, fd: int) -> bool:
    present = set(os.listdir(fd))
    if not present:
        return True
    try:
        m = _read_manifest(path, None, "re-run `hita export`", dir_fd=fd)
    except ArtifactError:
        return False
    return present == set(m.files) | set(_RESERVED)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_artifacts(
    out_dir: str | os.PathLike, files: Mapping[str, str | os.PathLike], manifest: Manifest
) -> Manifest:
    """Write ``files`` and their manifest to ``out_dir`` atomically.

    Steps: make a hidden sibling temp folder; move each file in (a rename on the same filesystem,
    else a copy), hash it and fsync it; write ``manifest.json`` and ``manifest.sha256`` last, fsync
    them and the folder; then exchange it with an existing ``out_dir`` in one step (or rename it into
    place) and delete the old copy. If anything fails before the swap, ``out_dir`` is untouched; at no
    moment is ``out_dir`` missing or mixed where the filesystem supports the exchange.

    Args:
        out_dir: destination folder; replaced only if it is empty or a hita artifacts folder holding
            exactly its listed files (:func:`is_hita_folder`).
        files: artifact file name -> path of the finished file. The files are **moved** (consumed).
        manifest: the manifest; its ``files`` entries are (re)computed here.
    Returns:
        The manifest as written (with ``files`` filled in).
    Raises:
        ArtifactError: ``out_dir`` exists and is not a folder hita may replace (it is never
            touched), or a graph names a file that is not in ``files``.
        ValueError: a file name is not a plain name.
    """
    out = Path(out_dir).absolute()
    for name in files:
        _check_file_name(name)
    missing = sorted({g["file"] for g in manifest.graphs.values()} - set(files))
    if missing:
        raise ArtifactError(f"manifest lists graph files {missing} that were not produced; export is incomplete")
    check_output_folder(out)
    try:
        return _write_folder(out, files, manifest)
    except OSError as e:  # full disk, read-only filesystem, permissions: nothing half-written is left
        raise ArtifactError(
            f"{out}: cannot write the artifacts ({e.strerror or e}); free space or choose a writable folder"
        ) from None


def _write_folder(out: Path, files: Mapping[str, str | os.PathLike], manifest: Manifest) -> Manifest:
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    tmp = _sibling(out, "tmp")
    try:
        entries = {}
        for name, src in files.items():
            dst = tmp / name
            try:
                os.replace(src, dst)
            except OSError:  # another filesystem: copy instead of rename
                shutil.copyfile(src, dst)
            fsync_path(dst)
            apply_umask(dst)
            entries[name] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
        final = dataclasses.replace(manifest, files=entries)
        text = final.to_json().encode("utf-8")
        for name, data in ((MANIFEST_NAME, text), (CHECKSUM_NAME, f"{bytes_sha256(text)}  {MANIFEST_NAME}\n".encode())):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            apply_umask(tmp / name)
        apply_umask(tmp, folder=True)
        fsync_path(tmp)
        check_output_folder(out)  # again: another process may have put something there meanwhile
        if not out.exists():
            try:
                os.replace(tmp, out)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                check_output_folder(out)  # a concurrent export got there first: replace it as below
        if tmp.exists():
            _swap_in(tmp, out)
        fsync_path(out.parent)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` (which exists) and delete the old one."""
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = _sibling(out, "old")
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output_folder(out_dir: str | os.PathLike) -> None:
    """Refuse, before any work, an output location hita must not replace.

    Raises:
        ArtifactError: ``out_dir`` is a file, a symlink, or a folder with content hita did not write.
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ArtifactError(f"{out}: exists and is not a folder; choose a new folder for the export")
    if out.exists() and not is_hita_folder(out):
        raise ArtifactError(
            f"{out}: exists and is not a hita artifacts folder (it holds files no hita export listed); "
            "refusing to replace it; choose a new or empty folder"
        )


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _require_pin(engine: str, expect_sha256: str | None, root: Path) -> None:
    if os.environ.get(PIN_ENV, "") not in ("", "0") and engine in CODE_ENGINES and expect_sha256 is None:
        raise ArtifactError(
            f"{root}: a {engine} folder contains executable code and {PIN_ENV} is set; pass "
            "--expect-manifest-sha256 HEX (the sha256 of the reviewed export's manifest.json)"
        )


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(root: str | os.PathLike, fingerprints: Mapping[str, tuple[int, int, int]]) -> None:
    """Refuse files that changed since :func:`load_manifest` verified them (call after loading).

    Raises:
        ArtifactError: a file was replaced or modified in between.
    """
    for name, fp in fingerprints.items():
        try:
            now = _fingerprint(Path(root) / name)
        except OSError:
            now = None
        if now != fp:
            raise ArtifactError(
                f"{name}: changed while it was being loaded (replaced by another process?); load the folder again"
            )


def _read_bytes(name: str, root: Path, dir_fd: int | None) -> bytes | None:
    """A file's bytes (``None`` when it is missing), relative to ``dir_fd`` when given."""
    try:
        fd = os.open(name if dir_fd is not None else root / name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _read_manifest(root: Path, expect_sha256: str | None, fix: str, dir_fd: int | None = None) -> Manifest:
    """The manifest of ``root``, its bytes checked against ``manifest.sha256`` (and the pin)."""
    mpath, cpath = root / MANIFEST_NAME, root / CHECKSUM_NAME
    try:
        data = _read_bytes(MANIFEST_NAME, root, dir_fd)
        if data is None:
            raise ArtifactError(
                f"{mpath}: missing (not a hita artifacts folder, or the export did not finish); {fix}"
            )
        raw_sum = _read_bytes(CHECKSUM_NAME, root, dir_fd)
        recorded = raw_sum.decode("ascii").split()[0] if raw_sum is not None else None
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise ArtifactError(f"{cpath}: unreadable ({e}); {fix}") from None
    if recorded is None:
        raise ArtifactError(f"{cpath}: missing (written by an older hita, or the export did not finish); {fix}")
    digest = bytes_sha256(data)
    if recorded != digest:
        raise ArtifactError(f"{mpath}: content changed after export (checksum mismatch); {fix}")
    if expect_sha256 is not None and digest != expect_sha256.strip().lower():
        raise ArtifactError(
            f"{mpath}: manifest sha256 {digest} does not match the pinned {expect_sha256.strip().lower()}; "
            "this is not the export you reviewed"
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{mpath}: unreadable ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{mpath}: not a JSON object; {fix}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format version {version!r}, this hita reads version {FORMAT_VERSION}; "
            f"re-export with this hita ({fix})"
        )
    return Manifest.from_dict(raw)


_SWAP_RETRIES = 50  # reads of a folder that concurrent exports keep replacing (see load_manifest)


def load_manifest(
    artifacts_dir: str | os.PathLike,
    expect_engine: str | None = None,
    *,
    verify_files: bool = True,
    expect_sha256: str | None = None,
    fingerprints: dict[str, tuple[int, int, int]] | None = None,
) -> Manifest:
    """Open an artifacts folder and prove that its files are the ones exported.

    Checks, in order: the folder, ``manifest.json`` and ``manifest.sha256`` exist; the manifest's
    bytes hash to the recorded checksum (and to ``expect_sha256`` when pinned); it parses, has this
    format version and well-typed fields; the engine kind is ``expect_engine``; the pin policy
    (:data:`PIN_ENV`); every listed file exists with the recorded size and sha256.

    Args:
        artifacts_dir: the folder written by :func:`write_artifacts`.
        expect_engine: refuse a folder of another engine kind (``"onnx"``, ...); ``None`` accepts any.
        verify_files: hash every file (seconds for multi-GB engines); ``False`` checks sizes only.
        expect_sha256: the pinned sha256 of ``manifest.json`` (:func:`manifest_sha256` of the
            reviewed export); any other manifest is refused.
        fingerprints: filled with each file's (inode, size, mtime) taken *before* it was hashed;
            a runtime calls :func:`check_unchanged` after loading the files, so a file swapped
            between the check and the load is caught.
    Returns:
        The :class:`Manifest`.
    Raises:
        ArtifactError: one line naming the file, the cause and the fix.
    """
    root = Path(artifacts_dir)
    fix = f"re-run `hita export --engine {expect_engine or '<engine>'}`"
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifacts folder; create it with `hita export`")
    # Everything is read through one directory handle, so a folder swapped in by a concurrent
    # export is never mixed with the one being checked.
    # A retry happens only when the folder at ``root`` really was swapped while it was read, so each
    # one reads a newer export; the bound only stops a reader racing exports that never end.
    for attempt in range(_SWAP_RETRIES):
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return _load(root, dir_fd, expect_engine, verify_files, expect_sha256, fingerprints, fix)
        except ArtifactError:
            # A concurrent export replaced the folder and deleted the one we had open: read the new one.
            if attempt == _SWAP_RETRIES - 1 or os.stat(root).st_ino == os.fstat(dir_fd).st_ino:
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _load(root: Path, dir_fd: int, expect_engine: str | None, verify_files: bool, expect_sha256: str | None,
          fingerprints: dict[str, tuple[int, int, int]] | None, fix: str) -> Manifest:
    manifest = _read_manifest(root, expect_sha256, fix, dir_fd=dir_fd)
    mpath = root / MANIFEST_NAME
    fix = f"re-run `hita export --engine {manifest.engine}`"
    if expect_engine is not None and manifest.engine != expect_engine:
        raise ArtifactError(
            f"{root}: holds a {manifest.engine!r} export, expected {expect_engine!r}; point to an "
            f"{expect_engine} artifacts folder or run `hita export --engine {expect_engine}`"
        )
    _require_pin(manifest.engine, expect_sha256, root)
    for graph, info in manifest.graphs.items():
        if info["file"] not in manifest.files:
            raise ArtifactError(f"{mpath}: graph {graph!r} names {info['file']!r}, which is not listed; {fix}")
    for name, entry in manifest.files.items():
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{name}: missing from {root} (or not a plain file); {fix}")
        fp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if fingerprints is not None:
            fingerprints[name] = fp
        if st.st_size != entry["size"]:
            raise ArtifactError(
                f"{name}: {st.st_size} bytes, manifest says {entry['size']} (truncated or replaced after export); {fix}"
            )
        try:
            changed = verify_files and _fd_sha256(name, dir_fd) != entry["sha256"]
        except FileNotFoundError:  # deleted since the stat (a concurrent export swapped the folder)
            raise ArtifactError(f"{name}: missing from {root} (deleted while it was checked); {fix}") from None
        if changed:
            raise ArtifactError(f"{name}: sha256 mismatch (file changed after export); {fix}")
    return manifest


def verified_copy(root: str | os.PathLike, manifest: Manifest, name: str, dest_dir: str | os.PathLike) -> Path:
    """Copy artifact ``name`` into the private folder ``dest_dir`` while hashing the bytes copied,
    and refuse the copy unless they hash to the manifest's sha256.

    For files that are code when loaded (AOTInductor packages, engines with plugins): loading the
    private copy means the bytes that run are the bytes that were verified, even if the artifacts
    folder is changed between the check and the load.

    Raises:
        ArtifactError: the file is missing, not listed, or differs from the manifest.
    """
    _check_file_name(name)
    entry = manifest.files.get(name)
    if entry is None:
        raise ArtifactError(f"{name}: not listed in the manifest; re-run `hita export --engine {manifest.engine}`")
    dest = Path(dest_dir) / name
    h = hashlib.sha256()
    try:
        src_fd = os.open(Path(root) / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ArtifactError(f"{Path(root) / name}: cannot open it ({e.strerror or e}); "
                            f"re-run `hita export --engine {manifest.engine}`") from None
    with os.fdopen(src_fd, "rb") as src, open(dest, "xb") as out:
        while block := src.read(1 << 20):
            h.update(block)
            out.write(block)
    if h.hexdigest() != entry["sha256"]:
        dest.unlink()
        raise ArtifactError(f"{Path(root) / name}: changed after the manifest was checked (sha256 differs); "
                            "refusing to load it; make sure nothing writes to the artifacts folder")
    return dest


def _fd_sha256(name: str, dir_fd: int) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
