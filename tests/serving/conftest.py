"""Fixtures for the serving tests: the embedded model's per-row ONNX export, Triton, waiting.

Server tests run a real ``tritonserver`` (the one the ``nvidia-pytriton`` wheel bundles, installed
by the ``test`` extra); where it cannot run they skip with the reason.
"""
from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def rows_onnx(tmp_path_factory):
    """The embedded model exported with per-row positions, once per session: (folder, gpt, tokenizer)."""
    from hita.assets import default_model
    from hita.serving.artifacts import serving_onnx

    d = default_model()
    folder = serving_onnx(tmp_path_factory.getbasetemp() / "hita-serving-onnx", d.gpt, d.tokenizer, log=lambda s: None)
    return folder, d.gpt, d.tokenizer


def triton_missing() -> str | None:
    """Why the bundled Triton server cannot run here, or ``None``."""
    from hita.serving.launcher import TritonMissing, find_triton

    try:
        find_triton()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (TritonMissing, ImportError) as e:
        return f"{e}; install the test extra: pip install -e '.[test]'"
    return None


@pytest.fixture
def wait_for():
    """``wait_for(predicate, what)``: poll until it holds; fail naming ``what`` after two minutes
    (a hang guard, not a speed requirement)."""

    def wait(predicate, what: str, limit: float = 120.0) -> None:
        end = time.monotonic() + limit
        while not predicate():
            if time.monotonic() > end:
                pytest.fail(f"gave up waiting for {what}")
            time.sleep(0.02)

    return wait


@pytest.fixture(scope="session")
def skip_without_triton():
    why = triton_missing()
    if why is not None:
        pytest.skip(why)
