"""The loop both trainers share: steps, logging, checkpoints, resume, final weights.

A subclass builds its model, optimizer, scheduler and EMA, then implements ``batches()`` (this rank's
batches from ``self.step`` on) and ``train_step(batch) -> {name: scalar tensor}``; optional extra
training state (a discriminator) goes through ``extra_state`` / ``load_extra_state``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from hita.train import common
from hita.train.common import TrainError
from hita.train.distributed import DistInfo, all_reduce_mean, gather_objects
from hita.train.ema import EMA
from hita.train.progress import RunLog
from hita.train.train_state import (
    TRAIN_STATE,
    UnreadableCheckpoint,
    capture_rng,
    first_readable,
    load_train_state,
    read_weights,
    restore_rng,
    save_train_state,
    write_checkpoint,
)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


class Trainer:
    kind: str  # "tokenizer" | "gpt": the checkpoint kind and the final file's name
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None

    def __init__(self, cfg, model_cfg, info: DistInfo):
        self.cfg, self.model_cfg, self.info = cfg, model_cfg, info
        self.step = 0
        self.log = RunLog(cfg.run_dir, cfg.steps, 0, enabled=info.is_main, bar=cfg.progress, desc=self.kind)

    # -- subclass hooks ----------------------------------------------------------------------------

    def batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any], folder: Path) -> None:
        pass

    # -- loop --------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train up to ``cfg.steps``; rank 0 writes ``<run_dir>/<kind>.safetensors`` and returns its path."""
        cfg, info = self.cfg, self.info
        t_last, steps_since = time.perf_counter(), 0
        for batch in self.batches():
            terms = self.train_step(batch)
            self.step += 1
            steps_since += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                names = sorted(terms)
                stacked = torch.stack([terms[k].detach().float().to(info.device) for k in names])
                vals = all_reduce_mean(stacked, info).tolist()  # on the device: NCCL reduces CUDA tensors only
                metrics = dict(zip(names, vals, strict=True))
                metrics.update(lr=self.sched.get_last_lr()[0], s_per_step=(now - t_last) / steps_since,
                               images_per_s=steps_since * cfg.batch_size / (now - t_last))
                self.log.metrics(self.step, metrics)
                t_last, steps_since = now, 0
            self.log.advance()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        final = Path(cfg.run_dir) / f"{self.kind}.safetensors"
        if info.is_main:
            sd = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
            common.save_weights(sd, self.kind, self.model_cfg, final, self.step, self.ema is not None)
            self.log.event("done", step=self.step, weights=str(final))
        self.log.close()
        return final

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> None:
        rng = gather_objects(capture_rng(), self.info)  # every rank's stream (dropout, crops)
        if not self.info.is_main:
            return
        state: dict[str, Any] = {
            "step": self.step, "world_size": self.info.world, "rng": rng,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "trainer_config": dataclasses.asdict(self.cfg), **self.extra_state(),
        }

        def write(folder: Path) -> None:
            common.save_weights(self.model.state_dict(), self.kind, self.model_cfg, folder / MODEL_FILE, self.step, False)
            if self.ema is not None:
                common.save_weights(self.ema.state_dict(), self.kind, self.model_cfg, folder / EMA_FILE, self.step, True)
            save_train_state(folder / TRAIN_STATE, state)

        path = write_checkpoint(self.cfg.run_dir, self.step, write, self.cfg.keep_last)
        self.log.event("checkpoint", step=self.step, path=str(path))

    def load(self, folder: Path) -> Path:
        """Continue from checkpoint ``folder``: weights, EMA, optimizer, scheduler, RNG, step.

        When a file of ``folder`` cannot be read (truncated, corrupt), the newest older checkpoint that
        can is used instead, with a one-line warning; every rank reads the same files, so all ranks
        agree on the folder. Returns the folder resumed from.
        """
        def read(f: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None]:
            state = load_train_state(f / TRAIN_STATE)
            model_sd = read_weights(f / MODEL_FILE)
            ema_sd = None
            if (f / EMA_FILE).is_file():  # checked on every rank; loaded where an EMA is kept
                ema_sd = read_weights(f / EMA_FILE, load=self.ema is not None)
            return state, model_sd, ema_sd

        try:
            folder, (state, model_sd, ema_sd) = first_readable(
                folder, read, lambda msg: self.log.event("warning", message=msg))
        except UnreadableCheckpoint as e:
            raise TrainError(str(e)) from None
        try:
            self.model.load_state_dict(model_sd, strict=True)
        except RuntimeError as e:
            raise TrainError(f"{folder / MODEL_FILE} does not fit this model ({str(e).splitlines()[0]}); "
                             "resume with the options the run was started with or choose a new --run-dir") from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if ema_sd is None:
                raise TrainError(f"{folder} has no EMA weights but this run keeps an EMA; resume with --ema-decay 0")
            self.ema.load_state_dict(ema_sd, int(state["ema_updates"]))
        self.load_extra_state(state, folder)
        if state["world_size"] == self.info.world:
            restore_rng(state["rng"][self.info.rank])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * self.info.rank + 104729 * int(state["step"]))
            self.log.event("warning", message=f"resumed with {self.info.world} processes instead of "
                           f"{state['world_size']}: dropout RNG streams are reseeded (data order is unchanged)")
        self.step = int(state["step"])
        self.log.advance(self.step)
        return folder
