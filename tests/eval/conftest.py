"""Fixtures for the evaluation and editing tests: tiny random models saved as checkpoints, real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hita.data.dataset import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_ENV


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR))
    if not (root / "t10k-images-idx3-ubyte.gz").is_file() and not (root / "t10k-images-idx3-ubyte").is_file():
        pytest.skip("Fashion-MNIST IDX files not found: `apt-get install dataset-fashion-mnist` (or set $HITA_FASHION_MNIST)")
    return root


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """The tiny random GPT and tokenizer of hita.export.testing (seed 0), saved as safetensors."""
    from hita.checkpoint import save_model
    from hita.export.testing import tiny_models

    d = tmp_path_factory.mktemp("eval-ckpt")
    gpt, tok = tiny_models(0)
    save_model(gpt, gpt.cfg, d / "gpt.safetensors")
    save_model(tok, tok.cfg, d / "tok.safetensors")
    return d / "gpt.safetensors", d / "tok.safetensors"


@pytest.fixture()
def tiny_torch_executor():
    from hita.export.testing import tiny_models
    from hita.runtimes.torch_eager import TorchExecutor

    gpt, tok = tiny_models(0)
    return TorchExecutor(gpt, tok)
