"""Resumable shard folders: large evaluations written piece by piece, continued after an interruption.

A run folder holds ``run.json`` (what the run is: models, options, feature space, shard size; any
change there would mix incomparable images) and ``shards/shard_NNNNN.npz`` files, each written
atomically once its images are generated and scored. Re-running the same command skips the shards
that exist and load; a different command on the same folder is refused in one line, so a resumed
run never mixes two configurations.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from hita.util.files import atomic_write

__all__ = ["ShardStore", "RUN_FILE"]

RUN_FILE = "run.json"
_SHARDS = "shards"


class ShardStore:
    """The shard files of one run in ``root``.

    Args:
        root: the run folder (created if missing).
        spec: JSON-able description of the run; must equal the stored one to resume.
        restart: discard existing shards (and the stored spec) first.
    Raises:
        ValueError: ``root`` holds a run with another spec and ``restart`` is off, or is not a folder.
    """

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any], restart: bool = False):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--out {self.root}: is a file; pass a folder for the run")
        self.spec = json.loads(json.dumps(spec, sort_keys=True, default=str))
        run = self.root / RUN_FILE
        if restart and (self.root / _SHARDS).is_dir():
            shutil.rmtree(self.root / _SHARDS)
        if run.is_file() and not restart:
            try:
                stored = json.loads(run.read_text())
            except (OSError, ValueError):
                raise ValueError(f"{run}: unreadable; pass --restart to start the run again") from None
            if stored != self.spec:
                keys = sorted(k for k in set(stored) | set(self.spec) if stored.get(k) != self.spec.get(k))
                raise ValueError(f"{self.root} holds a run with other settings ({', '.join(keys[:6])}); "
                                 "pass --restart to discard it, or choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _SHARDS).mkdir(exist_ok=True)
        atomic_write(run, lambda tmp: Path(tmp).write_text(json.dumps(self.spec, indent=1, sort_keys=True) + "\n"))

    def path(self, index: int) -> Path:
        return self.root / _SHARDS / f"shard_{index:05d}.npz"

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        """The arrays of shard ``index``, or None when it is missing or unreadable (then it is redone)."""
        p = self.path(index)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            return None

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> Path:
        """Write shard ``index`` atomically (numpy arrays only, no pickles)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write(self.path(index), write)
