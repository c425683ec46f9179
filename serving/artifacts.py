"""The ONNX export a server runs: per-row decode positions, cached.

``hita serve --runtime onnxruntime`` without ``--artifacts`` serves the embedded model (or the given
checkpoints) through this export. It differs from ``hita export --engine onnx`` in one input: the
decode step takes ``position [batch]`` (one position per row, ``--row-positions``), which in-flight
batching needs. The export driver validates it against eager like every graph, with rows at
*different* positions on both sides of the position-128 rule in one call, which is what a busy
server does. The folder is reused while its manifest verifies, names the same checkpoints and has
per-row positions and the attention asked for (like ``hita demo``).

On the CPU the decode step uses ONNX Runtime's ``GroupQueryAttention`` (``--attention gqa``: in-place,
prefix-only attention and only the head half a step needs), which is what makes a 16-row step cheap
enough for batching to pay off on a large GPT; on a GPU the plain graph runs on the CUDA provider.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

__all__ = ["serving_onnx"]


def _reusable(out: Path, gpt_path: Path, tok_path: Path, attention: str) -> bool:
    from hita.export.errors import ArtifactError
    from hita.export.manifest import load_manifest
    from hita.export.spec import DECODE_STEP, has_row_positions
    from hita.jobs.sources import exported_from

    try:
        m = load_manifest(out, expect_engine="onnx")
    except ArtifactError:
        return False
    return (exported_from(m, gpt_path, tok_path) and has_row_positions(m.signature(DECODE_STEP))
            and m.options.get("attention", "plain") == attention)


def serving_onnx(
    out_dir: str | Path,
    gpt_path: str | Path,
    tok_path: str | Path,
    *,
    opset: int = 18,
    max_batch: int = 16,
    attention: str = "gqa",
    log: Callable[[str], None] = print,
) -> Path:
    """Export ``gpt_path`` + ``tok_path`` to ONNX with per-row decode positions, unless a verified
    export of the same files is already in ``out_dir``. ``attention``: ``"gqa"`` (CPU) or ``"plain"``
    (any ONNX Runtime provider), see :func:`hita.export.onnx.export_onnx`.

    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        ParityError, ArtifactError, ExportError, ValueError: as :func:`hita.export.onnx.export_onnx`.
    """
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.export.onnx import export_onnx

    out, gpt_path, tok_path = Path(out_dir), Path(gpt_path), Path(tok_path)
    if _reusable(out, gpt_path, tok_path, attention):
        log(f"reusing verified ONNX export {out}")
        return out
    log(f"exporting {gpt_path.name} + {tok_path.name} to ONNX with per-row positions ({attention} attention) -> {out}")
    export_onnx(load_gpt(gpt_path), load_tokenizer(tok_path), out, opset=opset, max_batch=max_batch, progress=log,
                checkpoints={"gpt": gpt_path, "tokenizer": tok_path}, row_positions=True,
                attention=attention)
    return out
