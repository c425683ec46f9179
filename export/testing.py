"""Tiny random models and a reusable tiny ONNX export, for tests and quick demos.

Freshly initialised GPTs have an all-zero output head (spec 4.5), so every logit is 0 and every
parity check would pass trivially. :func:`tiny_models` draws the head at random so the logits spread
over several units (sampling and greedy decoding then depend on every layer).

:func:`tiny_onnx_artifacts` and :func:`tiny_aoti_artifacts` export those models once into a folder
and reuse the folder while its manifest verifies, so several test files in one pytest session share
one export (the dynamo exporter needs tens of seconds even for the tiny presets, the AOTInductor
compile a minute or two).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hita.config import GPTConfig, TokenizerConfig

from .errors import ArtifactError
from .manifest import load_manifest

__all__ = ["tiny_aoti_artifacts", "tiny_models", "tiny_onnx_artifacts"]


def tiny_models(seed: int = 0, head_std: float = 0.2):
    """The ``tiny`` GPT and tokenizer with seeded random weights and a non-zero output head.

    Args:
        seed: seed of a private generator (the global RNG state is restored).
        head_std: std of the output head weights; 0.2 gives logits with a std of about 2.
    Returns:
        ``(gpt, tokenizer)`` in eval mode, float32, CPU.
    """
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gpt = HitaGPT(GPTConfig.from_name("tiny"))
        tok = HitaTokenizer(TokenizerConfig.from_name("tiny"))
        with torch.no_grad():
            gpt.output.weight.normal_(0.0, head_std)
    return gpt.eval(), tok.eval()


def _tiny_artifacts(out_dir: str | Path, engine: str, export, seed: int, export_kwargs: dict) -> Path:
    """``export(*tiny_models(seed), out_dir, **export_kwargs)`` unless ``out_dir`` already holds a
    verified ``engine`` export (``progress`` defaults off)."""
    out = Path(out_dir)
    try:
        load_manifest(out, expect_engine=engine)
        return out
    except ArtifactError:
        pass
    gpt, tok = tiny_models(seed)
    export_kwargs.setdefault("progress", False)
    return export(gpt, tok, out, **export_kwargs)


def tiny_onnx_artifacts(out_dir: str | Path, seed: int = 0, **export_kwargs) -> Path:
    """Export :func:`tiny_models` ``(seed)`` to ``out_dir`` unless a verified export is already there.

    Args:
        out_dir: artifacts folder.
        seed: model seed (part of what the folder holds: use one folder per seed).
        export_kwargs: passed to :func:`hita.export.onnx.export_onnx` (``progress`` defaults off).
    Returns:
        ``out_dir`` as a ``Path``.
    """
    from .onnx import export_onnx

    return _tiny_artifacts(out_dir, "onnx", export_onnx, seed, export_kwargs)


def tiny_aoti_artifacts(out_dir: str | Path, seed: int = 0, **export_kwargs) -> Path:
    """:func:`tiny_onnx_artifacts` for AOTInductor packages: ``export_kwargs`` go to
    :func:`hita.export.aoti.export_aoti`."""
    from .aoti import export_aoti

    return _tiny_artifacts(out_dir, "aoti", export_aoti, seed, export_kwargs)


def reissue_manifest(folder: str | Path, **changes) -> Path:
    """Rewrite a folder's ``manifest.json`` with ``changes`` and a matching ``manifest.sha256``:
    a consistent-looking folder with other settings (another device, torch version, engine), as a
    genuine export elsewhere, or a forger, would produce. Tests use it to prove runtimes check the
    fields themselves, not only the checksum."""
    import dataclasses
    import json

    from hita.util.files import bytes_sha256

    from .manifest import CHECKSUM_NAME, MANIFEST_NAME, Manifest

    folder = Path(folder)
    m = dataclasses.replace(Manifest.from_dict(json.loads((folder / MANIFEST_NAME).read_text())), **changes)
    text = m.to_json().encode()
    (folder / MANIFEST_NAME).write_bytes(text)
    (folder / CHECKSUM_NAME).write_text(f"{bytes_sha256(text)}  {MANIFEST_NAME}\n")
    return folder
