"""`hita train tokenizer|gpt` and `hita extract-codes`: one library call each, one-line errors."""
from __future__ import annotations

import re

import pytest
from hita.cli.app import app
from typer.testing import CliRunner

FAST = ["--steps", "1", "--batch-size", "2", "--limit", "4", "--device", "cpu", "--workers", "0", "--log-every", "1"]


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("HITA_NO_PROGRESS", "1")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in res.output, res.output
    assert re.search(pattern, lines[-1]), lines[-1]


def test_data_errors(cli, tmp_path, fashion):
    _one_line_error(cli("train", "tokenizer", "--preset", "tiny", "--data", tmp_path / "nope", "--run-dir", tmp_path / "r"),
                    r"does not exist; pass an existing folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(cli("train", "tokenizer", "--preset", "tiny", "--data", tmp_path / "empty", "--run-dir", tmp_path / "r"),
                    r"one sub-folder per class")
    (tmp_path / "txt" / "cls").mkdir(parents=True)
    (tmp_path / "txt" / "cls" / "a.txt").write_text("x")
    _one_line_error(cli("train", "tokenizer", "--preset", "tiny", "--data", tmp_path / "txt", "--run-dir", tmp_path / "r"),
                    r"a\.txt is not an image .*remove it")
    assert not (tmp_path / "r").exists()


def test_resume_with_another_preset_is_refused(cli, tmp_path, fashion):
    res = cli("train", "tokenizer", "--preset", "tiny", "--data", fashion, "--run-dir", tmp_path / "r", "--disc", "none", *FAST)
    assert res.exit_code == 0 and "wrote" in res.output, res.output
    _one_line_error(cli("train", "tokenizer", "--preset", "tiny", "--data", fashion, "--run-dir", tmp_path / "r", *FAST),
                    r"already holds checkpoints .*--resume")
    _one_line_error(cli("train", "tokenizer", "--preset", "hita-v", "--data", fashion, "--run-dir", tmp_path / "r",
                        "--backbone", tmp_path / "dinov2.pth", "--resume", *FAST),
                    r"trained with tokenizer preset 'tiny'.*--preset tiny")
    _one_line_error(cli("train", "tokenizer", "--preset", "hita-u", "--data", fashion, "--run-dir", tmp_path / "u", *FAST),
                    r"--dino PATH|--backbone PATH")


def test_extract_codes_then_train_gpt(cli, tmp_path, fashion, tiny_tokenizer):
    codes = tmp_path / "codes.safetensors"
    res = cli("extract-codes", "--tokenizer", tiny_tokenizer, "--data", fashion, "--out", codes, "--limit", "8")
    assert res.exit_code == 0 and codes.is_file(), res.output
    res = cli("train", "gpt", "--preset", "tiny", "--codes", codes, "--run-dir", tmp_path / "g", *FAST)
    assert res.exit_code == 0 and (tmp_path / "g" / "gpt.safetensors").is_file(), res.output
    _one_line_error(cli("train", "gpt", "--preset", "tiny", "--tokenizer", tmp_path / "g" / "gpt.safetensors",
                        "--data", fashion, "--run-dir", tmp_path / "g2", *FAST), r"holds a hita gpt, not a tokenizer")
    _one_line_error(cli("train", "gpt", "--preset", "GPT-B", "--codes", codes, "--run-dir", tmp_path / "g3", *FAST),
                    r"do not fit together")
    _one_line_error(cli("train", "gpt", "--preset", "tiny", "--codes", tiny_tokenizer, "--run-dir", tmp_path / "g4", *FAST),
                    r"not a codes file")
