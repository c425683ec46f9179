"""Tokenizer training on real Fashion-MNIST images: learning, exact resume, DDP = single process."""
from __future__ import annotations

import json

import pytest
import torch

from hita.checkpoint import load_tokenizer
from hita.train.progress import read_log
from hita.train.tokenizer_trainer import tokenizer_train_config, train_tokenizer

# Resume is compared bit for bit: with deterministic CPU kernels and the same thread count, the data
# order, augmentation, optimizer and RNG state after a resume are exactly those of an unbroken run.
RESUME_ATOL = 0.0
# DDP vs one process with the same global batch: the all-reduced gradient is the mean of two
# half-batch means, which differs from the full-batch mean by float rounding only. Adam divides by
# sqrt(v) + 1e-8, which turns rounding in near-zero gradients into visible steps for a handful of
# elements, so the check is on the mean |Δw| (≈5e-7·lr measured; unsynchronised ranks give ≈lr) and
# a bound on the worst element (≈0.3·lr measured after 2 steps).
DDP_MEAN_TOL = 1e-3  # × lr
DDP_MAX_TOL = 1.0  # × lr


def _cfg(tmp_path, data, name, **kw):
    base = dict(steps=4, batch_size=4, limit=64, lr=1e-3, warmup_steps=0, disc="none", log_every=1,
                ckpt_every=1000, progress=False, workers=0, threads=1)
    base.update(kw)
    return tokenizer_train_config("tiny", data, str(tmp_path / name), **base)


def test_loss_decreases_on_real_images(tmp_path, fashion):
    final = train_tokenizer(_cfg(tmp_path, fashion, "run", steps=14))
    rec = [line["rec"] for line in read_log(tmp_path / "run") if "rec" in line]
    assert len(rec) == 14
    first, last = sum(rec[:4]) / 4, sum(rec[-4:]) / 4
    assert last < 0.75 * first, rec
    assert final.name == "tokenizer.safetensors" and load_tokenizer(final).cfg.name == "tiny"  # what `hita export` reads
    log = read_log(tmp_path / "run")
    assert any(e.get("event") == "warning" and "LPIPS" in e["message"] for e in log)  # said once
    assert all(line["images_per_s"] > 0 for line in log if "rec" in line)


def test_resume_equals_uninterrupted_run(tmp_path, fashion, weights):
    # GAN from step 1 (PatchGAN, its BatchNorm statistics and optimizer are resumed too) and the EMA.
    kw = dict(disc="patchgan", disc_start=1, ema_decay=0.9, ema_warmup=True, ckpt_every=2)
    train_tokenizer(_cfg(tmp_path, fashion, "full", **kw))
    train_tokenizer(_cfg(tmp_path, fashion, "split", steps=2, **kw))  # "interrupted" after 2 steps
    train_tokenizer(_cfg(tmp_path, fashion, "split", resume=True, **kw))
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(tmp_path / "full/checkpoints/step_00000004" / name)
        b = weights(tmp_path / "split/checkpoints/step_00000004" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=RESUME_ATOL), (name, k)
    sa = torch.load(tmp_path / "full/checkpoints/step_00000004/train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split/checkpoints/step_00000004/train_state.pt", weights_only=True)
    for k in sa["disc"]:
        assert torch.equal(sa["disc"][k], sb["disc"][k]), k
    log = read_log(tmp_path / "split")
    assert [line["step"] for line in log if "rec" in line] == [1, 2, 3, 4]
    assert any(e.get("event") == "start" and e["resumed_from"] for e in log)


def test_lpips_and_dino_discriminator_terms(tmp_path, fashion):
    from hita.train.discriminators import DinoViT
    from hita.train.lpips import vgg16_features

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lin.pth")
    torch.save(DinoViT(64, 12, 1, 16, 32).state_dict(), tmp_path / "dino.pth")
    cfg = _cfg(tmp_path, fashion, "run", steps=2, disc="dino", disc_start=0, dino=str(tmp_path / "dino.pth"),
               dino_input_size=32, vgg=str(tmp_path / "vgg.pth"), lpips=str(tmp_path / "lin.pth"))
    train_tokenizer(cfg)
    lines = [line for line in read_log(tmp_path / "run") if "rec" in line]
    for key in ("lpips", "g_adv", "d_loss", "quant", "loss"):
        assert all(torch.isfinite(torch.tensor(line[key])) for line in lines), key
    state = torch.load(tmp_path / "run/checkpoints/step_00000002/train_state.pt", weights_only=True)
    assert all(k.startswith("heads.") for k in state["disc"])  # the frozen ViT is not saved


def test_ddp_two_processes_equal_one(tmp_path, fashion, ddp_runs, weights):
    train_tokenizer(_cfg(tmp_path, fashion, "single", steps=2, ckpt_every=2))
    ddp = ddp_runs["tokenizer"]
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    a = weights(tmp_path / "single/checkpoints/step_00000002/model.safetensors")
    b = weights(ddp / "checkpoints/step_00000002/model.safetensors")
    # codebook_used is a per-process usage log (rank 0's half batch under DDP), not a weight.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if not k.endswith("codebook_used")])
    lr = 1e-3
    assert diff.mean().item() <= DDP_MEAN_TOL * lr and diff.max().item() <= DDP_MAX_TOL * lr, (diff.mean(), diff.max())
    la = [line["loss"] for line in read_log(tmp_path / "single") if "rec" in line]
    lb = [line["loss"] for line in read_log(ddp) if "rec" in line]
    assert la == pytest.approx(lb, rel=1e-5)


def test_hita_u_recipe_with_backbone_and_vfm_loss(tmp_path, fashion, monkeypatch, weights):
    """The Hita-U path (frozen backbone from a local file, VFM cosine loss) on a toy-sized variant."""
    import dataclasses

    from hita.config import TokenizerConfig
    from hita.models import dinov2

    def toy_vit():
        return dinov2.DinoV2(dim=32, depth=1, n_heads=2, patch_size=14, base_grid=2, n_registers=4)

    monkeypatch.setitem(dinov2.BACKBONES, "dinov2_vitl14_reg4", toy_vit)
    cfg = dataclasses.replace(TokenizerConfig.from_name("tiny"), name="tiny-u", backbone="dinov2_vitl14_reg4",
                              backbone_dim=32, backbone_image_size=28, vfm_recon=True, vfm_grid=2)
    monkeypatch.setitem(TokenizerConfig.PRESETS, "tiny-u", cfg)
    torch.manual_seed(0)
    torch.save(toy_vit().state_dict(), tmp_path / "dinov2.pth")
    run = tokenizer_train_config("tiny-u", fashion, str(tmp_path / "u"), steps=3, batch_size=2, limit=8, lr=1e-3,
                                 warmup_steps=0, disc="none", backbone=str(tmp_path / "dinov2.pth"), log_every=1,
                                 progress=False, workers=0, threads=1)
    final = train_tokenizer(run)
    vfm = [line["vfm"] for line in read_log(tmp_path / "u") if "rec" in line]
    assert len(vfm) == 3 and all(0.0 <= v <= 2.0 for v in vfm)
    sd = weights(final)
    assert "decode_transformer.proj.weight" in sd and not any("backbone" in k for k in sd)
