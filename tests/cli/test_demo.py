"""`hita demo` on the embedded default model: grid, parity, and the manifest-checked export cache."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from hita.assets import default_model
from hita.cli.app import app

runner = CliRunner()


def test_default_model_is_embedded_and_loads():
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.config import check_pair

    d = default_model()
    tok, gpt = load_tokenizer(d.tokenizer), load_gpt(d.gpt)
    check_pair(tok.cfg, gpt.cfg)
    assert len(d.class_names) == gpt.cfg.num_classes == 10


@pytest.mark.slow
def test_demo_writes_grid_passes_parity_and_reuses_export(tmp_path):
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out), "--per-class", "2"])
    assert first.exit_code == 0, first.output
    assert "-> PASS" in first.output and "(exported)" in first.output
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 10 * 32                      # one row per class, upscaled cells
    manifest = json.loads((out / "artifacts-onnx" / "manifest.json").read_text())
    assert manifest["checkpoints"]["gpt"] and manifest["checkpoints"]["tokenizer"]
    second = runner.invoke(app, ["demo", "--out", str(out), "--per-class", "2"])
    assert second.exit_code == 0, second.output
    assert "(cached)" in second.output
    # A changed graph file is not trusted: the demo exports again.
    f = out / "artifacts-onnx" / "decoder.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    third = runner.invoke(app, ["demo", "--out", str(out), "--per-class", "1"])
    assert third.exit_code == 0, third.output
    assert "(exported)" in third.output
