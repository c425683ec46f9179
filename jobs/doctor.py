"""`hita doctor`: what each engine and runtime needs, whether this machine has it, and the fix.

Every probe is read-only and cheap (imports, versions, file lookups); nothing is built or run, so it
answers in seconds on any machine, GPU or not.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["Check", "checks"]


@dataclass(frozen=True)
class Check:
    """One capability: ``what`` (``"export --engine tensorrt"``), ``ok``, ``detail`` and ``fix``."""

    what: str
    ok: bool
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        cuda = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return False, f"torch {torch.__version__} sees no CUDA GPU ({cuda})"
    from hita.util.gpu import gpu_facts

    facts = gpu_facts()
    return True, f"{facts.name}, compute {facts.sm}, CUDA {torch.version.cuda}"


def _tensorrt() -> tuple[bool, str]:
    from hita.util.gpu import Unavailable, import_tensorrt

    try:
        return True, f"TensorRT {import_tensorrt().__version__}"
    except Unavailable as e:
        return False, str(e).split(";")[0]


def _ort() -> tuple[bool, str, list[str]]:
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001 - a broken install is exactly what doctor reports
        return False, f"onnxruntime does not import ({type(e).__name__}: {e})", []
    both = " (onnxruntime and onnxruntime-gpu are both installed: they share one folder; keep one)" if cpu and gpu else ""
    return True, f"onnxruntime {gpu or cpu}, providers {', '.join(providers)}{both}", providers


def _cpp() -> tuple[bool, str]:
    tools = {t: shutil.which(t) for t in ("cmake", "g++")}
    headers = {"nlohmann-json3-dev": "nlohmann/json.hpp", "libstb-dev": "stb/stb_image_write.h",
               "libcli11-dev": "CLI/CLI.hpp", "libssl-dev": "openssl/evp.h"}
    missing = [t for t, p in tools.items() if p is None]
    missing += [pkg for pkg, h in headers.items() if not (Path("/usr/include") / h).is_file()]
    if missing:
        return False, f"missing {', '.join(missing)}"
    return True, "cmake, g++ and the host's libraries (JSON, PNG, CLI, SHA-256) are present"


def _triton() -> tuple[bool, str]:
    from hita.serving.launcher import TritonMissing, find_triton

    try:
        install = find_triton()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (TritonMissing, ImportError) as e:
        return False, str(e).split(";")[0]
    return True, f"tritonserver {install.binary.parent.parent} (nvidia-pytriton {_version('nvidia-pytriton')}), " \
                 f"tritonclient {_version('tritonclient')}"


def checks() -> list[Check]:
    """Every capability, in the order a user meets them."""
    import torch

    gpu_ok, gpu = _gpu()
    trt_ok, trt = _tensorrt()
    ort_ok, ort, providers = _ort()
    cpp_ok, cpp = _cpp()
    triton_ok, triton = _triton()
    onnx_ok = all(_version(d) for d in ("onnx", "onnxscript"))
    gpu_fix = "use a machine with an NVIDIA GPU and a CUDA build of torch"
    trt_fix = "" if trt_ok else ("pip install 'hita[gpu]' (TensorRT 10.15+ or 11.x)" if gpu_ok else gpu_fix)
    out = [
        Check("GPU", gpu_ok, gpu, "" if gpu_ok else gpu_fix),
        Check("export --engine onnx", onnx_ok, f"onnx {_version('onnx')}, onnxscript {_version('onnxscript')}",
              "" if onnx_ok else "pip install 'hita[onnx]'"),
        Check("export --engine aoti", True, f"torch {torch.__version__} (AOTInductor; needs a C++ compiler at export)"),
        Check("export --engine tensorrt", trt_ok and gpu_ok, trt if gpu_ok else f"{trt}; {gpu}", trt_fix),
        Check("runtime onnxruntime", ort_ok, ort, "" if ort_ok else "pip install 'hita[onnx]'"),
        Check("runtime onnxruntime on the GPU", "CUDAExecutionProvider" in providers,
              "CUDA provider available" if "CUDAExecutionProvider" in providers else "no CUDA provider",
              "" if "CUDAExecutionProvider" in providers else "pip uninstall onnxruntime && pip install onnxruntime-gpu"),
        Check("runtime aoti", True, "cpu" + (" and cuda" if gpu_ok else "")),
        Check("runtime tensorrt", trt_ok and gpu_ok, trt if gpu_ok else gpu, trt_fix),
        Check("build-cpp (C++ host)", cpp_ok, cpp,
              "" if cpp_ok else "apt-get install cmake g++ nlohmann-json3-dev libstb-dev libcli11-dev libssl-dev"),
        Check("serve (Triton Inference Server)", triton_ok, triton, "" if triton_ok else "pip install 'hita[serve]'"),
    ]
    return out
