"""`hita parity` against the checkpoints an export came from, and against the wrong ones."""
from __future__ import annotations

import json

from hita.cli.app import app
from hita.export.testing import tiny_models
from typer.testing import CliRunner

from hita.checkpoint import save_model

runner = CliRunner()


def _save(tmp_path, seed):
    gpt, tok = tiny_models(seed)
    g, t = tmp_path / f"gpt{seed}.safetensors", tmp_path / f"tok{seed}.safetensors"
    save_model(gpt, gpt.cfg, g)
    save_model(tok, tok.cfg, t)
    return ["--gpt", str(g), "--tokenizer", str(t)]


def test_parity_passes_for_the_source_checkpoints(tmp_path, onnx_dir):
    # onnx_dir holds the export of tiny_models(0).
    report = tmp_path / "report.json"
    res = runner.invoke(app, ["parity", "--artifacts", str(onnx_dir), *_save(tmp_path, 0), "--json", str(report)])
    assert res.exit_code == 0, res.output
    assert "-> PASS" in res.output
    data = json.loads(report.read_text())
    assert data["ok"] and data["max_logit_diff"] <= 1e-4 and data["token_agreement"] == 1.0


def test_parity_fails_with_exit_3_for_other_weights(tmp_path, onnx_dir):
    res = runner.invoke(app, ["parity", "--artifacts", str(onnx_dir), *_save(tmp_path, 1)])
    assert res.exit_code == 3, res.output
    assert "does not match" in res.output and "teacher-forced logits differ" in res.output


def test_parity_without_checkpoints_refuses_a_foreign_export(onnx_dir):
    res = runner.invoke(app, ["parity", "--artifacts", str(onnx_dir)])
    assert res.exit_code == 2, res.output
    assert "was not exported from the embedded default model" in res.output
