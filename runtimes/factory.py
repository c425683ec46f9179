"""Build a step executor by runtime name: the one place the CLI and Python users pick a backend.

Backends with heavy or GPU-only imports are imported here lazily, only when asked for.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

from hita.runtimes.executor import StepExecutor


class Runtime(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    aoti = "aoti"
    tensorrt = "tensorrt"


# Runtimes that execute exported artifacts (the others run the PyTorch modules directly).
ARTIFACT_RUNTIMES = (Runtime.onnxruntime, Runtime.aoti, Runtime.tensorrt)


def make_executor(
    runtime: Runtime | str,
    *,
    gpt: str | Path | None = None,
    tokenizer: str | Path | None = None,
    artifacts: str | Path | None = None,
    gpt_preset: str | None = None,
    tokenizer_preset: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    pos128: str = "reference",
    expect_manifest_sha256: str | None = None,
    cuda_graphs: bool = False,
) -> StepExecutor:
    """Return a ready executor.

    Args:
        runtime: one of ``Runtime``.
        gpt, tokenizer: checkpoint paths (released ``.pt`` or our ``.safetensors``); torch runtime.
        artifacts: an exported artifacts folder (manifest-checked); artifact runtimes.
        expect_manifest_sha256: pin the reviewed export (artifact runtimes; refused for torch).
        cuda_graphs: torch runtime on CUDA: capture the decode step once and replay it every step.
    """
    runtime = Runtime(runtime)
    if runtime is Runtime.tensorrt:
        if not torch.cuda.is_available():
            raise ValueError("the tensorrt runtime runs TensorRT engines on an NVIDIA GPU, and torch sees none "
                             "here; on this machine run an ONNX export with --runtime onnxruntime")
        if device == "cpu":
            device = "cuda"  # TensorRT has no CPU path: its default device is the first GPU
    check_device(device)
    if runtime is Runtime.torch:
        if expect_manifest_sha256 is not None:
            raise ValueError("--expect-manifest-sha256 pins an artifacts folder; the torch runtime runs checkpoints")
        if gpt is None or tokenizer is None:
            raise ValueError("the torch runtime needs --gpt and --tokenizer checkpoints")
        from hita.checkpoint import load_gpt, load_tokenizer
        from hita.config import check_pair
        from hita.runtimes.torch_eager import TorchExecutor

        tok = load_tokenizer(tokenizer, tokenizer_preset, device=device)
        g = load_gpt(gpt, gpt_preset, device=device, dtype=dtype)
        check_pair(tok.cfg, g.cfg)
        return TorchExecutor(g, tok, device=device, dtype=dtype, pos128=pos128, cuda_graphs=cuda_graphs)
    if artifacts is None:
        raise ValueError(f"the {runtime.value} runtime needs --artifacts DIR (made by `hita export`)")
    if runtime is Runtime.onnxruntime:
        from hita.runtimes.onnxrt import OrtExecutor

        check_quantized_on_onnxruntime(artifacts, expect_manifest_sha256)
        return OrtExecutor(artifacts, expect_manifest_sha256=expect_manifest_sha256)
    if runtime is Runtime.aoti:
        from hita.runtimes.aoti import AotiExecutor

        return AotiExecutor(artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
    from hita.runtimes.tensorrt import TensorRTExecutor

    return TensorRTExecutor(artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)


def check_quantized_on_onnxruntime(artifacts: str | Path, expect_manifest_sha256: str | None = None) -> None:
    """Refuse, before any session loads, a quantized folder that the ONNX Runtime provider the
    executor will pick (CUDA when the installed onnxruntime has it, else CPU) cannot run; the rule is
    the recipe's (:func:`hita.calibration.recipes.check_engine`). Unquantized folders pass unread
    beyond the manifest.

    Raises:
        RecipeRefused: one line: the recipe, the provider, what it lacks and the fix.
    """
    import onnxruntime as ort

    from hita.calibration.recipes import check_engine
    from hita.export.manifest import load_manifest

    m = load_manifest(artifacts, verify_files=False, expect_sha256=expect_manifest_sha256)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    check_engine(m.options, "onnxruntime-cuda" if cuda else "onnxruntime-cpu", folder=artifacts,
                 version=ort.__version__)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, refused up front when this machine cannot run it.

    Raises:
        ValueError: not ``cpu`` / ``cuda[:i]``, or CUDA asked for where torch has none.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but this torch build has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def engine_of(artifacts: str | Path, expect_manifest_sha256: str | None = None) -> str:
    """The engine kind recorded in an artifacts folder's manifest (sizes checked, pin honoured)."""
    from hita.export.manifest import load_manifest

    return load_manifest(artifacts, verify_files=False, expect_sha256=expect_manifest_sha256).engine


_ENGINE_RUNTIME = {"onnx": Runtime.onnxruntime, "aoti": Runtime.aoti, "tensorrt": Runtime.tensorrt}


def executor_for_artifacts(
    artifacts: str | Path, device: str = "cpu", expect_manifest_sha256: str | None = None
) -> StepExecutor:
    """The executor that runs an artifacts folder, chosen by its manifest's engine kind."""
    return make_executor(_ENGINE_RUNTIME[engine_of(artifacts, expect_manifest_sha256)], artifacts=artifacts, device=device,
                         expect_manifest_sha256=expect_manifest_sha256)
