"""Files: sha256 in chunks, atomic single-file writes, fsync of files and folders, the umask.

Every artifact hita writes goes through :func:`atomic_write` (one file) or is assembled in a hidden
sibling folder and renamed into place (folders, see :mod:`hita.export.manifest`), so a reader never
sees a half-written file. Temporary files are created private (``mkstemp`` uses 0600) and get the
permissions an ordinary ``open()`` would give them (``0666 & ~umask``) just before the rename, so
outputs honour the user's umask.
"""
from __future__ import annotations

import hashlib
import os
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
