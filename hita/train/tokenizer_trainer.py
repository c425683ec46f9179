"""Tokenizer training (spec 6.1): reconstruction + LPIPS + GAN + VQ (+ VFM for Hita-U).

Generator loss = ``rec(x, x̂) + MSE(x, x̂)`` (2×MSE by default, or L1 + MSE) + ``perceptual_weight ·
LPIPS`` + ``quant_loss`` (vq + commit of both codebooks) + ``vfm_weight · (1 − cos)`` (Hita-U) +
``disc_weight · softplus(−D(x̂))`` from ``disc_start`` on. Discriminator loss = ``disc_weight · hinge``
from ``disc_start`` on (before it the discriminator is not run: with zero weight it would not change).
Adam (β 0.9 / 0.95, no weight decay) for both, gradient clipping, linear warm-up then a constant rate
for the tokenizer, EMA of its weights, bf16 autocast where the device supports it, DDP under torchrun.

``train_tokenizer(config)`` is the library entry point; ``tokenizer_train_config(preset, ...)`` fills in
the recipe of a preset (the reference numbers for hita-v / hita-u, small-data numbers for tiny).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hita.config import TokenizerConfig
from hita.data import Augmented, StepBatchSampler, make_loader, open_dataset
from hita.train import common
from hita.train.common import TrainError
from hita.train.discriminators import DinoDiscriminator, DinoViT, PatchGAN
from hita.train.distributed import DistInfo, init_distributed
from hita.train.ema import EMA
from hita.train.loop import Trainer
from hita.train.losses import RECON_LOSSES, hinge_d_loss, reconstruction_loss, softplus_g_loss
from hita.train.lpips import LPIPS

KIND = "tokenizer"
DISCS: tuple[str, ...] = ("auto", "patchgan", "dino", "none")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Everything a tokenizer run needs. Defaults are the reference recipe (spec 6.1)."""

    preset: str
    data: str
    run_dir: str
    steps: int = 1000
    batch_size: int = 256  # global, over all processes
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int | None = None  # None: 4 epochs of the data, as the reference
    warmup_init_lr: float = 1e-7
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 turns the EMA off
    ema_warmup: bool = False
    recon_loss: str = "mse"
    perceptual_weight: float = 1.0
    vgg: str | None = None  # torchvision VGG16 weights, local file
    lpips: str | None = None  # LPIPS v0.1 vgg.pth (linear layers), local file
    disc: str = "auto"  # auto: dino for presets with the VFM head (Hita-U), else patchgan
    disc_start: int = 20000
    disc_weight: float = 0.5
    dino: str | None = None  # DINO ViT-S/16 weights for the dino discriminator, local file
    dino_input_size: int = 224
    vfm_weight: float = 1.0
    backbone: str | None = None  # DINOv2 weights for presets with a backbone, local file
    augment: str | None = None  # None: the data set's default (crop-flip for folders)
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


# Per-preset recipe defaults (over the dataclass defaults). tiny: 32×32 Fashion-MNIST-sized runs.
RECIPES: dict[str, dict[str, Any]] = {
    "hita-v": {},
    "hita-u": {},
    "tiny": dict(batch_size=32, lr=4e-4, warmup_steps=100, ema_decay=0.999, ema_warmup=True, disc_start=3000,
                 ckpt_every=500, log_every=10, precision="auto"),
}


def tokenizer_train_config(preset: str, data: str, run_dir: str, **overrides: Any) -> TokenizerTrainConfig:
    """The recipe of ``preset`` with ``overrides`` (None values ignored) applied."""
    base = {"preset": preset, "data": data, "run_dir": run_dir, **RECIPES.get(preset, {})}
    return common.with_overrides(TokenizerTrainConfig, base, overrides)


class _Reconstruct(nn.Module):
    """``forward = reconstruct``, so that DDP sees the training computation as the module's forward."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        out = self.tokenizer.reconstruct(x)
        return out.recon, out.quant_loss, out.vfm_loss


class _DiscPair(nn.Module):
    """Both discriminator passes of one step in one forward (one DDP forward per backward)."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        return self.disc(real), self.disc(fake)


