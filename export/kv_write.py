"""Rewrite the decode step's cache writes from ``ScatterElements`` to ONNX ``TensorScatter`` (opset 24).

Why: TensorRT does not let one buffer be bound as both an input and an output of ordinary layers, so
a ``ScatterElements`` cache write makes it copy the whole cache on every step. ``TensorScatter``
(opset 24: a per-row write of ``update`` into a static cache along ``axis``) is what TensorRT 10.15+
maps to its KV-cache update layer, whose output is aliased to the cache input
(``engine.get_aliased_input_tensor``): the cache is updated in place. ONNX Runtime's CPU provider
runs it too, so the rewritten graph is validated against eager like every other graph.

What changes: each ``ScatterElements(past_key_values.i, indices, update, axis=2)`` whose output is
``present.i`` becomes ``TensorScatter(past_key_values.i, update, write_indices, axis=-2)``, where
``write_indices [B]`` is the step's ``position`` broadcast to every row (one node pair shared by all
layers). The opset import becomes 24; everything else is untouched. The rewrite refuses a graph
whose cache writes do not have exactly that form, rather than guessing.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ExportError

__all__ = ["TENSORSCATTER_OPSET", "to_tensorscatter"]

TENSORSCATTER_OPSET = 24


def to_tensorscatter(path: str | Path, n_layer: int) -> int:
    """Rewrite ``decode_step.onnx`` at ``path`` in place; returns the number of writes replaced.

    Raises:
        ExportError: the graph does not hold ``2 * n_layer`` ScatterElements cache writes of the
            expected form.
    """
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    present = {o.name for o in graph.output if o.name.startswith("present.")}
    writes = [n for n in graph.node if n.op_type == "ScatterElements" and n.output[0] in present]
    if len(writes) != 2 * n_layer:
        raise ExportError(
            f"{path.name}: expected {2 * n_layer} ScatterElements cache writes, found {len(writes)}; "
            "the decode graph changed shape; report it"
        )
    # write_indices [B] = position [1] expanded to the batch of token [B].
    shape_out, idx_out = "hita_kv_batch_shape", "hita_kv_write_indices"
    new_nodes = [
        helper.make_node("Shape", ["token"], [shape_out], name="hita_kv_batch_shape"),
        helper.make_node("Expand", ["position", shape_out], [idx_out], name="hita_kv_write_indices"),
    ]
    replaced = {}
    for n in writes:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.input[0] not in past or axis != 2:
            raise ExportError(
                f"{path.name}: cache write {n.name} reads {n.input[0]} along axis {axis}; expected a "
                "past_key_values input along axis 2; report it"
            )
        replaced[id(n)] = helper.make_node(
            "TensorScatter", [n.input[0], n.input[2], idx_out], [n.output[0]], name=f"{n.name}_tensorscatter",
            axis=-2, mode="linear",
        )
    nodes = new_nodes + [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, TENSORSCATTER_OPSET)
    # Nodes left without consumers (the old scatter index computation) are dropped.
    _prune(graph)
    onnx.save(model, str(path))
    # Checked from the file: external weights resolve relative to it (this folder is still private).
    onnx.checker.check_model(str(path))
    return len(writes)


def _prune(graph) -> None:
    """Remove nodes whose outputs nobody reads (repeat until stable)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)
