"""Plumbing shared by the trainers: errors, device / precision, run folders, recipes, saving weights.

Nothing here knows about a particular model; ``tokenizer_trainer`` and ``gpt_trainer`` compose it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from hita.checkpoint import save_state_dict
from hita.train.distributed import DistInfo
from hita.train.train_state import latest_checkpoint
from hita.util.files import check_claimable, claim_folder

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
RUN_CONFIG = "config.json"


class TrainError(ValueError):
    """A training run cannot start or continue; the message's first line says why and what to do."""


def read_init(path: str | None, what: str, load, model_cfg, ignore: tuple[str, ...] = ()):
    """The state dict of the ``--init`` file ``path`` (None without one), checked against the run's
    config before any run folder is touched: same preset, same fields except those in ``ignore``
    (training-only ones such as dropout rates, which the weights do not depend on)."""
    if path is None:
        return None
    from hita.checkpoint import CheckpointError

    try:
        model = load(path)
    except CheckpointError as e:
        raise TrainError(f"--init: {str(e).splitlines()[0]}") from None
    if model.cfg.name != model_cfg.name:
        raise TrainError(f"--init {path} holds a {what} of preset {model.cfg.name!r}, not {model_cfg.name!r}; "
                         f"pass --preset {model.cfg.name} or a {model_cfg.name} {what}")
    fields = [f.name for f in dataclasses.fields(model_cfg)
              if f.name not in ignore and getattr(model.cfg, f.name) != getattr(model_cfg, f.name)]
    if fields:
        raise TrainError(f"--init {path} holds a variant of preset {model_cfg.name!r} with other "
                         f"{', '.join(fields)}; pass a {what} made with the {model_cfg.name} preset itself")
    return model.state_dict()


def with_overrides(cls, base: Mapping[str, Any], overrides: Mapping[str, Any]):
    """``cls(**base, **overrides)`` where overrides equal to None are dropped and unknown keys rejected."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = dict(base)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(kw) - names)
    if unknown:
        raise TrainError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    return cls(**kw)


def check_common(cfg) -> None:
    """Range checks on the fields every trainer config has (every float must be finite: an inf
    learning rate trains to NaN weights without any error)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainError(f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
    for name in ("steps", "batch_size", "log_every", "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.lr <= 0:
        raise TrainError(f"--lr must be positive (got {cfg.lr})")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise TrainError(f"--ema-decay must lie in [0, 1) (got {cfg.ema_decay}); 0 turns the EMA off")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    if cfg.keep_last is not None and cfg.keep_last < 1:
        raise TrainError(f"--keep-last must be at least 1 (got {cfg.keep_last})")
    if cfg.workers < 0:
        raise TrainError(f"--workers must be >= 0 (got {cfg.workers})")


def check_world(cfg, info: DistInfo) -> None:
    if cfg.batch_size % info.world:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world} processes; pass a "
                         "multiple of the process count")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 where the device supports it ("auto" = bf16 on CUDA when supported),
    None for plain fp32."""
    if precision == "fp32":
        return None
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not supported:
            raise TrainError(f"bf16 is not supported on {device}; pass --precision fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and supported else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_lambda(warmup_steps: int, init_ratio: float):
    """LR factor: linear from ``init_ratio`` to 1 over ``warmup_steps`` steps, then constant (the
    reference's schedule: its cosine has lr_min = lr, so after warm-up the rate is flat)."""

    def factor(step: int) -> float:
        if step >= warmup_steps:
            return 1.0
        return init_ratio + (1.0 - init_ratio) * step / warmup_steps

    return factor


def clip_grad(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.zeros((), device=params[0].device)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise TrainError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------


def prepare_run(cfg, kind: str, model_cfg, info: DistInfo, extra: Mapping[str, Any] | None = None) -> Path | None:
    """Check the run folder against ``cfg`` and return the checkpoint to resume from (or None).

    A folder that already has checkpoints needs ``resume=True``; resuming needs the same model config
    (the preset and everything in it) as the checkpoint's. Rank 0 writes ``config.json``.
    """
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise TrainError(f"run folder {run} is a file; pass a folder path to --run-dir")
    try:  # never write into a folder of someone else's files
        check_claimable(run, "train", "--run-dir", owned=lambda p: read_run_config(p) is not None)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ckpt = latest_checkpoint(run)
    if ckpt is None and cfg.resume and info.is_main:
        print(f"--resume: no checkpoint in {run} yet; starting from step 0", file=sys.stderr, flush=True)
    if ckpt is not None and not cfg.resume:
        raise TrainError(f"{run} already holds checkpoints (latest {ckpt.name}); pass --resume to continue "
                         "that run or choose a new --run-dir")
    if ckpt is not None:
        saved = read_run_config(run)
        if saved is not None:
            if saved.get("kind") != kind:
                raise TrainError(f"{run} holds a {saved.get('kind')} run, not a {kind} run; choose a new --run-dir")
            if saved.get("model") != json.loads(model_cfg.to_json()):
                name = saved.get("model", {}).get("name")
                raise TrainError(
                    f"{run} was trained with {kind} preset {name!r} (or another variant of it), not "
                    f"{model_cfg.name!r}; pass --preset {name} to resume it, or choose a new --run-dir"
                )
    if info.is_main:
        claim_folder(run, "train", "--run-dir", owned=lambda p: read_run_config(p) is not None)
        body = {"kind": kind, "model": model_cfg.to_dict(), "trainer": dataclasses.asdict(cfg),
                "world_size": info.world, **(extra or {})}
        tmp = run / f".{RUN_CONFIG}.tmp"
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, run / RUN_CONFIG)
    return ckpt


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``config.json``; ``None`` when absent or not one hita wrote (not a JSON object with
    the run's ``kind``, ``model`` and ``trainer``)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("kind") in ("gpt", "tokenizer") and isinstance(data.get("model"), dict) \
        and isinstance(data.get("trainer"), dict)
    return data if ok else None


def save_weights(sd: Mapping[str, torch.Tensor], kind: str, model_cfg, path: Path, step: int,
                 ema: bool) -> None:
    """Weights in the project's format (safetensors + ``hita_kind`` / ``hita_config`` metadata)."""
    save_state_dict(sd, kind, model_cfg, path, {"hita_train_step": str(step), "hita_ema": str(ema).lower()})


def steps_of_epochs(epochs: float, n_images: int, batch: int) -> int:
    return max(0, math.ceil(epochs * (n_images // batch)))
