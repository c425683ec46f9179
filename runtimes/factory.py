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
) -> StepExecutor:
    """Return a ready executor.

    Args:
        runtime: one of ``Runtime``.
        gpt, tokenizer: checkpoint paths (released ``.pt`` or our ``.safetensors``); torch runtime.
        artifacts: an exported artifacts folder (manifest-checked); artifact runtimes.
    """
    runtime = Runtime(runtime)
    if runtime is Runtime.torch:
        if gpt is None or tokenizer is None:
            raise ValueError("the torch runtime needs --gpt and --tokenizer checkpoints")
        from hita.checkpoint import load_gpt, load_tokenizer
        from hita.config import check_pair
        from hita.runtimes.torch_eager import TorchExecutor

        tok = load_tokenizer(tokenizer, tokenizer_preset, device=device)
        g = load_gpt(gpt, gpt_preset, device=device, dtype=dtype)
        check_pair(tok.cfg, g.cfg)
        return TorchExecutor(g, tok, device=device, dtype=dtype, pos128=pos128)
    if artifacts is None:
        raise ValueError(f"the {runtime.value} runtime needs --artifacts DIR (made by `hita export`)")
    if runtime is Runtime.onnxruntime:
        from hita.runtimes.onnxrt import OrtExecutor

        return OrtExecutor(artifacts)
    if runtime is Runtime.aoti:
        from hita.runtimes.aoti import AotiExecutor

        return AotiExecutor(artifacts, device=device)
    from hita.runtimes.trt import TrtExecutor

    return TrtExecutor(artifacts)


def resolve_checkpoints(gpt: str | Path | None, tokenizer: str | Path | None):
    """Both given → them; neither → the embedded default model; one alone → ``ValueError``.

    Returns:
        (gpt, tokenizer, class_names): class names only for the embedded model, else ``None``.
    """
    from hita.assets import default_model

    if gpt is None and tokenizer is None:
        d = default_model()
        return d.gpt, d.tokenizer, d.class_names
    if gpt is None or tokenizer is None:
        raise ValueError("pass both --gpt and --tokenizer, or neither to use the embedded default model")
    return gpt, tokenizer, None


def exported_from(manifest, gpt: str | Path, tokenizer: str | Path) -> bool:
    """Whether a manifest records these checkpoint files (by sha256) as its sources."""
    from hita.checkpoint import file_sha256

    recorded = (manifest.checkpoints.get("gpt"), manifest.checkpoints.get("tokenizer"))
    return recorded == (file_sha256(gpt), file_sha256(tokenizer))


def engine_of(artifacts: str | Path) -> str:
    """The engine kind recorded in an artifacts folder's manifest (files verified)."""
    from hita.export.manifest import load_manifest

    return load_manifest(artifacts, verify_files=False).engine


_ENGINE_RUNTIME = {"onnx": Runtime.onnxruntime, "aoti": Runtime.aoti, "tensorrt": Runtime.tensorrt}


def executor_for_artifacts(artifacts: str | Path, device: str = "cpu") -> StepExecutor:
    """The executor that runs an artifacts folder, chosen by its manifest's engine kind."""
    return make_executor(_ENGINE_RUNTIME[engine_of(artifacts)], artifacts=artifacts, device=device)


def eager_reference(
    artifacts: str | Path,
    gpt: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
) -> StepExecutor:
    """The eager executor that an artifacts folder must match.

    Checkpoints come from ``gpt``/``tokenizer`` when given, else from the embedded default model when
    the manifest says the folder was exported from it (by sha256). The manifest's precision and
    position-128 rule are applied, so the comparison is like for like.
    """
    from hita.export.manifest import load_manifest

    m = load_manifest(artifacts, verify_files=False)
    use_default = gpt is None and tokenizer is None
    gpt, tokenizer, _ = resolve_checkpoints(gpt, tokenizer)
    if use_default and not exported_from(m, gpt, tokenizer):
        raise ValueError(
            f"{artifacts}: was not exported from the embedded default model; pass the --gpt and "
            "--tokenizer checkpoints it was exported from"
        )
    dtype = getattr(torch, m.precision) if isinstance(m.precision, str) else torch.float32
    ex = make_executor(Runtime.torch, gpt=gpt, tokenizer=tokenizer, device=device, dtype=dtype, pos128=m.pos128)
    if ex.gpt_config != m.gpt_cfg or ex.tokenizer_config != m.tokenizer_cfg:
        raise ValueError(
            f"{artifacts}: was exported from other configs than these checkpoints "
            f"({m.gpt_preset}/{m.tokenizer_preset} vs {ex.gpt_config.name}/{ex.tokenizer_config.name}); "
            "pass the checkpoints it was exported from"
        )
    return ex
