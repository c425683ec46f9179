"""Checkpoint folders of a training run: atomic writes, discovery of the latest, RNG capture.

Layout: ``<run>/checkpoints/step_00001000/`` holding ``model.safetensors`` and ``ema.safetensors`` (the
project's checkpoint format, loadable by ``hita.checkpoint``) and ``train_state.pt`` (optimizer,
scheduler, step, per-rank RNG states, discriminator, trainer config). A folder is written under a
temporary name and renamed into place, so an interrupted save never leaves a half checkpoint that
``--resume`` could pick up. A checkpoint damaged later (a truncated copy, a bad disk) is skipped on
resume: :func:`first_readable` falls back to the newest older checkpoint whose files read, with a warning.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from hita.checkpoint import check_zip_bounds
from hita.util.files import fsync_tree

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# What every train_state.pt holds (written by hita.train.loop.Trainer.save).
STATE_KEYS: tuple[str, ...] = ("step", "world_size", "rng", "optimizer", "scheduler", "ema_updates")

T = TypeVar("T")


class UnreadableCheckpoint(ValueError):
    """A checkpoint folder's files cannot be read (truncated, corrupt, missing): the message says which."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run as (step, path), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / TRAIN_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], None],
                     keep_last: int | None = None) -> Path:
    """Call ``write(tmp_folder)`` and rename the folder to ``checkpoints/step_XXXXXXXX`` atomically.

    ``keep_last``: afterwards delete all but the newest ``keep_last`` checkpoints (None keeps all).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.exists():  # a rerun over an older copy of this step: swap, then drop the old one
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        # Only this step and older ones count: a newer folder is left from a run resumed past a damaged
        # checkpoint, and keeping it must never cost the checkpoint just written (it is replaced when
        # the run reaches its step).
        older = [p for s, p in list_checkpoints(run_dir) if s <= step]
        for p in older[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read ``train_state.pt`` without unpickling code (tensors and plain containers only).

    Raises:
        UnreadableCheckpoint: the file is missing, truncated, not a weights-only pickle, or lacks
            one of :data:`STATE_KEYS`.
    """
    try:
        check_zip_bounds(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise UnreadableCheckpoint(f"{path}: unreadable training state ({type(e).__name__}); the checkpoint is "
                                   "damaged: resume from the one before it") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise UnreadableCheckpoint(f"{path}: training state lacks {', '.join(missing)}; the checkpoint is damaged: "
                                   "resume from the one before it")
    return state


def read_weights(path: Path, load: bool = True) -> dict[str, torch.Tensor] | None:
    """Read a checkpoint's safetensors file (``load=False``: only check that it is whole, which
    reads its header and compares the sizes it records with the file's).

    Raises:
        UnreadableCheckpoint: the file is missing, truncated or not safetensors.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not load:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
            return None
        return load_file(str(path))
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise UnreadableCheckpoint(f"{path}: unreadable weights ({detail}); the checkpoint is damaged: resume from "
                                   "the one before it") from None


def first_readable(newest: Path, read: Callable[[Path], T], warn: Callable[[str], None]) -> tuple[Path, T]:
    """``read(folder)`` for ``newest``, else for each older checkpoint of the same run, newest first,
    until one does not raise :class:`UnreadableCheckpoint`. Falling back calls ``warn`` with one line.

    Returns:
        (folder, read(folder)) of the checkpoint used.
    Raises:
        UnreadableCheckpoint: no checkpoint of the run can be read.
    """
    m = _STEP_DIR.match(newest.name)
    run_dir = newest.parent.parent
    older = [p for s, p in reversed(list_checkpoints(run_dir)) if m is not None and s < int(m.group(1))]
    failures: list[tuple[Path, str]] = []
    for folder in [newest, *older]:
        try:
            result = read(folder)
        except UnreadableCheckpoint as e:
            failures.append((folder, str(e).split("; ")[0]))
            continue
        if failures:
            names = ", ".join(f.name for f, _ in failures)
            warn(f"checkpoint {names} cannot be read ({failures[0][1]}); resuming from {folder.name} instead "
                 "(the damaged folder is kept, and replaced when the run reaches its step)")
        return folder, result
    raise UnreadableCheckpoint(
        f"{newest.parent}: none of the {len(failures)} checkpoints can be read (newest: {failures[0][1]}); restore "
        "the checkpoint files, or start over with a new --run-dir"
    )


# ----------------------------------------------------------------------------------------------
# RNG states (torch CPU / CUDA, numpy, python), as weights-only-loadable containers
# ----------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
