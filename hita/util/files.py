"""Files: sha256 in chunks, atomic single-file writes, fsync of files and folders, the umask.

Every artifact hita writes goes through :func:`atomic_write` (one file) or is assembled in a hidden
sibling folder and renamed into place (folders, see :mod:`hita.export.manifest`), so a reader never
sees a half-written file. Temporary files are created private (``mkstemp`` uses 0600) and get the
permissions an ordinary ``open()`` would give them (``0666 & ~umask``) just before the rename, so
outputs honour the user's umask.
"""
from __future__ import annotations

import json
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "file_sha256", "bytes_sha256", "fsync_path", "fsync_tree", "umask_mode", "apply_umask"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (multi-GB engines stay out of memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def umask_mode(base: int = 0o666) -> int:
    """``base & ~umask``: the mode ``open()``/``mkdir()`` would give a new file (0o666) or folder (0o777)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` (made private by ``mkstemp``/``mkdtemp``) the mode the umask allows."""
    os.chmod(path, umask_mode(0o777 if folder else 0o666))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every folder (deepest first), then ``root``."""
    root = Path(root)
    folders = []
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file():
            fsync_path(p)
        elif p.is_dir():
            folders.append(p)
    for d in folders:
        fsync_path(d)
    fsync_path(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The temporary file sits in the target folder (same filesystem, so the rename is atomic), is
    fsynced, gets the umask's permissions, and is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Never overwrite what hita did not write
# ----------------------------------------------------------------------------------------------

RUN_MARKER = ".hita-run"
_MARKER_TMP = re.compile(rf"\.{re.escape(RUN_MARKER)}\.[A-Za-z0-9_]+\.tmp")  # atomic_write's temporary


def folder_kind(path: str | os.PathLike) -> str | None:
    """The job that claimed a folder (its :data:`RUN_MARKER`), ``None`` when it has no valid marker."""
    try:
        data = json.loads((Path(path) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("hita") if isinstance(data, dict) and isinstance(data.get("hita"), str) else None


def check_claimable(path: str | os.PathLike, kind: str, flag: str = "--out",
                    owned: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, an output folder that holds files hita did not write for ``kind``.

    A folder may be used when it does not exist, is empty, carries ``kind``'s marker, or ``owned``
    says it is an earlier run of this job (folders written before the marker existed).

    Raises:
        ValueError: one line naming the flag, the folder, a foreign file and the fix.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p}: exists and is not a folder; choose a folder path")
    if p.is_dir():
        # A marker being written right now by another process of the same job (DDP ranks claim
        # the run folder together) is ours: its atomic_write temporary is not a foreign file.
        entries = sorted(e.name for e in p.iterdir() if not _MARKER_TMP.fullmatch(e.name))
        if entries and folder_kind(p) != kind and not (owned is not None and owned(p)):
            raise ValueError(f"{flag} {p}: holds files hita did not write (e.g. {entries[0]!r}); "
                             "choose a new or empty folder")
    return p


def claim_folder(path: str | os.PathLike, kind: str, flag: str = "--out",
                 owned: Callable[[Path], bool] | None = None) -> Path:
    """:func:`check_claimable`, then create the folder and mark it as ``kind``'s."""
    p = check_claimable(path, kind, flag, owned)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {p}: cannot create it ({e.strerror or e}); choose a writable folder") from None
    if folder_kind(p) != kind:
        atomic_write(p / RUN_MARKER, lambda tmp: Path(tmp).write_text(json.dumps({"hita": kind}) + "\n"))
    return p


def check_output_file(path: str | os.PathLike, flag: str, owned: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, an output file that would replace something hita did not write:
    a device, FIFO, folder or link, or a regular file ``owned`` does not recognise as ours; and a
    location that cannot take a file.

    Raises:
        ValueError: one line naming the flag, the path and the fix.
    """
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise ValueError(f"{flag} {p}: exists and is not a regular file; give the path of a new file")
    if p.exists() and (owned is None or not owned(p)):
        raise ValueError(f"{flag} {p}: exists and was not written by hita; choose a new name or delete it first")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {p}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p}: folder {parent} is not writable; choose a writable folder")
    return p
