"""`hita evaluate ...`, `hita style-transfer`, `hita inpaint` end to end; bad input is one `error:` line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hita.cli.app import app

runner = CliRunner()


def _one_error_line(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture()
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "b.png")
    m = np.zeros((28, 28), np.uint8)
    m[:, 14:] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "empty.png")
    return tmp_path


def test_style_transfer_and_inpaint_on_the_embedded_model(pngs):
    res = runner.invoke(app, ["style-transfer", "--content", str(pngs / "a.png"), "--style", str(pngs / "b.png"),
                              "--out", str(pngs / "st")])
    assert res.exit_code == 0, res.output
    assert "resized 28x28 -> 32x32" in res.output
    assert Image.open(pngs / "st" / "stylized.png").size == (32, 32) and (pngs / "st" / "grid.png").is_file()
    res = runner.invoke(app, ["inpaint", "--image", str(pngs / "a.png"), "--mask", str(pngs / "m.png"), "--class", "3",
                              "--cfg-scale", "2", "--samples", "2", "--out", str(pngs / "ip")])
    assert res.exit_code == 0, res.output
    kept = np.asarray(Image.open(pngs / "ip" / "inpainted_0.png"))[:, :16]
    original = np.asarray(Image.open(pngs / "a.png").resize((32, 32), Image.BICUBIC))[:, :16]
    assert np.array_equal(kept[..., 0], original)  # the visible half is the input's own pixels


def test_edit_commands_refuse_bad_input_in_one_line(pngs):
    inp = ["inpaint", "--image", str(pngs / "a.png"), "--out", str(pngs / "x")]
    _one_error_line(runner.invoke(app, [*inp, "--mask", str(pngs / "empty.png")]), "is empty", "paint the region")
    Image.fromarray(np.zeros((16, 16), np.uint8) + 255).save(pngs / "m16.png")
    _one_error_line(runner.invoke(app, [*inp, "--mask", str(pngs / "m16.png")]), "16x16 but the image is 28x28")
    _one_error_line(runner.invoke(app, [*inp, "--mask", str(pngs / "m.png"), "--class", "10"]), "out of range")
    res = runner.invoke(app, [*inp, "--mask", str(pngs / "m.png"), "--holistic", "magic"])
    assert res.exit_code == 2 and "magic" in res.output  # typer's own choice check
    _one_error_line(runner.invoke(app, ["style-transfer", "--content", str(pngs / "a.png"), "--style",
                                        str(pngs / "nope.png"), "--out", str(pngs / "x")]), "no such file")


def test_evaluate_generation_and_its_refusals(pngs, tiny_ckpts):
    gpt, tok = tiny_ckpts
    ref = pngs / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    args = ["evaluate", "generation", "--gpt", str(gpt), "--tokenizer", str(tok), "--per-class", "1",
            "--reference", str(ref), "--shard-size", "5", "--out", str(pngs / "ev")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((pngs / "ev" / "report.json").read_text())
    assert rep["generated"]["images"] == 10 and "class accuracy" in res.output
    _one_error_line(runner.invoke(app, [*args, "--seed", "1"]), "other settings", "--restart")
    _one_error_line(runner.invoke(app, [*args, "--features", "inception"]), "pt_inception-2015-12-05-6726825d.pth")
    _one_error_line(runner.invoke(app, [*args, "--resize", "64", "--restart"]), "pass --resize 32")
    (pngs / "foreign").mkdir()
    (pngs / "foreign" / "notes.txt").write_text("mine")
    _one_error_line(runner.invoke(app, [*args[:-1], str(pngs / "foreign")]), "holds files hita did not write")
    _one_error_line(runner.invoke(app, ["inpaint", "--image", str(pngs / "a.png"), "--mask", str(pngs / "m.png"),
                                        "--out", str(pngs / "foreign")]), "holds files hita did not write")


def test_evaluate_tokenizer_prints_the_codebook_table(tiny_ckpts, fashion_root, monkeypatch, tmp_path):
    monkeypatch.setenv("HITA_FASHION_MNIST", str(fashion_root))
    res = runner.invoke(app, ["evaluate", "tokenizer", "--tokenizer", str(tiny_ckpts[1]), "--limit", "40",
                              "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert "| holistic | 512 |" in res.output and "PSNR" in res.output
    assert json.loads((tmp_path / "t.json").read_text())["images"] == 40


def test_train_classifier_command(fashion_root, monkeypatch, tmp_path):
    from hita.eval.classifier import load_classifier

    monkeypatch.setenv("HITA_FASHION_MNIST", str(fashion_root))
    res = runner.invoke(app, ["evaluate", "train-classifier", "--out", str(tmp_path / "c.safetensors"),
                              "--limit", "256", "--test-limit", "200", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    load_classifier(tmp_path / "c.safetensors")
    (tmp_path / "mine.safetensors").write_bytes(b"someone else's file")
    _one_error_line(runner.invoke(app, ["evaluate", "train-classifier", "--out", str(tmp_path / "mine.safetensors")]),
                    "was not written by hita")
