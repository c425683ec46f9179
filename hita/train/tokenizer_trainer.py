"""Tokenizer training (spec 6.1): reconstruction + LPIPS + GAN + VQ (+ VFM for Hita-U).

Generator loss = ``rec(x, x̂) + MSE(x, x̂)`` (2×MSE by default, or L1 + MSE) + ``perceptual_weight ·
LPIPS`` + ``quant_loss`` (vq + commit of both codebooks) + ``vfm_weight · (1 − cos)`` (Hita-U) +
``disc_weight · softplus(−D(x̂))`` from ``disc_start`` on. Discriminator loss = ``disc_weight · hinge``
from ``disc_start`` on (before it the discriminator is not run: with zero weight it would not change).
Adam (β 0.9 / 0.95, no weight decay) for both, gradient clipping, linear warm-up then a constant rate
for the tokenizer, EMA of its weights, bf16 autocast where the device supports it, DDP under torchrun.

Three options go beyond the reference; all are off by default, so every preset trains as the reference
does unless asked (see ``HolisticRestarts`` and ``PatchDropout`` for why they exist):

- ``init``: start from the weights of an existing tokenizer file (fine-tuning) instead of random ones;
- ``restart_dead_codes = N``: every N steps, holistic codes that no image of the last N steps picked
  are moved onto holistic vectors of the current batch (dead-code restarts);
- ``patch_dropout = P``: each image loses a random share in [0, P] of its quantised patch features
  before the fusion decoder, so global appearance must come through the holistic tokens.

``train_tokenizer(config)`` is the library entry point; ``tokenizer_train_config(preset, ...)`` fills in
the recipe of a preset (the reference numbers for hita-v / hita-u, small-data numbers for tiny).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    init: str | None = None  # tokenizer weights to start from (fine-tuning); None: random initialisation
    restart_dead_codes: int = 0  # every N steps, restart holistic codes unused in those N steps; 0 = off
    patch_dropout: float = 0.0  # max share of patch features zeroed per image before the fusion decoder; 0 = off


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


# Noise added to a batch vector before it becomes a restarted code: two dead codes restarted on the same
# vector must not stay identical (the argmin would then never pick the second one). 0.05 on unit vectors
# of width 12 moves a code by about 0.17 rad, far less than the spread of a batch's holistic vectors.
RESTART_NOISE = 0.05
HOLISTIC_CODEBOOK = "slot_quantize.embedding.weight"


class HolisticRestarts:
    """Dead-code restarts of the holistic codebook.

    Why: with the reference recipe on small data the holistic codebook collapses (the tiny run shipped
    before used one code per slot: 16 of 512), because only codes that win the argmin get gradient, and a
    code that never wins never moves towards the data. Every ``every`` steps, each code that no image
    picked in the window is replaced by the l2-normalised holistic vector of a random slot of the current
    batch plus ``RESTART_NOISE``, so it starts where the data is. The Adam moments of restarted rows are
    zeroed (they belong to the old position), and an EMA's rows are overwritten too (an average of the
    old and the new position would be neither).

    Usage is recorded by a forward hook on ``slot_quantize`` (training mode only), so the model's own
    ``reconstruct`` runs unchanged. Under DDP the window's usage is summed over ranks and rank 0's batch
    supplies the new codes, broadcast to every rank, so all replicas keep one codebook.
    """

    def __init__(self, model: nn.Module, every: int, info: DistInfo):
        self.vq = model.slot_quantize
        self.every, self.info = every, info
        self.used = torch.zeros(self.vq.n_codes, dtype=torch.bool, device=self.vq.embedding.weight.device)
        self.last: Tensor | None = None  # this step's holistic vectors, (B * Nh, eh), detached
        self.handle = self.vq.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output) -> None:
        if module.training:
            self.last = inputs[0].detach().reshape(-1, module.code_dim)
            self.used[output.indices.flatten()] = True

    @torch.no_grad()
    def maybe_restart(self, step: int, opt: torch.optim.Optimizer, ema: EMA | None) -> dict[str, int] | None:
        """At the end of a window: restart the dead codes; returns what it did (None between windows)."""
        if step % self.every:
            return None
        used = self.used.to(torch.int32)
        if self.info.enabled:
            dist.all_reduce(used, op=dist.ReduceOp.SUM)
        dead = torch.nonzero(used == 0).flatten()
        weight = self.vq.embedding.weight
        if len(dead) and self.last is not None:  # last is None only if no training forward ran
            if self.info.is_main:
                vecs = F.normalize(self.last.float(), dim=-1)
                pick = vecs[torch.randint(len(vecs), (len(dead),), device=vecs.device)]
                weight[dead] = F.normalize(pick + RESTART_NOISE * torch.randn_like(pick), dim=-1).to(weight.dtype)
            if self.info.enabled:
                dist.broadcast(weight.data, src=0)
            state = opt.state.get(weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0
            if ema is not None:
                ema.shadow[HOLISTIC_CODEBOOK][dead] = weight[dead].to(ema.shadow[HOLISTIC_CODEBOOK].dtype)
        n_used = int((used > 0).sum())
        self.used.zero_()
        return {"holistic_codes_used_window": n_used, "restarted": int(len(dead))}


class PatchDropout:
    """Random patch-code dropout before the fusion decoder.

    Why: the decoder can rebuild an image from the patch codes alone, and then nothing pushes the
    holistic tokens to carry information (the collapse described in ``HolisticRestarts``). Zeroing, per
    image, a random share in [0, ``max_share``] of the projected patch features (``post_quant_conv``'s
    output, i.e. what the fusion decoder reads for those cells) makes the holistic tokens the only
    source of the missing cells' content. The share is drawn per image (uniform in [0, ``max_share``]),
    so the decoder also keeps seeing nearly complete grids, which is what it gets at inference (where
    nothing is dropped). Implemented as a forward hook (training mode only) so the
    model's ``reconstruct`` is unchanged and inference never drops anything.
    """

    def __init__(self, model: nn.Module, max_share: float):
        self.max_share = max_share
        self.handle = model.post_quant_conv.register_forward_hook(self._drop)

    def _drop(self, module: nn.Module, inputs: tuple[Tensor, ...], h: Tensor) -> Tensor | None:
        if not module.training:
            return None
        b, _, gh, gw = h.shape
        keep = 1.0 - self.max_share * torch.rand(b, 1, 1, 1, device=h.device)
        return h * (torch.rand(b, 1, gh, gw, device=h.device) < keep).to(h.dtype)


def _check(cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig) -> str:
    common.check_common(cfg)
    if cfg.restart_dead_codes < 0:
        raise TrainError(f"--restart-dead-codes must be >= 0 (got {cfg.restart_dead_codes}); it is the window "
                         "in steps between holistic dead-code restarts, 0 turns them off")
    if not 0.0 <= cfg.patch_dropout <= 1.0:
        raise TrainError(f"--patch-dropout must lie in [0, 1] (got {cfg.patch_dropout}); it is the largest share "
                         "of patch codes dropped per image, 0 turns it off")
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
    init = _read_init(cfg, model_cfg)
    common.set_threads(cfg.threads)
    info = init_distributed(cfg.device)
    return _TokenizerTrainer(cfg, model_cfg, disc_kind, info, init).run()


def _read_init(cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig) -> dict[str, Tensor] | None:
    """The ``--init`` weights (checked before any run folder is touched), or None without ``--init``."""
    from hita.checkpoint import load_tokenizer

    return common.read_init(cfg.init, "tokenizer", lambda path: load_tokenizer(path, preset=None), model_cfg)


class _TokenizerTrainer(Trainer):
    kind = KIND

    def __init__(self, cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig, disc_kind: str, info: DistInfo,
                 init: dict[str, Tensor] | None = None):
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
        if init is not None:  # a resumed run overwrites these with its checkpoint's weights below
            self.model.load_state_dict(init, strict=True)
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
        self.restarts = HolisticRestarts(self.model, cfg.restart_dead_codes, info) if cfg.restart_dead_codes else None
        self.patch_dropout = PatchDropout(self.model, cfg.patch_dropout) if cfg.patch_dropout > 0 else None
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
                       resumed_from=str(resume_from) if resume_from else None, init=cfg.init,
                       restart_dead_codes=cfg.restart_dead_codes, patch_dropout=cfg.patch_dropout)
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
        if self.restarts is not None:
            done = self.restarts.maybe_restart(self.step + 1, self.opt, self.ema)  # self.step counts finished steps
            if done is not None:
                self.log.event("restart", step=self.step + 1, **done)
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
        state: dict[str, Any] = {}
        if self.restarts is not None:  # usage of the window in progress, so a resume restarts the same codes
            state["holistic_used"] = self.restarts.used.cpu().clone()
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        return state

    def load_extra_state(self, state: dict[str, Any], folder: Path) -> None:
        if self.restarts is not None and "holistic_used" in state:
            used = state["holistic_used"]
            if used.shape == self.restarts.used.shape:
                self.restarts.used.copy_(used)
        if self.disc is None:
            return
        if "disc" not in state:
            raise TrainError(f"{folder} was saved without a discriminator; resume with --disc none")
        try:
            self.disc.load_state_dict(state["disc"], strict=True)
        except RuntimeError:
            raise TrainError(f"{folder} holds another kind of discriminator; resume with the --disc it used") from None
        self.opt_d.load_state_dict(state["disc_optimizer"])
