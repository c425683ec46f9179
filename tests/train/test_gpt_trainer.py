"""GPT training on codes of real Fashion-MNIST images: learning, exact resume, DDP = single process."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hita.checkpoint import CheckpointError, load_gpt, save_model
from hita.config import GPTConfig
from hita.train.common import TrainError
from hita.train.distributed import DistInfo
from hita.train.gpt_trainer import drop_labels, gpt_train_config, param_groups, train_gpt
from hita.models.gpt import HitaGPT
from hita.train.progress import read_log

RESUME_ATOL = 0.0  # bit-exact: same data order, dropout RNG restored, optimizer state restored
# See test_tokenizer_trainer: Adam turns float rounding of near-zero gradients into small steps.
DDP_MEAN_TOL = 1e-3  # × lr, mean |Δw|
DDP_MAX_TOL = 1.0  # × lr, worst element


def _cfg(tmp_path, name, **kw):
    base = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, log_every=1, ckpt_every=1000, progress=False,
                workers=0, threads=1)
    base.update(kw)
    return gpt_train_config("tiny", str(tmp_path / name), **base)


def test_loss_decreases_on_codes(tmp_path, tiny_codes):
    final = train_gpt(_cfg(tmp_path, "run", codes=str(tiny_codes), steps=16))
    loss = [line["loss"] for line in read_log(tmp_path / "run") if "loss" in line]
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.5, loss
    gpt = load_gpt(final)  # the result loads through the project's checkpoint reader (as `hita export` does)
    assert gpt.cfg == GPTConfig.from_name("tiny")


def test_resume_equals_uninterrupted_online_run(tmp_path, tiny_tokenizer, fashion, weights):
    # Online tokenization, the preset's dropout (RNG state is resumed) and class-label dropout.
    kw = dict(tokenizer=str(tiny_tokenizer), data=fashion, limit=64, ema_decay=0.9, ckpt_every=2)
    train_gpt(_cfg(tmp_path, "full", **kw))
    train_gpt(_cfg(tmp_path, "split", steps=2, **kw))
    train_gpt(_cfg(tmp_path, "split", resume=True, **kw))
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(tmp_path / "full/checkpoints/step_00000004" / name)
        b = weights(tmp_path / "split/checkpoints/step_00000004" / name)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=RESUME_ATOL), (name, k)
    assert torch.equal(weights(tmp_path / "full/gpt.safetensors")["output.weight"],
                       weights(tmp_path / "split/gpt.safetensors")["output.weight"])


def test_ddp_two_processes_equal_one(tmp_path, tiny_codes, ddp_runs, weights):
    # Model dropout off (its masks are per process); class-label dropout stays on: drawn per global sample.
    train_gpt(_cfg(tmp_path, "single", codes=str(tiny_codes), steps=2, dropout=0.0, ckpt_every=2))
    a = weights(tmp_path / "single/checkpoints/step_00000002/model.safetensors")
    b = weights(ddp_runs["gpt"] / "checkpoints/step_00000002/model.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.mean().item() <= DDP_MEAN_TOL * 1e-3 and diff.max().item() <= DDP_MAX_TOL * 1e-3, (diff.mean(), diff.max())
    la = [line["loss"] for line in read_log(tmp_path / "single") if "loss" in line]
    lb = [line["loss"] for line in read_log(ddp_runs["gpt"]) if "loss" in line]
    assert la == pytest.approx(lb, rel=1e-5)


def test_weight_decay_only_on_matrices():
    from hita.models.gpt import HitaGPT

    model = HitaGPT(GPTConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.05)
    named = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {named[id(p)] for p in decay["params"]} >= {"cls_embedding.embedding_table.weight", "slot_pos.weight", "output.weight"}
    assert all(named[id(p)].endswith("norm.weight") for p in no_decay["params"])


def test_class_dropout_is_per_global_sample():
    labels = torch.arange(8) % 3
    whole = drop_labels(labels, step=5, seed=0, p=0.5, null_class=10, info=DistInfo())
    halves = [drop_labels(labels[r * 4:(r + 1) * 4], 5, 0, 0.5, 10, DistInfo(rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert (whole == 10).any() and (whole != 10).any()


def test_bad_inputs(tmp_path, tiny_tokenizer, tiny_codes, fashion):
    with pytest.raises(TrainError, match="do not fit together"):
        train_gpt(gpt_train_config("GPT-B", str(tmp_path / "a"), codes=str(tiny_codes), progress=False))
    with pytest.raises(TrainError, match="either --codes"):
        train_gpt(_cfg(tmp_path, "b", codes=str(tiny_codes), tokenizer=str(tiny_tokenizer)))
    train_gpt(_cfg(tmp_path, "c", codes=str(tiny_codes), steps=1))
    with pytest.raises(CheckpointError, match="holds a hita gpt, not a tokenizer"):
        train_gpt(_cfg(tmp_path, "d", tokenizer=str(tmp_path / "c/gpt.safetensors"), data=fashion))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train_gpt(_cfg(tmp_path, "c", codes=str(tiny_codes), steps=2))
    with pytest.raises(TrainError, match="another variant"):  # a different model config cannot resume it
        train_gpt(_cfg(tmp_path, "c", codes=str(tiny_codes), steps=2, dropout=0.0, resume=True))


def test_init_continues_from_a_gpt_file(tmp_path, tiny_codes, tiny_tokenizer, weights):
    # Continued training: a run started from another run's final raw weights (no EMA, dropout off, so
    # nothing but the weights carries over) starts exactly where that run's weights were.
    kw = dict(codes=str(tiny_codes), ema_decay=0.0, dropout=0.0, class_dropout=0.0)
    first = train_gpt(_cfg(tmp_path, "first", steps=2, **kw))
    train_gpt(_cfg(tmp_path, "next", steps=1, lr=1e-12, init=str(first), **kw))
    a, b = weights(first), weights(tmp_path / "next/gpt.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)
    start = read_log(tmp_path / "next")[0]
    assert start["init"] == str(first)
    train_gpt(_cfg(tmp_path, "fresh", steps=1, lr=1e-12, **kw))  # without --init: other (random) weights
    assert not torch.allclose(a["output.weight"], weights(tmp_path / "fresh/gpt.safetensors")["output.weight"])
    # Refused before any run folder exists: a tokenizer file, and a file of another preset.
    with pytest.raises(TrainError, match="--init: .*not a gpt|--init: .*tokenizer"):
        train_gpt(_cfg(tmp_path, "bad1", init=str(tiny_tokenizer), **kw))
    other = dataclasses.replace(GPTConfig.from_name("tiny"), n_layer=2)
    save_model(HitaGPT(other), other, tmp_path / "two-layer.safetensors")
    with pytest.raises(TrainError, match="variant of preset 'tiny' with other n_layer"):
        train_gpt(_cfg(tmp_path, "bad2", init=str(tmp_path / "two-layer.safetensors"), **kw))
    assert not (tmp_path / "bad1").exists() and not (tmp_path / "bad2").exists()
