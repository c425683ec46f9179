"""Fixtures for the training tests: real Fashion-MNIST, weight files the tests make themselves, and a
torchrun launcher for the DDP checks. Every run is tiny (32×32 presets, a few steps, small batches)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hita.data.dataset import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_ENV


@pytest.fixture(scope="session")
def fashion() -> str:
    """The data spec of the real Fashion-MNIST, skipping when the Debian package is absent."""
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR))
    if not any((root / n).is_file() for n in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")):
        pytest.skip("Fashion-MNIST IDX files not found: `apt-get install dataset-fashion-mnist` (or set $HITA_FASHION_MNIST)")
    return str(root)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` tokenizer in the project's format (frozen tokenizer for GPT runs)."""
    from hita.checkpoint import save_model
    from hita.config import TokenizerConfig
    from hita.models.tokenizer import HitaTokenizer

    torch.manual_seed(0)
    cfg = TokenizerConfig.from_name("tiny")
    path = tmp_path_factory.mktemp("tok") / "tiny_tokenizer.safetensors"
    save_model(HitaTokenizer(cfg), cfg, path)
    return path


@pytest.fixture(scope="session")
def tiny_codes(tmp_path_factory, tiny_tokenizer, fashion) -> Path:
    """Codes of 32 real Fashion-MNIST images (+ flips) from the tiny tokenizer."""
    from hita.train.codes import extract_codes

    out = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    return extract_codes(tiny_tokenizer, fashion, out, limit=32, batch_size=32, progress=False)


# One torchrun launch serves every DDP test (a launch costs ~10 s of imports on 2 shared cores): its
# driver calls the `hita` typer app once per command, exactly as `torchrun ... $(which hita) ...` does.
_DRIVER = """
import json, sys
from hita.cli.app import app
for args in json.loads(sys.argv[1]):
    code = app(args, standalone_mode=False)
    if code:
        sys.exit(code)
"""


def torchrun(commands: list[list[str]], tmp: Path, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``hita`` commands, in order, in one torchrun launch of ``nproc`` CPU processes (gloo)."""
    driver = tmp / "ddp_driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HITA_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(driver),
           json.dumps(commands)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory, fashion, tiny_codes) -> dict[str, Path]:
    """A 2-process tokenizer run and a 2-process GPT run (2 steps each), for comparison with one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = ["--steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", "--device", "cpu",
              "--workers", "0", "--threads", "1"]
    runs = {"tokenizer": tmp / "tokenizer", "gpt": tmp / "gpt"}
    torchrun([
        ["train", "tokenizer", "--preset", "tiny", "--data", fashion, "--run-dir", str(runs["tokenizer"]),
         "--batch-size", "4", "--limit", "64", "--disc", "none", *common],
        ["train", "gpt", "--preset", "tiny", "--codes", str(tiny_codes), "--run-dir", str(runs["gpt"]),
         "--batch-size", "8", "--dropout", "0", *common],
    ], tmp)
    return runs


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture
def weights():
    return load_weights
