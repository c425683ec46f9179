"""Pieces shared by the exporters (:mod:`~hita.export.onnx`, :mod:`~hita.export.aoti`): the progress
logger, silencing the exporter's chatter, argument checks, the decode positions every validation
visits, the per-graph progress line and the manifest's model fields.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .manifest import Manifest, sha256_file
from .spec import ExportSpec

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = [
    "Log",
    "check_pos128",
    "decode_positions",
    "first_line",
    "logger",
    "manifest_for",
    "quiet",
    "validation_line",
]

Log = Callable[[str], None]


def logger(progress: bool | Log) -> Log:
    """``progress`` as a callable: itself, a line printer to stderr (``True``), or a no-op."""
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None


@contextlib.contextmanager
def quiet(verbose: bool = False, logger_name: str = "torch"):
    """Silence the exporter's stdout chatter, warnings and the ``logger_name`` log lines (below
    ERROR) unless ``verbose``; yields the captured stdout so a failure can show it."""
    buf = io.StringIO()
    if verbose:
        yield buf
        return
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        log.setLevel(level)


def psnr(a, b, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of two images (torch tensors) on a range of ``peak_to_peak`` (2 for [-1, 1]);
    ``inf`` when identical. Computed in float64 on the CPU."""
    import math

    mse = float(((a.detach().double().cpu() - b.detach().double().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def check_pos128(pos128: str) -> None:
    """:class:`ValueError` unless ``pos128`` is one of ``hita.models.gpt.POS128_MODES``."""
    from hita.models.gpt import POS128_MODES

    if pos128 not in POS128_MODES:
        raise ValueError(f"pos128 must be one of {POS128_MODES}, got {pos128!r} (see spec section 8.1)")


def decode_positions(gpt_cfg) -> list[int]:
    """Positions around each branch of the decode graph: slot rows, the Nh quirk, RoPE rows."""
    nh, last = gpt_cfg.n_holistic, gpt_cfg.seq_len - 1
    return sorted({1, nh - 1, nh, nh + 1, last})


def validation_line(entry: Mapping[str, Any], spec: ExportSpec) -> str:
    """What a validated graph adds to its progress line: batch, max |diff| and tolerance, PSNR."""
    line = (
        f"; matches eager at batch {entry['batch']}: "
        f"max |diff| {entry['max_abs_diff']:.2e} (tol {spec.atol:g})"
    )
    if "psnr_db" in entry:
        line += f", PSNR {entry['psnr_db']:.1f} dB"
    return line


def manifest_for(
    engine: str,
    gpt: HitaGPT,
    tokenizer: HitaTokenizer,
    checkpoints: Mapping[str, str | Path | None] | None,
    **fields: Any,
) -> Manifest:
    """A :class:`Manifest` with the models' presets and configs and the hashes of ``checkpoints``
    filled in; ``fields`` are the rest (pos128, precision, device, versions, graphs, options)."""
    return Manifest(
        engine=engine,
        tokenizer_preset=tokenizer.cfg.name,
        tokenizer_config=tokenizer.cfg.to_dict(),
        gpt_preset=gpt.cfg.name,
        gpt_config=gpt.cfg.to_dict(),
        checkpoints={k: (sha256_file(p) if p else None) for k, p in (checkpoints or {}).items()},
        **fields,
    )
