"""Quantize one exported ONNX graph with a recipe: weight-only ``MatMulNBits`` or static Q/DQ.

Both paths use ONNX Runtime's own quantization tools (``onnxruntime.quantization``, shipped in the
``onnxruntime`` wheel the ONNX path already needs), imported lazily here:

- weight-only: ``MatMulNBitsQuantizer`` (round to nearest, symmetric, blockwise scales) rewrites each
  linear ``MatMul`` into the contrib op ``com.microsoft.MatMulNBits``;
- static Q/DQ: ``quantize_static`` in QDQ format with symmetric activations and weights (zero points
  0, what TensorRT requires), per-channel weights for int8, per-tensor E4M3 for fp8, on the nodes
  :mod:`~hita.calibration.graph_passes` selects, calibrated on the set's feeds.

Feeds reach the calibrator through :class:`FeedReader`, which builds each feed only when asked (a
GPT-B decode-step feed carries ~85 MB of cache) and hands them over in small strides, so ONNX
Runtime's histogram calibrators, which otherwise keep every output of every feed, stay bounded.
(Not ``CalibMaxIntermediateOutputs``: in onnxruntime 1.32 the MinMax calibrator *drops* the outputs
it collected when that count is reached, without folding them into the ranges.)
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hita.util.log import quiet

from .graph_passes import convs, gemm_to_matmul, linear_matmuls

if TYPE_CHECKING:
    from .recipes import Recipe

__all__ = ["quantize_graph", "FeedReader", "CALIBRATORS"]

Feed = dict[str, np.ndarray]
CALIBRATORS = ("minmax", "entropy", "percentile", "distribution", "max")
FP8_MAX = 448.0  # largest finite float8 E4M3FN value
STRIDE = 4  # feeds per calibrator pass: bounds what a histogram calibrator holds at once


def _reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedReader(CalibrationDataReader):
        """Feeds built on demand; ``set_range`` lets ``quantize_static`` walk them in strides."""

        def __init__(self, makers: Sequence[Callable[[], Feed]]) -> None:
            self.makers = list(makers)
            self.set_range(0, len(self.makers))

        def __len__(self) -> int:
            return len(self.makers)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(self.makers[start_index:end_index])

        def get_next(self) -> Feed | None:
            make = next(self._it, None)
            return None if make is None else make()

    return _FeedReader


def FeedReader(makers: Sequence[Callable[[], Feed]]):  # noqa: N802 - a class made lazily
    """A ``CalibrationDataReader`` over feed makers (``onnxruntime`` imported on first use)."""
    return _reader_class()(makers)


def _stride(n: int) -> int:
    """Largest divisor of ``n`` up to :data:`STRIDE` (``quantize_static`` wants an exact division)."""
    return max(d for d in range(1, min(STRIDE, n) + 1) if n % d == 0)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    # "max" (fp8) still runs ONNX Runtime's Distribution pass (its float8 path requires one); the
    # scales it would pick are then replaced by amax scales (:func:`_amax_overrides`).
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution,
            "max": CalibrationMethod.Distribution}[name]


def _amax_overrides(model, pre: Path, feeds: Sequence[Callable[[], Feed]], nodes: list[str], tmp: Path) -> dict:
    """Per-tensor float8 scales ``amax / 448`` for the activations and weights of ``nodes``.

    Why: ONNX Runtime's float8 scales match the tensor's standard deviation to that of the E4M3
    grid, which clips everything past ~4 standard deviations; the few large activations of a trained
    transformer are exactly those, and on the embedded model that recipe missed the thresholds by 3x
    in KL. The amax rule (TensorRT's and modelopt's FP8 default) never clips what calibration saw and
    spends E4M3's 3 mantissa bits, which are relative, on the rest.
    """
    import ml_dtypes
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    inits = {t.name: t for t in model.graph.initializer}
    wanted = {n.name: n for n in model.graph.node if n.name in set(nodes)}
    calibrator = create_calibrator(pre, ["MatMul"], augmented_model_path=str(tmp / "amax.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                                   extra_options={"symmetric": True})
    reader = FeedReader(feeds)
    step = _stride(len(feeds))
    for start in range(0, len(feeds), step):
        reader.set_range(start, start + step)
        calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    out: dict[str, list[dict]] = {}
    for node in wanted.values():
        x, w = node.input[0], node.input[1]
        if x in ranges.data:
            lo, hi = ranges.data[x].range_value
            amax = float(max(np.abs(np.asarray(lo)).max(), np.abs(np.asarray(hi)).max())) or 1.0
            out[x] = [{"scale": np.array(amax / FP8_MAX, dtype=np.float32), "zero_point": zero}]
        amax_w = float(np.abs(numpy_helper.to_array(inits[w], base_dir=str(pre.parent))).max()) or 1.0
        out[w] = [{"scale": np.array(amax_w / FP8_MAX, dtype=np.float32), "zero_point": zero}]
    return out


@contextlib.contextmanager
def _quiet_ort():
    """ONNX Runtime's quantizers log every node at INFO and print histogram chatter to stdout."""
    names = ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "root")
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with quiet(False, "onnxruntime"):
            yield
    finally:
        for n, lv in zip(names, old):
            logging.getLogger(n).setLevel(lv)


