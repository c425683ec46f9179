"""One deserialized TensorRT engine and its execution context, driven with torch CUDA tensors.

Shared by the engine builder (validating what it built against eager) and the TensorRT executor
(``runtimes/tensorrt.py``), which binds fixed buffers once and replays CUDA graphs over them.
Tensors are bound by address (``set_tensor_address``) and run with ``execute_async_v3`` on a
non-default stream; TensorRT is imported lazily (:func:`hita.util.gpu.import_tensorrt`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hita.util.gpu import import_tensorrt

from .errors import ArtifactError

__all__ = ["TrtEngine", "torch_dtype"]

# TensorRT DataType names -> torch dtypes for the tensors hita binds.
_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
           "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (by name, so it works across TensorRT versions)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in _DTYPES:
        raise ArtifactError(f"engine tensor type {name} has no torch equivalent here; rebuild from a supported ONNX")
    return _DTYPES[name]


def _shape(dims: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class TrtEngine:
    """An engine plus one execution context.

    Args:
        plan: the serialized engine (the ``.engine`` file's bytes, already hash-checked).
        file_name: for messages.
        device: the CUDA device that runs it.
    Attributes:
        inputs, outputs: tensor names in engine order.
        profiles: per optimisation profile, ``{input: (min, opt, max) shapes}``.
    """

    def __init__(self, plan: bytes, file_name: str, device: torch.device):
        import_tensorrt()  # one line naming what is missing
        import tensorrt as trt

        self.file_name, self.device = file_name, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(
                f"{file_name}: TensorRT refused to deserialize it (built by another TensorRT version or for "
                "another GPU); rebuild it on this machine with `hita export --engine tensorrt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = [
            {n: tuple(_shape(s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in self.inputs}
            for p in range(self.engine.num_optimization_profiles)
        ]
        self.profile = -1

    def aliased_input(self, output: str) -> str | None:
        """The input an output shares memory with (TensorRT's in-place KV-cache update), else ``None``."""
        # Added in TensorRT 10.15 (the 10.13 type stubs predate it; tests check the 10.16 and 11.1 APIs).
        name = self.engine.get_aliased_input_tensor(output)  # type: ignore[attr-defined]
        return name or None

    def profile_for(self, rows: int, batch_input: str) -> int:
        """Index of the first profile whose batch range (axis 0 of ``batch_input``) holds ``rows``."""
        for i, p in enumerate(self.profiles):
            lo, _, hi = p[batch_input]
            if lo[0] <= rows <= hi[0]:
                return i
        ranges = ", ".join(f"{p[batch_input][0][0]}..{p[batch_input][2][0]}" for p in self.profiles)
        raise ValueError(f"{self.file_name}: {rows} rows is outside every optimisation profile ({ranges}); "
                         "rebuild with a larger --max-batch or run fewer rows")

    def select(self, profile: int, stream: torch.cuda.Stream) -> None:
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self.profile = profile

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the shape of every given input and the address of every given tensor."""
        for name, t in tensors.items():
            if t.dtype != self.dtypes[name] or not t.is_contiguous() or t.device != self.device:
                raise ValueError(f"{self.file_name}: {name} must be a contiguous {self.dtypes[name]} tensor on "
                                 f"{self.device}, got {t.dtype} on {t.device}")
            if name in self.inputs and not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self.file_name}: input {name} shape {tuple(t.shape)} is outside the profile")
            self.context.set_tensor_address(name, t.data_ptr())

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.file_name}: TensorRT execution failed (see TensorRT's log above)")

    def run(self, feed: Mapping[str, torch.Tensor], batch_input: str, stream: torch.cuda.Stream | None = None
            ) -> Sequence[torch.Tensor]:
        """Convenience for validation: allocate outputs, run once, return them in engine order."""
        stream = stream or torch.cuda.Stream(self.device)
        feed = {n: feed[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        with torch.cuda.stream(stream):
            self.select(self.profile_for(feed[batch_input].shape[0], batch_input), stream)
            self.bind(feed)
            outs = {n: torch.empty(_shape(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                    for n in self.outputs}
            for n, t in outs.items():
                alias = self.aliased_input(n)
                if alias is not None:  # in-place cache: the output is the (updated) input buffer
                    outs[n] = feed[alias]
            self.bind(outs)
            self.execute(stream)
        stream.synchronize()
        return [outs[n] for n in self.outputs]