def _check(cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig) -> str:
    common.check_common(cfg)
    if cfg.recon_loss not in RECON_LOSSES:
        raise TrainError(f"unknown --recon-loss {cfg.recon_loss!r}; valid: {', '.join(RECON_LOSSES)}")
    if cfg.disc not in DISCS:
        raise TrainError(f"unknown --disc {cfg.disc!r}; valid: {', '.join(DISCS)}")
    disc = cfg.disc if cfg.disc != "auto" else ("dino" if model_cfg.vfm_recon else "patchgan")
    if disc == "dino" and cfg.dino is None:
        raise TrainError("the dino discriminator needs frozen DINO ViT-S/16 weights: pass --dino PATH "
                         "(dino_deitsmall16_pretrain.pth), or --disc patchgan / none")
    if model_cfg.backbone is not None and cfg.backbone is None:
        raise TrainError(f"tokenizer preset {model_cfg.name!r} encodes with a frozen {model_cfg.backbone}: pass "
                         "--backbone PATH (its local weights, e.g. dinov2_vitl14_reg4_pretrain.pth)")
    if (cfg.vgg is None) != (cfg.lpips is None):
        raise TrainError("LPIPS needs both --vgg (torchvision VGG16 weights) and --lpips (LPIPS vgg.pth); "
                         "pass both, or neither to train without the perceptual loss")
    return disc


