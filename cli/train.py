"""`hita train tokenizer|gpt`: thin commands over ``hita.train`` (one library call each).

Options left unset take the preset's recipe (``hita.train.tokenizer_trainer.RECIPES`` /
``gpt_trainer.RECIPES`` over the reference defaults). Under ``torchrun --nproc_per_node N $(which hita)
train ...`` the same command runs DDP; ``--batch-size`` is the global batch.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from hita.cli.common import progress_enabled, user_errors

from hita.config import GPTConfig, TokenizerConfig

train_app = typer.Typer(no_args_is_help=True, help="Train a Hita tokenizer or GPT (DDP under torchrun).")

TokPreset = Enum("TokPreset", {n: n for n in TokenizerConfig.PRESETS}, type=str)  # type: ignore[misc]
GPTPreset = Enum("GPTPreset", {n: n for n in GPTConfig.PRESETS}, type=str)  # type: ignore[misc]


class TrainPrecision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Recon(str, Enum):
    mse = "mse"
    l1 = "l1"


class Disc(str, Enum):
    auto = "auto"
    patchgan = "patchgan"
    dino = "dino"
    none = "none"


class Augment(str, Enum):
    crop_flip = "crop-flip"
    resize_flip = "resize-flip"
    center = "center"
    resize = "resize"


# Options shared by both commands (None = the preset's recipe value).
RunDir = Annotated[Path, typer.Option("--run-dir", help="Run folder: config.json, log.jsonl, checkpoints/, final weights.")]
Steps = Annotated[Optional[int], typer.Option("--steps", "--max-steps", min=1, help="Total optimizer steps of the run.")]
Batch = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Global batch size (over all processes).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")]
Warmup = Annotated[Optional[int], typer.Option("--warmup-steps", min=0, help="Linear warm-up steps.")]
EmaDecay = Annotated[Optional[float], typer.Option("--ema-decay", help="EMA decay (0 = no EMA).")]
GradClip = Annotated[Optional[float], typer.Option("--grad-clip", min=0.0, help="Gradient-norm clip (0 = off).")]
Data = Annotated[Optional[str], typer.Option("--data", help="'fashion-mnist', a folder of Fashion-MNIST IDX files, or an image folder with one sub-folder per class.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N images.")]
Aug = Annotated[Optional[Augment], typer.Option("--augment", help="Augmentation (default: crop-flip for folders, resize-flip for Fashion-MNIST).")]
Prec = Annotated[TrainPrecision, typer.Option("--precision", help="auto = bf16 autocast on CUDA with bf16 support, else fp32.")]
Dev = Annotated[Optional[Device], typer.Option("--device", help="cpu or cuda (default: cuda when available).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of weights, data order, augmentation and dropout.")]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes per rank.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads per process.")]
LogEvery = Annotated[Optional[int], typer.Option("--log-every", min=1, help="Steps between log lines.")]
CkptEvery = Annotated[Optional[int], typer.Option("--ckpt-every", min=1, help="Steps between checkpoints.")]
KeepLast = Annotated[Optional[int], typer.Option("--keep-last", min=1, help="Keep only the newest N checkpoints.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint.")]
Backbone = Annotated[Optional[Path], typer.Option("--backbone", help="Local DINOv2 weights, for tokenizers with a backbone.")]


def _device(device: Device | None) -> str:
    if device is not None:
        return device.value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _str(p) -> str | None:
    return None if p is None else str(p.value if isinstance(p, Enum) else p)


@train_app.command("tokenizer")
@user_errors
def tokenizer(
    preset: Annotated[TokPreset, typer.Option("--preset", help="Tokenizer preset.")],
    data: Data,
    run_dir: RunDir,
    steps: Steps = None,
    batch_size: Batch = None,
    lr: Lr = None,
    warmup_steps: Warmup = None,
    ema_decay: EmaDecay = None,
    grad_clip: GradClip = None,
    recon_loss: Annotated[Optional[Recon], typer.Option(help="mse: 2×MSE (reference); l1: L1 + MSE.")] = None,
    perceptual_weight: Annotated[Optional[float], typer.Option(help="LPIPS weight.")] = None,
    vgg: Annotated[Optional[Path], typer.Option(help="Local torchvision VGG16 weights (for LPIPS).")] = None,
    lpips: Annotated[Optional[Path], typer.Option(help="Local LPIPS v0.1 vgg.pth linear weights.")] = None,
    disc: Annotated[Optional[Disc], typer.Option(help="Discriminator (auto: dino for hita-u, else patchgan).")] = None,
    disc_start: Annotated[Optional[int], typer.Option(min=0, help="Step at which the GAN terms start.")] = None,
    disc_weight: Annotated[Optional[float], typer.Option(help="Weight of both GAN terms.")] = None,
    dino: Annotated[Optional[Path], typer.Option(help="Local DINO ViT-S/16 weights (dino discriminator).")] = None,
    vfm_weight: Annotated[Optional[float], typer.Option(help="Weight of the Hita-U VFM loss.")] = None,
    backbone: Backbone = None,
    augment: Aug = None,
    limit: Limit = None,
    precision: Prec = TrainPrecision.auto,
    device: Dev = None,
    seed: Seed = 0,
    workers: Workers = 2,
    threads: Threads = None,
    log_every: LogEvery = None,
    ckpt_every: CkptEvery = None,
    keep_last: KeepLast = None,
    resume: Resume = False,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start from this tokenizer's weights (fine-tune; same preset). Ignored when --resume finds "
        "a checkpoint.")] = None,
    restart_dead_codes: Annotated[int, typer.Option(
        "--restart-dead-codes", help="Every N steps, move holistic codes unused in those N steps onto holistic "
        "vectors of the current batch (0 = off, the reference).")] = 0,
    patch_dropout: Annotated[float, typer.Option(
        "--patch-dropout", help="Per image, zero a random share in [0, P] of the patch features before the "
        "fusion decoder, so the holistic tokens must carry global appearance (0 = off, the reference).")] = 0.0,
) -> None:
    """Train a tokenizer: reconstruction + LPIPS + GAN + VQ (+ VFM for hita-u); optionally fine-tune one
    (--init) with holistic dead-code restarts and patch dropout."""
    from hita.train.tokenizer_trainer import tokenizer_train_config, train_tokenizer

    cfg = tokenizer_train_config(
        _str(preset), data, str(run_dir), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        ema_decay=ema_decay, grad_clip=grad_clip, recon_loss=_str(recon_loss), perceptual_weight=perceptual_weight,
        vgg=_str(vgg), lpips=_str(lpips), disc=_str(disc), disc_start=disc_start, disc_weight=disc_weight,
        dino=_str(dino), vfm_weight=vfm_weight, backbone=_str(backbone), augment=_str(augment), limit=limit,
        precision=precision.value, device=_device(device), seed=seed, workers=workers, threads=threads,
        log_every=log_every, ckpt_every=ckpt_every, keep_last=keep_last, resume=resume,
        progress=progress_enabled(), init=_str(init), restart_dead_codes=restart_dead_codes,
        patch_dropout=patch_dropout,
    )
    path = train_tokenizer(cfg)
    _report(path)


@train_app.command("gpt")
@user_errors
def gpt(
    preset: Annotated[GPTPreset, typer.Option("--preset", help="GPT preset.")],
    run_dir: RunDir,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Frozen tokenizer weights (online tokenization).")] = None,
    data: Data = None,
    codes: Annotated[Optional[Path], typer.Option(help="Codes file from `hita extract-codes` (instead of --tokenizer/--data).")] = None,
    tokenizer_preset: Annotated[Optional[str], typer.Option(help="Tokenizer preset, for released files only.")] = None,
    backbone: Backbone = None,
    steps: Steps = None,
    batch_size: Batch = None,
    lr: Lr = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay (>= 2-D params).")] = None,
    warmup_steps: Warmup = None,
    ema_decay: EmaDecay = None,
    grad_clip: GradClip = None,
    class_dropout: Annotated[Optional[float], typer.Option(help="Probability of the null class label.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Override token/residual/FFN dropout.")] = None,
    augment: Aug = None,
    limit: Limit = None,
    precision: Prec = TrainPrecision.auto,
    device: Dev = None,
    seed: Seed = 0,
    workers: Workers = 2,
    threads: Threads = None,
    log_every: LogEvery = None,
    ckpt_every: CkptEvery = None,
    keep_last: KeepLast = None,
    resume: Resume = False,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start from this GPT's weights (continued training; same preset). Ignored when --resume "
        "finds a checkpoint.")] = None,
) -> None:
    """Train a class-conditional GPT on a frozen tokenizer's codes; optionally continue one (--init)."""
    from hita.train.gpt_trainer import gpt_train_config, train_gpt

    cfg = gpt_train_config(
        _str(preset), str(run_dir), tokenizer=_str(tokenizer), data=data, codes=_str(codes),
        tokenizer_preset=tokenizer_preset, backbone=_str(backbone), steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, ema_decay=ema_decay, grad_clip=grad_clip,
        class_dropout=class_dropout, dropout=dropout, augment=_str(augment), limit=limit,
        precision=precision.value, device=_device(device), seed=seed, workers=workers, threads=threads,
        log_every=log_every, ckpt_every=ckpt_every, keep_last=keep_last, resume=resume,
        progress=progress_enabled(), init=_str(init),
    )
    path = train_gpt(cfg)
    _report(path)


def _report(path: Path) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
