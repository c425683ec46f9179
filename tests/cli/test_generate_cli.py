"""`hita generate --runtime torch` end to end on tiny checkpoints, and its input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hita.checkpoint import save_model
from hita.cli.app import app
from hita.config import GPTConfig, TokenizerConfig
from hita.models.gpt import HitaGPT
from hita.models.tokenizer import HitaTokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tok = HitaTokenizer(TokenizerConfig.from_name("tiny"))
    gpt = HitaGPT(GPTConfig.from_name("tiny"))
    torch.nn.init.normal_(gpt.output.weight, std=0.05)
    save_model(tok, tok.cfg, d / "tok.safetensors")
    save_model(gpt, gpt.cfg, d / "gpt.safetensors")
    return ["--gpt", str(d / "gpt.safetensors"), "--tokenizer", str(d / "tok.safetensors")]


def test_help_lists_the_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "export", "generate", "parity", "demo", "convert"):
        assert cmd in res.output


def test_generate_writes_pngs_and_grid(tmp_path, ckpts):
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", *ckpts, "--classes", "1,3", "--per-class", "2", "--out", str(out),
                              "--seed", "7", "--top-k", "50", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    pngs = sorted(out.glob("0*_class*.png"))
    assert [p.name for p in pngs] == ["0000_class1.png", "0001_class1.png", "0002_class3.png", "0003_class3.png"]
    assert Image.open(pngs[0]).size == (32, 32)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 2 * 32   # 2 rows (classes) x 2 columns
    # Same command with another batch size: the same images (noise is keyed by the global image index).
    # Batched convolutions round differently per batch size, so pixels may move by one uint8 level;
    # a different token would move whole regions.
    out2 = tmp_path / "gen2"
    res = runner.invoke(app, ["generate", *ckpts, "--classes", "1,3", "--per-class", "2", "--out", str(out2),
                              "--seed", "7", "--top-k", "50", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    for p in pngs:
        a = np.asarray(Image.open(p), dtype=np.int16)
        b = np.asarray(Image.open(out2 / p.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "10"], "class id 10 out of range [0, 10)"),
        (["--classes", "x"], "cannot read class list"),
        (["--top-p", "0"], "top_p must lie in (0, 1]"),
        (["--top-k", "-1"], "top_k must be an integer >= 0"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--cfg-scale", "0.5"], "cfg_scale 0.5 < 1 is not supported"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, ckpts, args, message):
    out = tmp_path / "bad"
    res = runner.invoke(app, ["generate", *ckpts, "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_one_checkpoint_alone_is_refused(tmp_path, ckpts):
    res = runner.invoke(app, ["generate", ckpts[0], ckpts[1], "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "pass both --gpt and --tokenizer" in res.output
