"""Fine-tuning options of the tokenizer trainer: --init, --restart-dead-codes, --patch-dropout.

Every run is the tiny preset on 64 real Fashion-MNIST images, batch 4, a few steps (about a second each).
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hita.cli.app import app
from typer.testing import CliRunner

from hita.checkpoint import load_tokenizer, save_model
from hita.config import TokenizerConfig
from hita.data import Augmented, open_dataset
from hita.models.tokenizer import HitaTokenizer
from hita.train.progress import read_log
from hita.train.tokenizer_trainer import TokenizerTrainConfig, tokenizer_train_config, train_tokenizer


def _cfg(tmp_path, data, name, **kw):
    base = dict(steps=4, batch_size=4, limit=64, lr=1e-3, warmup_steps=0, disc="none", log_every=1,
                ckpt_every=1000, progress=False, workers=0, threads=1)
    base.update(kw)
    return tokenizer_train_config("tiny", data, str(tmp_path / name), **base)


def _losses(run) -> list[float]:
    return [line["loss"] for line in read_log(run) if "loss" in line]


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory) -> str:
    """A tiny tokenizer whose holistic codebook is collapsed by construction: all 512 rows are the same
    unit vector, so the argmin (first index on ties) picks code 0 for every slot of every image."""
    torch.manual_seed(0)
    cfg = TokenizerConfig.from_name("tiny")
    tok = HitaTokenizer(cfg)
    with torch.no_grad():
        row = torch.nn.functional.normalize(torch.randn(cfg.holistic_code_dim), dim=0)
        tok.slot_quantize.embedding.weight.copy_(row.expand_as(tok.slot_quantize.embedding.weight))
    path = tmp_path_factory.mktemp("collapsed") / "collapsed.safetensors"
    save_model(tok, cfg, path)
    return str(path)


def _distinct_holistic(weights, data: str) -> int:
    """Distinct holistic codes over the 64 images the runs trained on."""
    tok = load_tokenizer(weights)
    view = Augmented(open_dataset(data, limit=64), 32, "resize", 0)
    images = torch.stack([view[i, 0][0] for i in range(64)])
    with torch.no_grad():
        hol, _ = tok.encode(images)
    return int(hol.unique().numel())


def test_defaults_keep_the_reference_recipe():
    for preset in TokenizerConfig.PRESETS:
        cfg = tokenizer_train_config(preset, "d", "r")
        assert (cfg.init, cfg.restart_dead_codes, cfg.patch_dropout) == (None, 0, 0.0), preset
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.patch_dropout = 0.5  # type: ignore[misc]
    assert TokenizerTrainConfig.__dataclass_params__.frozen


def test_options_off_reproduce_the_plain_run_bit_for_bit(tmp_path, fashion, collapsed):
    # The usage hook of the restarts must not perturb anything: a window longer than the run registers
    # it without ever restarting, and the losses must equal a run without the option exactly.
    train_tokenizer(_cfg(tmp_path, fashion, "plain", init=collapsed))
    train_tokenizer(_cfg(tmp_path, fashion, "hooked", init=collapsed, restart_dead_codes=1000, patch_dropout=0.0))
    plain, hooked = _losses(tmp_path / "plain"), _losses(tmp_path / "hooked")
    assert len(plain) == 4 and plain == hooked
    # ...while patch dropout does change the very first loss (the option is wired to the forward).
    train_tokenizer(_cfg(tmp_path, fashion, "dropped", init=collapsed, patch_dropout=0.75))
    assert _losses(tmp_path / "dropped")[0] != plain[0]


def test_init_starts_from_the_given_weights(tmp_path, fashion, collapsed, weights):
    # lr 1e-9: Adam moves each weight by at most ~lr per step, so the run's weights are the init's to 1e-8.
    final = train_tokenizer(_cfg(tmp_path, fashion, "run", init=collapsed, steps=1, lr=1e-9))
    a, b = weights(final), weights(collapsed)
    assert a.keys() == b.keys()
    params = [k for k in a if not k.endswith("codebook_used")]  # the usage logs record the step's codes
    assert len(params) > 50
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in params) < 1e-6
    assert _distinct_holistic(collapsed, fashion) == 1  # the fixture really is collapsed


def test_restarts_revive_dead_codes(tmp_path, fashion, collapsed):
    train_tokenizer(_cfg(tmp_path, fashion, "off", init=collapsed, steps=4))
    train_tokenizer(_cfg(tmp_path, fashion, "on", init=collapsed, steps=4, restart_dead_codes=2))
    off = _distinct_holistic(tmp_path / "off/tokenizer.safetensors", fashion)
    on = _distinct_holistic(tmp_path / "on/tokenizer.safetensors", fashion)
    # Without restarts the 511 duplicate rows never win the argmin against code 0 (or its first duplicate);
    # with restarts every 2 steps they are moved onto real holistic vectors: many distinct codes.
    assert off <= 2, off
    assert on >= 10 * off and on >= 20, (off, on)
    events = [e for e in read_log(tmp_path / "on") if e.get("event") == "restart"]
    assert [e["step"] for e in events] == [2, 4]
    assert events[0]["restarted"] >= 510 and events[0]["holistic_codes_used_window"] <= 2


def test_restarts_overwrite_the_ema_rows(tmp_path, fashion, collapsed, weights):
    # With an EMA kept, restarted codes must be the new codes in the averaged file too, not a blend with
    # the dead position (the run's raw and EMA codebooks agree on every restarted row).
    train_tokenizer(_cfg(tmp_path, fashion, "ema", init=collapsed, steps=2, restart_dead_codes=2, ema_decay=0.9,
                         ckpt_every=2))
    ck = tmp_path / "ema/checkpoints/step_00000002"
    raw = weights(ck / "model.safetensors")["slot_quantize.embedding.weight"]
    ema = weights(ck / "ema.safetensors")["slot_quantize.embedding.weight"]
    init = weights(collapsed)["slot_quantize.embedding.weight"]
    # Restarted rows jump to new directions (|Δ| ~ 1); the one live code moves by ~lr·steps = 2e-3.
    moved = (raw - init).abs().amax(dim=1) > 0.05
    assert moved.sum() >= 500
    assert torch.equal(raw[moved], ema[moved])


def test_resume_across_a_restart_window_equals_an_unbroken_run(tmp_path, fashion, collapsed, weights):
    # The window's usage is part of the checkpoint: a run split inside a window restarts the same codes.
    kw = dict(init=collapsed, restart_dead_codes=3, patch_dropout=0.5, ckpt_every=2)
    train_tokenizer(_cfg(tmp_path, fashion, "full", **kw))
    train_tokenizer(_cfg(tmp_path, fashion, "split", steps=2, **kw))
    train_tokenizer(_cfg(tmp_path, fashion, "split", resume=True, **kw))
    a = weights(tmp_path / "full/checkpoints/step_00000004/model.safetensors")
    b = weights(tmp_path / "split/checkpoints/step_00000004/model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _one_line_error(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_option_values_are_one_line_errors(tmp_path, fashion, monkeypatch):
    monkeypatch.setenv("HITA_NO_PROGRESS", "1")
    runner = CliRunner()
    base = ["train", "tokenizer", "--preset", "tiny", "--data", fashion, "--run-dir", str(tmp_path / "r"),
            "--steps", "1", "--batch-size", "2", "--limit", "4", "--workers", "0", "--disc", "none"]

    def cli(*extra):
        return runner.invoke(app, [*base, *map(str, extra)])

    _one_line_error(cli("--patch-dropout", "1.5"), r"--patch-dropout must lie in \[0, 1\] \(got 1\.5\).*0 turns it off")
    _one_line_error(cli("--patch-dropout", "-0.1"), r"--patch-dropout must lie in \[0, 1\]")
    _one_line_error(cli("--patch-dropout", "nan"), r"patch-dropout must be a finite number")
    _one_line_error(cli("--restart-dead-codes", "-1"), r"--restart-dead-codes must be >= 0 \(got -1\).*0 turns them off")
    _one_line_error(cli("--init", tmp_path / "missing.safetensors"), r"--init: .*no such checkpoint file")
    cfg = dataclasses.replace(TokenizerConfig.from_name("tiny"), n_holistic=8)
    save_model(HitaTokenizer(cfg), cfg, tmp_path / "variant.safetensors")
    _one_line_error(cli("--init", tmp_path / "variant.safetensors"), r"variant of preset 'tiny' with other n_holistic")
    assert not (tmp_path / "r").exists()  # nothing written before the options were checked
