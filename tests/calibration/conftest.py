"""Fixtures for the calibration tests: the tiny model's checkpoints, a calibration set collected
from them through the loop, and quantized exports of the session's tiny ONNX folder (``onnx_dir``,
the export of the same ``tiny_models(0)``). Session-scoped: each is made once and shared."""
from __future__ import annotations

import pytest

from hita.calibration.options import CollectOptions

# Two images (the fewest minmax accepts), one per run: 2 runs x 2 rows (CFG) x all 80 positions.
SMALL = CollectOptions(name="test", images=2, batch_images=1, classes=(0, 7), seed=3)
# Decode-step feeds per calibration in tests: 40 of the set's 158, spread over positions and runs
# (keeps each export to a few seconds; the ranges barely move beyond that on the tiny model).
FEEDS = 40


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """``{"gpt": path, "tokenizer": path}`` of ``tiny_models(0)`` saved as checkpoints."""
    from hita.checkpoint import save_model
    from hita.export.testing import tiny_models

    folder = tmp_path_factory.mktemp("tiny-ckpt")
    gpt, tok = tiny_models(0)
    paths = {"gpt": folder / "gpt.safetensors", "tokenizer": folder / "tokenizer.safetensors"}
    save_model(gpt, gpt.cfg, paths["gpt"])
    save_model(tok, tok.cfg, paths["tokenizer"])
    return paths


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory, tiny_ckpts):
    """A calibration set of ``tiny_models(0)`` collected with :data:`SMALL`."""
    from hita.calibration.collect import collect
    from hita.checkpoint import load_gpt, load_tokenizer

    out = tmp_path_factory.mktemp("tiny-set") / "set.safetensors"
    return collect(load_gpt(tiny_ckpts["gpt"]), load_tokenizer(tiny_ckpts["tokenizer"]), out, SMALL,
                   checkpoints=tiny_ckpts)


def _quantized(tmp_path_factory, onnx_dir, tiny_set, precision):
    from hita.calibration.export import export_quantized

    out = tmp_path_factory.mktemp(f"q-{precision}") / "art"
    return export_quantized(out, precision, from_onnx=onnx_dir, calibration=tiny_set, progress=False,
                            max_feeds=FEEDS)


@pytest.fixture(scope="session")
def int8w_dir(tmp_path_factory, onnx_dir, tiny_set):
    return _quantized(tmp_path_factory, onnx_dir, tiny_set, "int8-weight")


@pytest.fixture(scope="session")
def int8_dir(tmp_path_factory, onnx_dir, tiny_set):
    return _quantized(tmp_path_factory, onnx_dir, tiny_set, "int8")


@pytest.fixture(scope="session")
def fp8_dir(tmp_path_factory, onnx_dir, tiny_set):
    return _quantized(tmp_path_factory, onnx_dir, tiny_set, "fp8")
