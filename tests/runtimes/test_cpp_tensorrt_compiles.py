"""The C++ host's TensorRT backend compiles against TensorRT 10.16 and 11.1's real headers.

TensorRT cannot be installed here, so the backend (``runtimes/cpp/src/tensorrt_executor.cpp``) is
compiled with ``-fsyntax-only -Werror=deprecated-declarations`` against NVIDIA's public headers in
``../shared/vendor/tensorrt`` and CUDA's runtime headers from the ``nvidia-cuda-runtime-cu12`` and
``nvidia-cuda-nvcc-cu12`` wheels (``.ci/run`` puts them in ``.venv/static-checks``): every call,
type and enum it uses exists in both versions and none is deprecated. Building and running it needs
TensorRT and a GPU (``-DHITA_WITH_TENSORRT=ON``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "runtimes" / "cpp" / "src"
VENDOR = Path(os.environ.get("HITA_TENSORRT_VENDOR", ROOT.parent / "shared" / "vendor" / "tensorrt"))
STATIC = Path(os.environ.get("HITA_TENSORRT_STUBS", ROOT / ".venv" / "static-checks"))
CUDA_INCLUDES = [STATIC / "nvidia" / "cuda_runtime" / "include", STATIC / "nvidia" / "cuda_nvcc" / "include"]


def _compile(source: Path, version: str) -> subprocess.CompletedProcess:
    import torch.utils.cpp_extension as ext

    if shutil.which("g++") is None:
        pytest.skip("g++ not found: apt-get install g++")
    trt = VENDOR / version / "include"
    if not (trt / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT {version} headers not found at {trt} (set HITA_TENSORRT_VENDOR)")
    if not (CUDA_INCLUDES[0] / "cuda_runtime_api.h").is_file() or not (CUDA_INCLUDES[1] / "crt").is_dir():
        pytest.skip(f"CUDA headers not found in {STATIC}: pip install --no-deps --target .venv/static-checks "
                    "nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 (what .ci/run does)")
    system = [trt, *CUDA_INCLUDES, *map(Path, ext.include_paths())]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror=deprecated-declarations",
           "-DHITA_WITH_TENSORRT", *[f for p in system for f in ("-isystem", str(p))],
           "-I", str(SRC), "-I", str(ROOT / "runtimes" / "cpp" / "include"), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("version", ["10.16", "11.1"])
def test_tensorrt_backend_compiles_without_deprecated_api(version):
    for source in (SRC / "tensorrt_executor.cpp", SRC / "backends.cpp"):
        res = _compile(source, version)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "warning" not in res.stderr, res.stderr[-4000:]


def test_the_compile_check_catches_deprecated_and_removed_api(tmp_path):
    src = tmp_path / "old_api.cpp"
    src.write_text("#include <NvInfer.h>\n"
                   "auto flag = nvinfer1::NetworkDefinitionCreationFlag::kEXPLICIT_BATCH;\n")
    old = _compile(src, "10.16")                            # deprecated in 10.16 ...
    assert old.returncode != 0 and "deprecated" in old.stderr
    new = _compile(src, "11.1")                             # ... removed in 11.1
    assert new.returncode != 0 and "kEXPLICIT_BATCH" in new.stderr and "deprecated" not in new.stderr
