"""Shared test fixtures. Tests run on CPU with tiny presets; GPU tests skip with a reason."""
from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second thread
    # makes small matmuls tens of times slower through contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    """The tiny ONNX export, once per session (shared by tests/export and tests/runtimes)."""
    from hita.export.testing import tiny_onnx_artifacts

    return tiny_onnx_artifacts(tmp_path_factory.getbasetemp() / "hita-onnx-tiny")


@pytest.fixture(scope="session")
def aoti_dir(tmp_path_factory, request):
    """The tiny AOTI export, once per session (tests/export/test_aoti.py, tests/runtimes/test_cpp_host.py)."""
    from hita.export.testing import tiny_aoti_artifacts

    base = tmp_path_factory.getbasetemp()
    if shutil.which("cmake") and any(Path(str(i.fspath)).name == "test_cpp_host.py" for i in request.session.items):
        # The C++ host tests need a build too: start it now so it compiles while this exports.
        cpp_build_future(base / "hita-cpp-build")
    return tiny_aoti_artifacts(base / "hita-aoti-tiny")


_BUILDS: dict[Path, Future] = {}


def cpp_build_future(out: Path) -> Future:
    """One background ``build_host`` per folder per session (the compiler is a subprocess, so the
    AOTI export proceeds meanwhile); later callers get the same future."""
    from hita.jobs.build_cpp import build_host

    if out not in _BUILDS:
        _BUILDS[out] = ThreadPoolExecutor(1, thread_name_prefix="hita-build-cpp").submit(
            build_host, out, progress=False)
    return _BUILDS[out]


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Future:
    """The session's ``hita-host`` build (started early by ``aoti_dir`` when C++ tests run)."""
    return cpp_build_future(tmp_path_factory.getbasetemp() / "hita-cpp-build")


def _tensorrt_missing() -> str | None:
    """Why TensorRT tests cannot run here, or ``None`` when TensorRT and a GPU are both present."""
    from hita.util.gpu import Unavailable, gpu_facts, import_tensorrt

    try:
        import_tensorrt()
        gpu_facts()
    except Unavailable as e:
        return str(e)
    return None


def pytest_collection_modifyitems(config, items):
    gpu_skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    trt_items = [i for i in items if "tensorrt" in i.keywords]
    why = _tensorrt_missing() if trt_items else None
    for item in items:
        if gpu_skip is not None and "gpu" in item.keywords:
            item.add_marker(gpu_skip)
    for item in trt_items:
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=f"TensorRT tests need TensorRT and a GPU: {why}"))
