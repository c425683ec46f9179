"""The in-place cache binding of an ONNX decode step, as :class:`~hita.runtimes.onnxrt.OrtExecutor`
runs it: one OrtValue per cache bound as both ``past_key_values.i`` and ``present.i``. The export
checks (plain graph and GQA step) run the graph this way to prove the kernels tolerate the aliasing.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .spec import ExportSpec


def bind_inplace(sess, spec: ExportSpec, feed: Mapping[str, np.ndarray], logits_dtype: Any = np.float32):
    """An IO binding over copies of ``feed`` (so the caller's arrays are never written).

    Returns:
        ``(binding, position, logits, caches)``: the OrtValues bound; update ``position`` in place
        (``update_inplace``) to run the next step, read ``logits`` ``[B, V]`` and ``caches`` after it.
    """
    import onnxruntime as ort

    def value(a: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a).copy())

    past, present = spec.input_names[2:], spec.output_names[1:]
    binding = sess.io_binding()
    caches = [value(feed[n]) for n in past]
    position = value(feed["position"])
    rows, vocab = feed["token"].shape[0], int(spec.outputs[0].shape[1])
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, vocab), dtype=logits_dtype))  # [B, V]
    binding.bind_ortvalue_input("token", value(feed["token"]))
    binding.bind_ortvalue_input("position", position)
    binding.bind_ortvalue_output(spec.output_names[0], logits)
    for i, o, c in zip(past, present, caches):
        binding.bind_ortvalue_input(i, c)
        binding.bind_ortvalue_output(o, c)
    return binding, position, logits, caches
