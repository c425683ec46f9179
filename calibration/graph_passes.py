"""Small, exact rewrites of exported ONNX graphs that quantizers need, and the node selection.

Quantizers act on ``MatMul`` nodes whose weight is a constant (ONNX Runtime's ``MatMulNBits``
quantizer only on those, its Q/DQ quantizer most reliably so). The dynamo exporter writes most
``nn.Linear`` layers that way, but a 2-D linear such as the GPT's output head comes out as
``Gemm(x, W, transB=1)``, and the head is the largest single weight of the decode step (a quarter of
GPT-B's bytes). :func:`gemm_to_matmul` rewrites such nodes into ``MatMul(x, W^T)`` (+ ``Add`` for a
bias): the same arithmetic, so the fp32 graph's outputs do not change beyond summation order.

:func:`linear_matmuls` picks the nodes to quantize: matmuls with a constant 2-D weight, i.e. the
linear layers. Attention's two activation-by-activation matmuls (q.k and p.v over the KV cache) are
left in float: they have no weights to compress, and quantizing them would need per-step scales of
the cache, which a static calibration cannot give.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["gemm_to_matmul", "linear_matmuls", "convs", "initializers"]


def initializers(model: "onnx.ModelProto") -> dict[str, "onnx.TensorProto"]:
    return {t.name: t for t in model.graph.initializer}


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def gemm_to_matmul(model: "onnx.ModelProto") -> int:
    """Rewrite ``Gemm(x, W[, C])`` with a constant ``W``, ``alpha = beta = 1`` and ``transA = 0`` into
    ``MatMul(x, W')`` (``W'`` = ``W`` or its transpose, a new initializer) plus ``Add(., C)``, in place.

    Returns:
        The number of nodes rewritten.
    """
    import onnx
    from onnx import numpy_helper

    inits = initializers(model)
    nodes = list(model.graph.node)
    used: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            used[i] = used.get(i, 0) + 1
    out, count = [], 0
    for n in nodes:
        a = _attrs(n)
        if (n.op_type != "Gemm" or n.input[1] not in inits or a.get("transA", 0) != 0
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            out.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if a.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        name = f"{n.input[1]}__kn"
        if name not in inits:
            model.graph.initializer.append(numpy_helper.from_array(w, name))
            inits[name] = model.graph.initializer[-1]
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}__mm" if has_bias else n.output[0]
        out.append(onnx.helper.make_node("MatMul", [n.input[0], name], [mm_out], name=f"{n.name or 'gemm'}__matmul"))
        if has_bias:
            out.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]],
                                             name=f"{n.name or 'gemm'}__bias"))
        used[n.input[1]] -= 1
        count += 1
    # Drop weights that only the rewritten Gemms used (the transposed copy replaces them).
    dead = {k for k, v in used.items() if v == 0 and k in inits}
    if dead:
        keep = [t for t in model.graph.initializer if t.name not in dead]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return count


def linear_matmuls(model: "onnx.ModelProto") -> list[str]:
    """Names of the ``MatMul`` nodes whose second input is a constant 2-D weight (the linear layers).

    Raises:
        ValueError: such a node has no name (quantizers select nodes by name).
    """
    inits = initializers(model)
    names = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            if not n.name:
                raise ValueError("an exported MatMul has no name; the quantizers select nodes by name")
            names.append(n.name)
    return names


def convs(model: "onnx.ModelProto") -> list[str]:
    """Names of the ``Conv`` nodes with constant weights (the tokenizer decoder's convolutions)."""
    inits = initializers(model)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits and n.name]
