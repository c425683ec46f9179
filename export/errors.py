"""Typed errors of the export toolchain, shared by exporters and runtimes.

Each message is one line that names the file, the problem and the fix, so that a CLI can print it
as is (style rule 14).
"""
from __future__ import annotations

__all__ = ["ExportError", "ArtifactError", "SignatureError", "ParityError"]


class ExportError(RuntimeError):
    """Base class: something about an export or an artifacts folder is wrong."""


class ArtifactError(ExportError):
    """An artifacts folder cannot be trusted: manifest missing or unreadable, a file missing,
    truncated or changed since export, or written for another engine or format version."""


class SignatureError(ExportError):
    """A graph's inputs/outputs (names, dtypes, symbolic shapes) differ from its export spec."""


class ParityError(ExportError):
    """An exported graph's outputs differ from eager PyTorch by more than the spec's tolerance."""
