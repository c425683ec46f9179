"""Progress lines and quiet exporters: one ``Log`` callable type used by exporters and jobs."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Callable

__all__ = ["Log", "logger", "quiet", "first_line"]

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
    """Silence a tool's stdout chatter, warnings and the ``logger_name`` log lines (below ERROR)
    unless ``verbose``; yields the captured stdout so a failure can show it."""
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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else ""