def _load(src: Path):
    import onnx

    model = onnx.load(str(src))   # external data (if any) is read into memory
    rewritten = gemm_to_matmul(model)
    return model, rewritten


def _opset(model, want: int) -> Any:
    """The model at an opset of at least ``want`` (float8 Q/DQ needs 19)."""
    import onnx

    have = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    return model if have >= want else onnx.version_converter.convert_version(model, want)


def quantize_graph(
    src: Path,
    dst: Path,
    recipe: "Recipe",
    *,
    graph: str,
    calibrator: str | None = None,
    feeds: Sequence[Callable[[], Feed]] = (),
    external_data: bool = False,
) -> dict[str, Any]:
    """Write the quantized version of the ONNX graph ``src`` to ``dst``.

    Args:
        src: an fp32 graph from ``hita export --engine onnx``.
        dst: where to write (``dst.name + ".data"`` beside it when ``external_data``).
        recipe: what to do (:class:`~hita.calibration.recipes.Recipe`).
        graph: the graph's name (``decoder``, ``prefill``, ``decode_step``): the decoder's
            convolutions are quantized only by recipes that say so.
        calibrator: activation calibrator for static recipes (one of :data:`CALIBRATORS`).
        feeds: feed makers for static recipes (each returns one fixed-shape input dict).
        external_data: store weights in a side file (graphs over 2 GB).
    Returns:
        Facts for the manifest: nodes quantized, their kinds, the calibrator and feed count.
    """
    model, rewritten = _load(src)
    nodes = linear_matmuls(model)
    facts: dict[str, Any] = {"gemm_rewritten": rewritten, "linear_matmuls": len(nodes)}
    if recipe.method == "weight-only":
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        with _quiet_ort():
            q = MatMulNBitsQuantizer(model, bits=recipe.bits, block_size=recipe.block_size, is_symmetric=True,
                                     accuracy_level=recipe.accuracy_level, nodes_to_include=nodes,
                                     op_types_to_quantize=("MatMul",), quant_format=QuantFormat.QOperator)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=external_data)
        facts.update(quantized_nodes=len(nodes), bits=recipe.bits, block_size=recipe.block_size,
                     accuracy_level=recipe.accuracy_level)
        return facts
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    import onnx

    model = _opset(model, recipe.min_opset)
    targets = nodes + (convs(model) if recipe.quantize_convs and graph == "decoder" else [])
    if not targets:
        onnx.save(model, str(dst), save_as_external_data=external_data,
                  location=dst.name + ".data" if external_data else None)
        facts.update(quantized_nodes=0)
        return facts
    if not feeds:
        raise ValueError(f"{graph}: the {recipe.name} recipe needs calibration feeds")
    qtype = QuantType.QFLOAT8E4M3FN if recipe.dtype == "float8e4m3fn" else QuantType.QInt8
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": _stride(len(feeds)),
             # Biases stay float: TensorRT refuses INT32 DequantizeLinear, and adds them in float anyway.
             "QuantizeBias": False,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    with tempfile.TemporaryDirectory(prefix="hita-quant-", dir=dst.parent) as tmp, _quiet_ort():
        pre = Path(tmp) / "pre.onnx"
        onnx.save(model, str(pre), save_as_external_data=True, location="pre.onnx.data")
        if (calibrator or recipe.calibrator) == "max":
            extra["TensorQuantOverrides"] = _amax_overrides(model, pre, feeds, targets, Path(tmp))
        quantize_static(
            str(pre), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel, activation_type=qtype, weight_type=qtype,
            nodes_to_quantize=targets, op_types_to_quantize=["MatMul", "Conv"] if recipe.quantize_convs else ["MatMul"],
            calibrate_method=_method(calibrator or recipe.calibrator), use_external_data_format=external_data,
            extra_options=extra,
        )
    facts.update(quantized_nodes=len(targets), calibrator=calibrator or recipe.calibrator, feeds=len(feeds),
                 per_channel=recipe.per_channel, dtype=recipe.dtype)
    return facts
