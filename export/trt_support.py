"""Static check that an ONNX graph is one TensorRT's ONNX parser can build, before any TensorRT.

TensorRT is not installable on every machine that exports (ours included), and a build on the target
GPU that fails after minutes on an unsupported node is the worst place to learn it. So every ONNX
graph meant for TensorRT is checked here against the parser's support matrix, kept as data in
``data/tensorrt_onnx_ops.json`` (its ``about`` names the source): each node's operator and data type,
the opset range, custom domains, and the restrictions the matrix states (Q/DQ zero points 0,
``TensorScatter`` 4-D on axis -2, constant ``CumSum`` axis and reduction axes, sorted ``TopK``, no
cache inputs on ``Attention``). A violation names the node, what it breaks and the fix.

ONNX Runtime's ``GroupQueryAttention`` (``hita export --attention gqa``) is a contrib op TensorRT's
parser does not know; a folder exported with it is refused by name (:func:`refuse_contrib_attention`),
before TensorRT is even needed, with the export that works.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ExportError

if TYPE_CHECKING:
    import onnx

__all__ = ["Violation", "support_table", "check_onnx_for_tensorrt", "tensorrt_violations", "refuse_contrib_attention"]

_GQA_FIX = ("ONNX Runtime's GroupQueryAttention (an `--attention gqa` export) cannot be built by TensorRT; "
            "export the folder with `hita export --engine onnx --attention plain` (the default) for TensorRT")

TABLE = Path(__file__).with_name("data") / "tensorrt_onnx_ops.json"

# ONNX TensorProto element type -> the matrix's type names.
_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
               11: "DOUBLE", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 21: "UINT4", 23: "FP4"}
# Which input carries the operator's data type (default: input 0); -1 means the first output.
DATA_INPUT = {"Where": 1, "Constant": -1, "ConstantOfShape": -1, "Shape": None, "Size": None}
_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")


@dataclass(frozen=True)
class Violation:
    """One node TensorRT's parser would reject: ``graph``, ``node`` (name or ``#index op``), ``rule``."""

    graph: str
    node: str
    op: str
    rule: str

    def __str__(self) -> str:
        return f"{self.graph}: node {self.node} ({self.op}): {self.rule}"


@cache
def support_table() -> dict[str, Any]:
    """The support matrix: ``{"ops": {op: [types]}, "opset": [lo, hi], "restrictions": {...}, ...}``."""
    return json.loads(TABLE.read_text())


def _tensor_facts(model: "onnx.ModelProto") -> tuple[dict[str, int], dict[str, int], dict[str, Any]]:
    """(element type, rank, constant TensorProto) by tensor name, from declarations, initializers,
    ``Constant`` nodes and shape inference (best effort: declared facts still count without it)."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001
        g = model.graph
    values = (*g.input, *g.output, *g.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}
    consts: dict[str, Any] = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    types.update({k: t.data_type for k, t in consts.items()})
    ranks.update({k: len(t.dims) for k, t in consts.items()})
    return types, ranks, consts


def _attr(node, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_zero(tensor) -> bool:
    from onnx import numpy_helper

    try:
        arr = numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - an exotic dtype ml_dtypes cannot read: its raw bytes must be zero
        return not any(tensor.raw_data) and not any(tensor.int32_data)
    return bool((arr.astype("float64") == 0).all()) if arr.dtype.kind != "V" else not any(arr.tobytes())


def tensorrt_violations(model: "onnx.ModelProto", graph: str = "graph") -> list[Violation]:
    """Every node of ``model`` that TensorRT's parser would reject, per the support matrix."""
    table = support_table()
    ops: dict[str, list[str]] = table["ops"]
    lo, hi = table["opset"]
    found: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            found.append(Violation(graph, "(model)", "opset", f"opset {imp.version} outside TensorRT's {lo}..{hi}; "
                                   f"export with an opset in that range"))
    types, ranks, consts = _tensor_facts(model)
    for i, node in enumerate(model.graph.node):
        where = node.name or f"#{i}"
        op = node.op_type

        def bad(rule: str) -> None:
            found.append(Violation(graph, where, op, rule))

        if node.domain == "com.microsoft" and op == "GroupQueryAttention":
            bad(_GQA_FIX)
            continue
        if node.domain not in ("", "ai.onnx"):
            bad(f"custom domain {node.domain!r} is not parsed by TensorRT (ONNX Runtime contrib op); "
                "export the plain-ONNX variant for TensorRT")
            continue
        if op not in ops:
            bad("operator not in TensorRT's ONNX support matrix; export a variant without it")
            continue
        idx = DATA_INPUT.get(op, 0)
        if idx is not None:
            tensor = node.output[0] if idx == -1 else (node.input[idx] if len(node.input) > idx else "")
            code = types.get(tensor)
            if code:
                name = _TYPE_NAMES.get(code, f"type {code}")
                if name not in ops[op]:
                    bad(f"{name} data (tensor {tensor!r}) is not supported (supported: {', '.join(ops[op])}); "
                        "cast to a supported type in the model")
        if op == "Cast":
            to = _TYPE_NAMES.get(_attr(node, "to", 0), "?")
            if to not in ops[op]:
                bad(f"cast to {to} is not supported (supported: {', '.join(ops[op])})")
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None or not _is_zero(zp):
                bad("zero point must be a constant 0 (TensorRT quantization is symmetric); "
                    "quantize with symmetric scales")
        if op == "TensorScatter":
            if _attr(node, "axis", -2) != -2:
                bad(f"axis must be -2 (got {_attr(node, 'axis', -2)}); write the cache along the sequence axis")
            for t in node.input[:2]:
                if ranks.get(t) not in (None, 4):
                    bad(f"input {t!r} must be 4-D (is {ranks.get(t)}-D)")
        if op == "TopK":
            if _attr(node, "sorted", 1) != 1:
                bad("sorted must be 1")
            k = consts.get(node.input[1]) if len(node.input) > 1 else None
            if k is not None:
                from onnx import numpy_helper

                if int(numpy_helper.to_array(k).max()) >= 3840:
                    bad("K must be below 3840")
        if op == "CumSum" and (len(node.input) < 2 or node.input[1] not in consts):
            bad("axis must be a build-time constant")
        if op in _REDUCE and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
            bad("axes must be an initializer")
        if op == "Attention" and (any(node.input[4:]) or any(node.output[1:])):
            bad("past/present key-value and qk outputs are not supported by TensorRT's Attention")
        if op == "LayerNormalization" and any(node.output[1:]):
            bad("only output Y is supported")
    return found


def check_onnx_for_tensorrt(path: str | Path) -> None:
    """Raise :class:`ExportError` (first violation, and how many more) if ``path`` would not parse."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    found = tensorrt_violations(model, path.name)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ExportError(f"not buildable by TensorRT: {found[0]}{more}")


def refuse_contrib_attention(folder: str | Path, expect_manifest_sha256: str | None = None) -> None:
    """Raise :class:`ExportError` (one line) when the ONNX artifacts ``folder`` records
    ``attention: gqa`` in its manifest. A folder whose manifest cannot be read is left to the
    caller's own checks (they say why in their words)."""
    from .errors import ArtifactError
    from .manifest import load_manifest

    try:
        m = load_manifest(folder, verify_files=False, expect_sha256=expect_manifest_sha256)
    except (ArtifactError, OSError, ValueError):
        return
    if m.options.get("attention") == "gqa":
        raise ExportError(f"{folder}: {_GQA_FIX}")
