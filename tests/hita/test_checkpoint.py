"""Released-layout .pt files and our safetensors load strictly, safely and bit-identically."""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from typer.testing import CliRunner

from hita.checkpoint import CheckpointError, convert, load_gpt, load_tokenizer, read_checkpoint, save_model
from hita.cli.app import app
from hita.config import GPTConfig, TokenizerConfig
from hita.models.gpt import HitaGPT
from hita.models.tokenizer import HitaTokenizer


def _released_file(path, sd, with_ema=True):
    """Write a checkpoint the way the reference trainers do (spec section 3)."""
    blob = {
        "model": sd,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "steps": 1234,
        "args": argparse.Namespace(image_size=336, lr=1e-4, ema=True, vq_ckpt="x.pt"),
    }
    if with_ema:
        blob["ema"] = {k: v.clone() for k, v in sd.items()}
    torch.save(blob, path)
    return path


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    tok = HitaTokenizer(TokenizerConfig.from_name("tiny")).eval()
    gpt = HitaGPT(GPTConfig.from_name("tiny")).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    return tok, gpt


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_pt_loads_with_inferred_preset(tmp_path, tiny_models):
    tok, gpt = tiny_models
    t = load_tokenizer(_released_file(tmp_path / "tok.pt", tok.state_dict()))
    g = load_gpt(_released_file(tmp_path / "gpt.pt", gpt.state_dict()))
    assert t.cfg.name == "tiny" and g.cfg.name == "tiny"
    assert _same(t, tok) and _same(g, gpt)
    assert not t.training and not g.training


def test_ema_is_preferred_over_model(tmp_path, tiny_models):
    _, gpt = tiny_models
    sd = gpt.state_dict()
    path = _released_file(tmp_path / "gpt.pt", sd)
    blob = torch.load(path, weights_only=False)
    blob["ema"]["norm.weight"] = torch.full_like(sd["norm.weight"], 3.0)
    torch.save(blob, path)
    assert torch.all(load_gpt(path).norm.weight == 3.0)


def test_pt_to_safetensors_is_bit_identical(tmp_path, tiny_models):
    tok, gpt = tiny_models
    for model, load in ((tok, load_tokenizer), (gpt, load_gpt)):
        pt = _released_file(tmp_path / "m.pt", model.state_dict())
        kind, cfg = convert(pt, tmp_path / "m.safetensors")
        assert cfg.name == "tiny"
        direct, converted = load(pt), load(tmp_path / "m.safetensors")
        assert _same(direct, converted) and _same(converted, model)
        sd, meta = read_checkpoint(tmp_path / "m.safetensors")
        assert meta["hita_kind"] == kind and "hita_source_sha256" in meta


def test_save_model_roundtrip_keeps_config(tmp_path, tiny_models):
    tok, _ = tiny_models
    save_model(tok, tok.cfg, tmp_path / "t.safetensors")
    assert load_tokenizer(tmp_path / "t.safetensors").cfg == tok.cfg


def test_missing_key_and_wrong_shape_are_reported(tmp_path, tiny_models):
    _, gpt = tiny_models
    sd = dict(gpt.state_dict())
    del sd["layers.0.attention.wo.weight"]
    sd["norm.weight"] = torch.ones(7)
    sd["extra.weight"] = torch.ones(2)
    path = _released_file(tmp_path / "bad.pt", sd)
    with pytest.raises(CheckpointError) as e:
        load_gpt(path, preset="tiny")
    msg = str(e.value)
    assert "missing keys (1)" in msg and "layers.0.attention.wo.weight" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "norm.weight: checkpoint (7,) vs model (128,)" in msg
    with pytest.raises(CheckpointError, match="matches none of the presets"):
        load_gpt(path)


def test_wrong_kind_is_refused(tmp_path, tiny_models):
    tok, _ = tiny_models
    path = _released_file(tmp_path / "tok.pt", tok.state_dict())
    with pytest.raises(CheckpointError, match="holds a Hita tokenizer, not a gpt"):
        load_gpt(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_executed(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, gpt = tiny_models
    blob = {"model": gpt.state_dict(), "args": Evil()}
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_gpt(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_file_is_refused(tmp_path, tiny_models):
    _, gpt = tiny_models
    path = _released_file(tmp_path / "gpt.pt", gpt.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_gpt(path)
    save_model(gpt, gpt.cfg, tmp_path / "g.safetensors")
    st = (tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "g.safetensors").write_bytes(st[:-100])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_gpt(tmp_path / "g.safetensors")


def test_cli_convert_exit_codes(tmp_path, tiny_models):
    _, gpt = tiny_models
    good = _released_file(tmp_path / "gpt.pt", gpt.state_dict())
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(good), str(tmp_path / "out.safetensors")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out.safetensors").is_file()
    sd = dict(gpt.state_dict())
    del sd["norm.weight"]
    bad = _released_file(tmp_path / "bad.pt", sd)
    res = runner.invoke(app, ["convert", str(bad), str(tmp_path / "bad.safetensors"), "--preset", "tiny"])
    assert res.exit_code == 2
    assert "missing keys (1)" in res.output and "norm.weight" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "bad.safetensors").exists()
