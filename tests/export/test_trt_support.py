"""Every graph hita exports for TensorRT is inside TensorRT's ONNX support matrix, and the check
names the node when a graph is not (crafted graphs that break each rule)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hita.export.errors import ExportError
from hita.export.onnx import export_onnx
from hita.export.testing import tiny_models
from hita.export.trt_support import check_onnx_for_tensorrt, support_table, tensorrt_violations


@pytest.fixture(scope="module")
def tensorscatter_dir(tmp_path_factory):
    g, t = tiny_models(0)
    return export_onnx(g, t, tmp_path_factory.mktemp("trt") / "onnx", kv_write="tensorscatter", progress=False)


def test_table_names_its_source_and_covers_the_quantization_ops():
    table = support_table()
    assert "onnx-tensorrt" in table["about"] and table["tensorrt_min"] == "10.15"
    assert table["opset"] == [9, 24]
    assert table["ops"]["DequantizeLinear"] == ["INT8", "FP8", "FP4", "INT4"]
    assert "MatMulInteger" not in table["ops"]


@pytest.mark.parametrize("graph", ["decoder.onnx", "prefill.onnx", "decode_step.onnx"])
def test_exported_graphs_pass(onnx_dir, tensorscatter_dir, graph):
    for folder in (onnx_dir, tensorscatter_dir):
        model = onnx.load(str(folder / graph), load_external_data=False)
        assert tensorrt_violations(model, graph) == []
        check_onnx_for_tensorrt(folder / graph)
    ops = {n.op_type for n in onnx.load(str(tensorscatter_dir / graph), load_external_data=False).graph.node}
    assert ("TensorScatter" in ops) == (graph == "decode_step.onnx")


def _model(nodes, inputs, outputs, inits=(), opset=24, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domains])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_integer_matmul_is_named():
    m = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="int_mm")],
               [_vi("a", TensorProto.INT32, [2, 2]), _vi("b", TensorProto.INT32, [2, 2])],
               [_vi("c", TensorProto.INT32, [2, 2])])
    (v,) = tensorrt_violations(m, "x.onnx")
    assert v.node == "int_mm" and "INT32 data" in v.rule


def test_cumsum_on_integers_and_with_a_computed_axis():
    axis = numpy_helper.from_array(np.array(0, dtype=np.int64), "axis")
    m = _model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs_int"),
                helper.make_node("Shape", ["f"], ["s"]),
                helper.make_node("Gather", ["s", "zero"], ["dyn_axis"]),
                helper.make_node("CumSum", ["f", "dyn_axis"], ["z"], name="cs_dyn")],
               [_vi("x", TensorProto.INT64, [4]), _vi("f", TensorProto.FLOAT, [4])],
               [_vi("y", TensorProto.INT64, [4]), _vi("z", TensorProto.FLOAT, [4])],
               [axis, numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")])
    found = {v.node: v.rule for v in tensorrt_violations(m)}
    assert "INT64 data" in found["cs_int"]
    assert "build-time constant" in found["cs_dyn"]


def test_dequantize_with_nonzero_zero_point():
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zp = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "zp0")
    m = _model([helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["x"], name="dq_asym"),
                helper.make_node("DequantizeLinear", ["q", "scale", "zp0"], ["y"], name="dq_sym")],
               [_vi("q", TensorProto.INT8, [4])], [_vi("x", TensorProto.FLOAT, [4]), _vi("y", TensorProto.FLOAT, [4])],
               [scale, zp, zero])
    (v,) = tensorrt_violations(m)
    assert v.node == "dq_asym" and "zero point" in v.rule


def test_tensorscatter_axis_and_rank():
    m = _model([helper.make_node("TensorScatter", ["cache", "upd", "idx"], ["out"], name="ts_axis", axis=-1),
                helper.make_node("TensorScatter", ["c3", "u3", "idx"], ["o3"], name="ts_rank")],
               [_vi("cache", TensorProto.FLOAT, [1, 2, 8, 4]), _vi("upd", TensorProto.FLOAT, [1, 2, 1, 4]),
                _vi("c3", TensorProto.FLOAT, [2, 8, 4]), _vi("u3", TensorProto.FLOAT, [2, 1, 4]),
                _vi("idx", TensorProto.INT64, [1])],
               [_vi("out", TensorProto.FLOAT, [1, 2, 8, 4]), _vi("o3", TensorProto.FLOAT, [2, 8, 4])])
    found = {v.node: v.rule for v in tensorrt_violations(m)}
    assert "axis must be -2" in found["ts_axis"]
    assert "must be 4-D" in found["ts_rank"]


def test_contrib_ops_opset_and_unlisted_ops():
    m = _model([helper.make_node("MatMulNBits", ["a", "b"], ["c"], name="nbits", domain="com.microsoft"),
                helper.make_node("Unique", ["a"], ["u"], name="uniq")],
               [_vi("a", TensorProto.FLOAT, [2, 2]), _vi("b", TensorProto.UINT8, [2, 2])],
               [_vi("c", TensorProto.FLOAT, [2, 2]), _vi("u", TensorProto.FLOAT, [None])], opset=25,
               domains=[helper.make_opsetid("com.microsoft", 1)])
    found = {v.node: v.rule for v in tensorrt_violations(m)}
    assert "custom domain 'com.microsoft'" in found["nbits"]
    assert "not in TensorRT's ONNX support matrix" in found["uniq"]
    assert "opset 25 outside" in found["(model)"]


def test_check_raises_one_line_naming_the_first_node(tmp_path):
    m = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="int_mm")],
               [_vi("a", TensorProto.INT64, [2, 2]), _vi("b", TensorProto.INT64, [2, 2])],
               [_vi("c", TensorProto.INT64, [2, 2])])
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match=r"^not buildable by TensorRT: bad.onnx: node int_mm \(MatMul\)") as e:
        check_onnx_for_tensorrt(tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)
