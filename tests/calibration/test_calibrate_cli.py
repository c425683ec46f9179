"""`hita calibrate`, `hita export --precision`, `hita parity` on quantized folders, end to end."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from hita.cli.app import app
from hita.util.files import file_sha256

runner = CliRunner()


def _ckpt_args(tiny_ckpts) -> list[str]:
    return ["--gpt", str(tiny_ckpts["gpt"]), "--tokenizer", str(tiny_ckpts["tokenizer"])]


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_calibrate_the_embedded_model(tmp_path, monkeypatch):
    from hita.assets import default_model

    monkeypatch.setenv("HITA_NO_PROGRESS", "1")
    out = tmp_path / "set.safetensors"
    res = runner.invoke(app, ["calibrate", "--preset", "ci", "--images", "2", "--batch-images", "2",
                              "--classes", "2,5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    from hita.calibration.dataset import load_set

    s = load_set(out)
    d = default_model()
    assert s.manifest["checkpoints"] == {"gpt": file_sha256(d.gpt), "tokenizer": file_sha256(d.tokenizer)}
    assert s.tensors["class_ids"].tolist() == [2, 5]
    # Too small a budget: refused before sampling, the old set stays as it was.
    before = out.read_bytes()
    res = runner.invoke(app, ["calibrate", "--out", str(out), "--max-mib", "1", "--images", "64"])
    assert res.exit_code == 2 and "budget is 1 MiB" in _one_error_line(res)
    assert out.read_bytes() == before


def test_export_precision_needs_and_checks_a_calibration_set(tmp_path, onnx_dir, tiny_set):
    out = tmp_path / "q"
    res = runner.invoke(app, ["export", "--engine", "onnx", "--precision", "int8", "--from-onnx", str(onnx_dir),
                              "--out", str(out)])
    assert res.exit_code == 2
    assert "pass --calibration SET" in _one_error_line(res)
    res = runner.invoke(app, ["export", "--engine", "tensorrt", "--precision", "int8", "--calibration", str(tiny_set),
                              "--out", str(out)])
    assert res.exit_code == 2 and "--engine onnx --precision int8" in _one_error_line(res)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny_set.read_bytes()[:1000])
    res = runner.invoke(app, ["export", "--engine", "onnx", "--precision", "int8", "--from-onnx", str(onnx_dir),
                              "--calibration", str(corrupt), "--out", str(out)])
    assert res.exit_code == 2 and "not a readable calibration set" in _one_error_line(res)
    assert not out.exists()


def test_parity_uses_the_recipe_thresholds(int8w_dir, tiny_ckpts, tmp_path):
    report = tmp_path / "parity.json"
    args = ["parity", "--artifacts", str(int8w_dir), *_ckpt_args(tiny_ckpts), "--classes", "1", "--json", str(report)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "judged by the int8-weight recipe's thresholds" in res.output and "-> PASS" in res.output
    data = json.loads(report.read_text())
    assert data["thresholds"]["max_mean_kl"] == 2e-3 and data["thresholds"]["max_logit_diff"] is None
    # An explicit fp32 bound still wins over the recipe's: quantized logits are not fp32-exact.
    res = runner.invoke(app, [*args[:-2], "--max-logit-diff", "1e-4"])
    assert res.exit_code == 3 and "teacher-forced logits differ" in res.output


def test_report_writes_json_table_and_grid(int8w_dir, int8_dir, tiny_ckpts, tmp_path):
    out = tmp_path / "report"
    res = runner.invoke(app, ["calibrate", "--report", "--artifacts", str(int8w_dir), "--artifacts", str(int8_dir),
                              *_ckpt_args(tiny_ckpts), "--classes", "0,4", "--per-class", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "report.json").read_text())
    assert [r["recipe"] for r in data["results"]] == ["int8-weight", "int8"]
    for r in data["results"]:
        p = r["parity"]
        assert r["ok"] and 0 <= p["mean_kl"] <= r["thresholds"]["max_mean_kl"] and p["steps"] == 80
        assert r["class_accuracy"]["quantized"]["images"] == 10 and r["class_accuracy"]["judged"] is False
    table = (out / "report.md").read_text()
    assert "| int8-weight | - |" in table and "indicative" in table and "Class accuracy: 10 free-run images" in table
    # --per-class belongs to --report: refused in one line when collecting.
    res = runner.invoke(app, ["calibrate", "--per-class", "3", "--out", str(tmp_path / "set.safetensors")])
    assert res.exit_code == 2 and "--per-class is for --report" in _one_error_line(res)
    from PIL import Image

    with Image.open(out / "grid.png") as grid:   # 2 images x (fp32 + 2 recipes), cells upscaled to 96 px
        assert grid.width > 3 * 96 and grid.height > 2 * 96
