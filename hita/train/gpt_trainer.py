"""GPT training (spec 6.2): class-conditional next-token prediction over tokenizer codes.

Each batch is tokenized online by the frozen tokenizer (its weights as given, eval mode, fp32, no
grad), as the reference does, or read from a codes file made once by ``hita extract-codes``. Labels
are replaced by the null class with probability ``cfg.class_dropout`` (drawn per global sample, so
the choice does not depend on the process count). Loss = CE(holistic) + CE(patch). AdamW (β 0.9 / 0.95)
with weight decay on parameters of two or more dimensions only, constant rate after an optional
warm-up, gradient clipping, EMA, bf16 autocast where the device supports it, DDP under torchrun.

``train_gpt(config)`` is the library entry point; ``gpt_train_config(preset, ...)`` fills in the recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hita.config import GPTConfig, check_pair
from hita.data import Augmented, StepBatchSampler, make_loader, open_dataset
from hita.train import common
from hita.train.codes import CodesView, load_codes
from hita.train.common import TrainError
from hita.train.distributed import DistInfo, init_distributed
from hita.train.ema import EMA
from hita.train.loop import Trainer
from hita.train.losses import gpt_loss

KIND = "gpt"


@dataclass(frozen=True)
class GPTTrainConfig:
    """Everything a GPT run needs. Defaults are the reference recipe (spec 6.2).

    Exactly one source of codes: ``tokenizer`` + ``data`` (online), or ``codes`` (extracted once).
    """

    preset: str
    run_dir: str
    tokenizer: str | None = None  # frozen tokenizer weights (ours or a released .pt)
    data: str | None = None
    codes: str | None = None  # a codes file from `hita extract-codes`
    tokenizer_preset: str | None = None  # only for released files whose preset is ambiguous
    backbone: str | None = None  # DINOv2 weights, for tokenizers that encode with one
    steps: int = 1000
    batch_size: int = 256  # global, over all processes
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 turns the EMA off
    ema_warmup: bool = False
    class_dropout: float | None = None  # None: the preset's (0.1)
    dropout: float | None = None  # None: the preset's token / residual / FFN dropout; else all set to this
    augment: str | None = None
    limit: int | None = None
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    workers: int = 0
    threads: int | None = None
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int | None = None
    resume: bool = False
    progress: bool = True
    init: str | None = None  # GPT weights to start from (continued training); None: random initialisation


RECIPES: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, ema_warmup=True, ckpt_every=500),
}


def gpt_train_config(preset: str, run_dir: str, **overrides: Any) -> GPTTrainConfig:
    """The recipe of ``preset`` with ``overrides`` (None values ignored) applied."""
    base = {"preset": preset, "run_dir": run_dir, **RECIPES.get(preset, {})}
    return common.with_overrides(GPTTrainConfig, base, overrides)


def _model_config(cfg: GPTTrainConfig) -> GPTConfig:
    try:
        model_cfg = GPTConfig.from_name(cfg.preset)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if cfg.dropout is not None:
        if not 0.0 <= cfg.dropout < 1.0:
            raise TrainError(f"--dropout must lie in [0, 1) (got {cfg.dropout})")
        model_cfg = dataclasses.replace(model_cfg, token_dropout=cfg.dropout, resid_dropout=cfg.dropout,
                                        ffn_dropout=cfg.dropout)
    if cfg.class_dropout is not None:
        if not 0.0 <= cfg.class_dropout < 1.0:
            raise TrainError(f"--class-dropout must lie in [0, 1) (got {cfg.class_dropout})")
        model_cfg = dataclasses.replace(model_cfg, class_dropout=cfg.class_dropout)
    return model_cfg


def _check(cfg: GPTTrainConfig) -> None:
    common.check_common(cfg)
    if cfg.codes is not None and (cfg.tokenizer is not None or cfg.data is not None):
        raise TrainError("pass either --codes FILE or --tokenizer FILE with --data, not both")
    if cfg.codes is None and (cfg.tokenizer is None or cfg.data is None):
        raise TrainError("GPT training needs --tokenizer FILE and --data (online tokenization) or --codes FILE "
                         "(from `hita extract-codes`)")
    if cfg.weight_decay < 0:
        raise TrainError(f"--weight-decay must be >= 0 (got {cfg.weight_decay})")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on parameters with >= 2 dims (Linear / Embedding weights), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def drop_labels(labels: Tensor, step: int, seed: int, p: float, null_class: int, info: DistInfo) -> Tensor:
    """Replace labels by ``null_class`` with probability ``p``; one draw per *global* sample."""
    if p <= 0:
        return labels
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7 * step + 3)
    n = labels.shape[0]
    u = torch.rand(n * info.world, generator=g)[info.rank * n:(info.rank + 1) * n].to(labels.device)
    return torch.where(u < p, torch.full_like(labels, null_class), labels)


def train_gpt(cfg: GPTTrainConfig) -> Path:
    """Train (or resume) a GPT run. Returns ``<run_dir>/gpt.safetensors`` (EMA weights when on)."""
    _check(cfg)
    model_cfg = _model_config(cfg)
    init = _read_init(cfg, model_cfg)
    common.set_threads(cfg.threads)
    info = init_distributed(cfg.device)
    return _GPTTrainer(cfg, model_cfg, info, init).run()


# Training-only fields: a file trained with other rates is still the same network.
_DROPOUT_FIELDS = ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout")


def _read_init(cfg: GPTTrainConfig, model_cfg: GPTConfig) -> dict[str, Tensor] | None:
    from hita.checkpoint import load_gpt

    return common.read_init(cfg.init, "GPT", load_gpt, model_cfg, ignore=_DROPOUT_FIELDS)


class _GPTTrainer(Trainer):
    kind = KIND

    def __init__(self, cfg: GPTTrainConfig, model_cfg: GPTConfig, info: DistInfo,
                 init: dict[str, Tensor] | None = None):
        dev = info.device
        common.check_world(cfg, info)
        self.dtype = common.resolve_precision(cfg.precision, dev)
        self.tokenizer = None
        if cfg.codes is not None:
            self.codes = load_codes(cfg.codes)
            if cfg.limit is not None:
                c = self.codes
                self.codes = dataclasses.replace(c, holistic_ids=c.holistic_ids[:cfg.limit],
                                                 patch_ids=c.patch_ids[:cfg.limit], labels=c.labels[:cfg.limit])
            tok_cfg, n, num_classes = self.codes.tokenizer_config, len(self.codes), self.codes.num_classes
            source = self.codes.describe()
        else:
            from hita.checkpoint import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_preset, backbone=cfg.backbone, device=dev)
            tok_cfg = self.tokenizer.cfg
            if tok_cfg.backbone is not None and cfg.backbone is None:
                raise TrainError(f"tokenizer {tok_cfg.name!r} encodes with a frozen {tok_cfg.backbone}: pass "
                                 "--backbone PATH (its local weights)")
            self.tokenizer.requires_grad_(False).eval()
            self.data = open_dataset(cfg.data, limit=cfg.limit)
            n, num_classes, source = len(self.data), self.data.num_classes, self.data.describe()
        try:
            check_pair(tok_cfg, model_cfg)
        except ValueError as e:
            raise TrainError(f"{e}; pass the GPT preset made for this tokenizer or the matching tokenizer") from None
        if num_classes > model_cfg.num_classes:
            raise TrainError(f"the data has {num_classes} classes but GPT preset {model_cfg.name!r} has "
                             f"{model_cfg.num_classes}; use a preset with enough classes or fewer class folders")
        self.n = n
        resume_from = common.prepare_run(cfg, KIND, model_cfg, info, {"data": source, "tokenizer": tok_cfg.to_dict()})
        super().__init__(cfg, model_cfg, info)

        torch.manual_seed(cfg.seed)
        from hita.models.gpt import HitaGPT

        self.model = HitaGPT(model_cfg).to(dev).train()
        if init is not None:  # a resumed run overwrites these with its checkpoint's weights below
            self.model.load_state_dict(init, strict=True)
        torch.manual_seed(cfg.seed + 7919 * info.rank)  # dropout streams differ across ranks
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), fused=dev.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, common.warmup_lambda(cfg.warmup_steps, 0.0))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Only rank 0 saves, so only it keeps the average (no copy of the weights on the other ranks).
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 and info.is_main else None
        self.fwd: nn.Module = self.model
        if info.enabled:
            self.fwd = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if resume_from is not None:
            resume_from = self.load(resume_from)  # an older checkpoint when the newest is damaged
        self.log.event("start", step=self.step, preset=model_cfg.name, tokenizer=tok_cfg.name, data=source,
                       online=self.tokenizer is not None, world=info.world, precision=str(self.dtype or "fp32"),
                       resumed_from=str(resume_from) if resume_from else None, init=cfg.init)

    def batches(self):
        cfg, info = self.cfg, self.info
        dev = info.device
        sampler = StepBatchSampler(self.n, cfg.batch_size, cfg.seed, info.rank, info.world,
                                   start_step=self.step, stop_step=cfg.steps)
        pin = dev.type == "cuda"
        if self.tokenizer is None:
            for hol, patch, labels in make_loader(CodesView(self.codes, cfg.seed), sampler, cfg.workers, pin):
                yield hol.to(dev), patch.to(dev), labels.to(dev)
            return
        view = Augmented(self.data, self.tokenizer.cfg.image_size, cfg.augment, cfg.seed)
        for images, labels in make_loader(view, sampler, cfg.workers, pin):
            with torch.no_grad():  # frozen tokenizer: fp32, eval, outside autocast
                hol, patch = self.tokenizer.encode(images.to(dev, non_blocking=True))
            yield hol, patch, labels.to(dev)

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        hol, patch, labels = batch
        cfg, mc, dev = self.cfg, self.model_cfg, self.info.device
        labels = drop_labels(labels, self.step, cfg.seed, mc.class_dropout, mc.null_class, self.info)
        with common.autocast(dev, self.dtype):
            hol_logits, patch_logits = self.fwd(labels, hol, patch)
        ce_h, ce_p = gpt_loss(hol_logits, patch_logits, hol, patch)
        loss = ce_h + ce_p
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = common.clip_grad(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss, "ce_holistic": ce_h, "ce_patch": ce_p, "grad_norm": grad_norm}