def _build_disc(kind: str, cfg: TokenizerTrainConfig) -> nn.Module | None:
    if kind == "patchgan":
        return PatchGAN()
    if kind == "dino":
        return DinoDiscriminator(DinoViT.from_file(cfg.dino), input_size=cfg.dino_input_size)
    return None


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train (or resume) a tokenizer run. Returns the path of the final weights file
    ``<run_dir>/tokenizer.safetensors`` (EMA weights when the EMA is on), written by rank 0."""
    try:
        model_cfg = TokenizerConfig.from_name(cfg.preset)
    except ValueError as e:
        raise TrainError(str(e)) from None
    disc_kind = _check(cfg, model_cfg)
    common.set_threads(cfg.threads)
    info = init_distributed(cfg.device)
    return _TokenizerTrainer(cfg, model_cfg, disc_kind, info).run()


class _TokenizerTrainer(Trainer):
    kind = KIND

    def __init__(self, cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig, disc_kind: str, info: DistInfo):
        dev = info.device
        self.dtype = common.resolve_precision(cfg.precision, dev)
        self.data = open_dataset(cfg.data, limit=cfg.limit)
        common.check_world(cfg, info)
        resume_from = common.prepare_run(cfg, KIND, model_cfg, info, {"data": self.data.describe()})
        super().__init__(cfg, model_cfg, info)
        warmup = cfg.warmup_steps
        if warmup is None:
            warmup = common.steps_of_epochs(4, len(self.data), cfg.batch_size)

        torch.manual_seed(cfg.seed)
        from hita.models.tokenizer import HitaTokenizer

        self.model = HitaTokenizer(model_cfg)
        if model_cfg.backbone is not None:
            self.model.load_backbone(cfg.backbone)
        self.model.to(dev).train()
        self.disc = _build_disc(disc_kind, cfg)
        self.lpips = LPIPS.from_files(cfg.vgg, cfg.lpips).to(dev) if cfg.vgg is not None else None
        torch.manual_seed(cfg.seed + 7919 * info.rank)  # dropout streams differ across ranks

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        init_ratio = min(1.0, cfg.warmup_init_lr / cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, common.warmup_lambda(warmup, init_ratio))
        # Only rank 0 saves, so only it keeps the average (no copy of the weights on the other ranks).
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 and info.is_main else None
        self.fwd: nn.Module = _Reconstruct(self.model)
        if self.disc is not None:
            self.disc.to(dev).train()
            self.disc_params = [p for p in self.disc.parameters() if p.requires_grad]
            self.opt_d = torch.optim.Adam(self.disc_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
            self.disc_fwd: nn.Module = _DiscPair(self.disc)
        if info.enabled:
            ids = [dev.index] if dev.type == "cuda" else None
            self.fwd = DDP(self.fwd, device_ids=ids)
            if self.disc is not None:
                self.disc_fwd = DDP(self.disc_fwd, device_ids=ids)
        if resume_from is not None:
            resume_from = self.load(resume_from)  # an older checkpoint when the newest is damaged
        self.log.event("start", step=self.step, preset=model_cfg.name, data=self.data.describe(), world=info.world,
                       disc=disc_kind, precision=str(self.dtype or "fp32"), warmup_steps=warmup,
                       resumed_from=str(resume_from) if resume_from else None)
        if self.lpips is None and cfg.perceptual_weight > 0:
            self.log.event("warning", message="LPIPS perceptual loss is off: no --vgg / --lpips weights given "
                           "(nothing is downloaded); training with reconstruction, VQ and GAN terms only")

    def batches(self):
        cfg, info = self.cfg, self.info
        sampler = StepBatchSampler(len(self.data), cfg.batch_size, cfg.seed, info.rank, info.world,
                                   start_step=self.step, stop_step=cfg.steps)
        view = Augmented(self.data, self.model_cfg.image_size, cfg.augment, cfg.seed)
        for images, _labels in make_loader(view, sampler, cfg.workers, pin_memory=info.device.type == "cuda"):
            yield images.to(info.device, non_blocking=True)

    def train_step(self, x: Tensor) -> dict[str, Tensor]:
        cfg, dev = self.cfg, self.info.device
        gan = self.disc is not None and self.step >= cfg.disc_start
        with common.autocast(dev, self.dtype):
            recon, quant_loss, vfm_loss = self.fwd(x)
        terms: dict[str, Tensor] = {"rec": reconstruction_loss(x, recon, cfg.recon_loss), "quant": quant_loss.float()}
        loss = terms["rec"] + terms["quant"]
        if self.lpips is not None and cfg.perceptual_weight > 0:
            with common.autocast(dev, self.dtype):
                terms["lpips"] = self.lpips(x, recon).float().mean()
            loss = loss + cfg.perceptual_weight * terms["lpips"]
        if vfm_loss is not None:
            terms["vfm"] = vfm_loss.float()
            loss = loss + cfg.vfm_weight * terms["vfm"]
        if gan:
            self.disc.requires_grad_(False)  # gradients flow through D into x̂ only
            with common.autocast(dev, self.dtype):
                terms["g_adv"] = softplus_g_loss(self.disc(recon))
            self.disc.requires_grad_(True)  # all of the module is trainable (the DINO ViT is not in it)
            loss = loss + cfg.disc_weight * terms["g_adv"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        terms["grad_norm"] = common.clip_grad(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if gan:
            with common.autocast(dev, self.dtype):
                logits_real, logits_fake = self.disc_fwd(x, recon.detach())
            terms["d_loss"] = cfg.disc_weight * hinge_d_loss(logits_real, logits_fake)
            self.opt_d.zero_grad(set_to_none=True)
            terms["d_loss"].backward()
            common.clip_grad(self.disc_params, cfg.grad_clip)
            self.opt_d.step()
        terms["loss"] = loss
        return {k: v.detach().float() for k, v in terms.items()}

    def extra_state(self) -> dict[str, Any]:
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "disc_optimizer": self.opt_d.state_dict()}

    def load_extra_state(self, state: dict[str, Any], folder: Path) -> None:
        if self.disc is None:
            return
        if "disc" not in state:
            raise TrainError(f"{folder} was saved without a discriminator; resume with --disc none")
        try:
            self.disc.load_state_dict(state["disc"], strict=True)
        except RuntimeError:
            raise TrainError(f"{folder} holds another kind of discriminator; resume with the --disc it used") from None
        self.opt_d.load_state_dict(state["disc_optimizer"])
