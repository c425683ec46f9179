"""Which model files a command runs: checkpoint flags, the embedded default, and an export's sources.

The CLI's rule, in one place: ``--gpt`` and ``--tokenizer`` together name checkpoints; neither means
the embedded default model (``hita/assets``); one alone is an error. An artifacts folder records the
sha256 of the checkpoints it was exported from, so parity can find (or refuse) its eager reference.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hita.runtimes.executor import StepExecutor

__all__ = ["resolve_checkpoints", "exported_from", "eager_reference"]


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
    from hita.util.files import file_sha256

    recorded = (manifest.checkpoints.get("gpt"), manifest.checkpoints.get("tokenizer"))
    return recorded == (file_sha256(gpt), file_sha256(tokenizer))


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
    from hita.export.spec import DTYPES
    from hita.runtimes.factory import Runtime, make_executor

    m = load_manifest(artifacts, verify_files=False)
    use_default = gpt is None and tokenizer is None
    gpt, tokenizer, _ = resolve_checkpoints(gpt, tokenizer)
    if use_default and not exported_from(m, gpt, tokenizer):
        raise ValueError(
            f"{artifacts}: was not exported from the embedded default model; pass the --gpt and "
            "--tokenizer checkpoints it was exported from"
        )
    dtype = DTYPES.get(m.precision, torch.float32)
    ex = make_executor(Runtime.torch, gpt=gpt, tokenizer=tokenizer, device=device, dtype=dtype, pos128=m.pos128)
    if ex.gpt_config != m.gpt_cfg or ex.tokenizer_config != m.tokenizer_cfg:
        raise ValueError(
            f"{artifacts}: was exported from other configs than these checkpoints "
            f"({m.gpt_preset}/{m.tokenizer_preset} vs {ex.gpt_config.name}/{ex.tokenizer_config.name}); "
            "pass the checkpoints it was exported from"
        )
    return ex
