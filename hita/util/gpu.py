"""Lazy access to GPU-only libraries and to the facts a GPU artifact is tied to.

Nothing here imports TensorRT or initialises CUDA at import time: ``import hita`` works on any
machine, and each caller asks at the moment it needs the library. A missing piece becomes one
:class:`Unavailable` line that says what is missing and how to get it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Unavailable", "GpuFacts", "gpu_facts", "import_tensorrt", "tensorrt_version", "TENSORRT_FIX"]

TENSORRT_FIX = "install TensorRT on a machine with an NVIDIA GPU: pip install 'hita[gpu]' (see README, TensorRT)"


class Unavailable(ValueError):
    """A GPU library or device this path needs is not here; the message names it and the fix."""


@dataclass(frozen=True)
class GpuFacts:
    """What an engine built on this GPU is tied to: ``name``, compute capability ``(major, minor)``."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def gpu_facts(device: int | str | torch.device = 0) -> GpuFacts:
    """Name and compute capability of a CUDA device.

    Raises:
        Unavailable: torch has no usable CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU is visible to torch (TensorRT engines are built and run on one); "
                          "run this on a machine with an NVIDIA GPU and a CUDA build of torch")
    props = torch.cuda.get_device_properties(device)
    return GpuFacts(props.name, (props.major, props.minor))


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`Unavailable` naming what is missing.

    ``tensorrt-stubs`` (type stubs only) also installs a ``tensorrt`` folder; without the bindings it
    has no ``Builder``, which is how the two are told apart.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise Unavailable(f"TensorRT's Python bindings are not installed ({e}); {TENSORRT_FIX}") from None
    except OSError as e:  # the bindings import but libnvinfer cannot be loaded
        raise Unavailable(f"TensorRT's libraries cannot be loaded ({e}); {TENSORRT_FIX}") from None
    if not hasattr(trt, "Builder"):
        raise Unavailable(f"only TensorRT's type stubs are installed, not its bindings; {TENSORRT_FIX}")
    return trt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, ``None`` when it cannot be imported."""
    try:
        return str(import_tensorrt().__version__)
    except Unavailable:
        return None
