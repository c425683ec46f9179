"""Shared CLI pieces: the error boundary and option types reused across commands.

Library code raises typed errors whose first line is the cause and the fix; the CLI prints that
line (and any report lines after it) to stderr and exits non-zero, without a traceback.
"""
from __future__ import annotations

import functools
from enum import Enum
from typing import Annotated, Callable, TypeVar

import typer

# The sampling options, written once for every command that samples (defaults stay per command).
CFG_SCALE_OPT = Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")]
CFG_INTERVAL_OPT = Annotated[int, typer.Option(help="Use CFG only for decode steps <= this index (-1 = always).")]
TEMPERATURE_OPT = Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")]
TOP_K_OPT = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
TOP_P_OPT = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
SEED_OPT = Annotated[int, typer.Option(help="Seed of the shared noise stream.")]

F = TypeVar("F", bound=Callable)

# Exit codes: 2 = bad input (user can fix), 3 = parity/validation failed.
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.value]


class Pos128(str, Enum):
    reference = "reference"
    consistent = "consistent"


def printable(message: str) -> str:
    """``message`` on one line with control characters escaped: names from hostile files (a
    terminal escape, a newline in a manifest entry) must not reach the terminal raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn the library's user-facing errors into a clean message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_user_error(e):
                fail(str(e), getattr(e, "exit_code", EXIT_BAD_INPUT))
            if _from_onnxruntime(e):  # a graph that disagrees with its manifest
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                fail(f"ONNX Runtime failed running the artifacts ({first}); the graphs and their manifest "
                     "disagree: re-export the folder (and pin reviewed exports with --expect-manifest-sha256)",
                     EXIT_BAD_INPUT)
            if isinstance(e, OSError) and e.strerror:  # full disk, read-only filesystem, ...
                where = f"{e.filename}: " if e.filename else ""
                fail(f"{where}{e.strerror}; free space or choose a writable location", EXIT_BAD_INPUT)
            raise

    return wrapper  # type: ignore[return-value]


def _from_onnxruntime(e: Exception) -> bool:
    """Raised by ONNX Runtime itself (its own exception types, or a RuntimeError from its Python layer)."""
    import traceback

    if type(e).__module__.startswith("onnxruntime"):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and "onnxruntime" in frames[-1].filename.replace("\\", "/").split("/")


def _is_user_error(e: Exception) -> bool:
    # ValueError covers CheckpointError, config/preset errors, sampling-option errors; the export and
    # runtime error types subclass it too (ArtifactError, SignatureError, ParityError).
    from hita.export.errors import ExportError

    # FloatingPointError: the sampler found no finite probability mass (NaN/inf logits); its message
    # names the cause and the fix.
    return isinstance(e, (ValueError, ExportError, FileNotFoundError, NotADirectoryError, PermissionError,
                          FloatingPointError))


def progress_enabled() -> bool:
    """Progress bars go to stderr; HITA_NO_PROGRESS=1 silences them (logs, scripts)."""
    import os

    return os.environ.get("HITA_NO_PROGRESS", "") in ("", "0")
