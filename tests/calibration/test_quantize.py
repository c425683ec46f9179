"""Quantized ONNX exports: real ONNX Runtime quantizers on the tiny export, loaded unchanged by the
ONNX Runtime executor, checked against fp32 eager with each recipe's thresholds."""
from __future__ import annotations

import collections
import dataclasses

import onnx
import pytest

from hita.calibration.collect import collect
from hita.calibration.dataset import CalibrationError
from hita.calibration.export import export_quantized
from hita.calibration.options import CollectOptions
from hita.calibration.recipes import RECIPES
from hita.export.manifest import load_manifest
from hita.export.testing import tiny_models
from hita.export.trt_support import tensorrt_violations
from hita.runtimes.onnxrt import OrtExecutor
from hita.runtimes.parity import ParityThresholds, check_parity
from hita.runtimes.sampling import SamplingOptions
from hita.runtimes.torch_eager import TorchExecutor

CLASSES = [0, 7]
FEEDS = 40  # as conftest.FEEDS


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _parity(folder, thresholds):
    gpt, tok = tiny_models(0)
    return check_parity(TorchExecutor(gpt, tok), OrtExecutor(folder, threads=1), CLASSES, SamplingOptions(seed=5),
                        thresholds)


def test_int8_weight_is_onnx_runtime_only_and_within_its_thresholds(int8w_dir, onnx_dir):
    m = load_manifest(int8w_dir, expect_engine="onnx")
    q = m.options["quantization"]
    assert (q["recipe"], q["tensorrt"], m.precision) == ("int8-weight", False, "float32")
    assert "ONNX Runtime only" in q["runtime"] and q["calibration_set"]["images"] == 2
    step = int8w_dir / "decode_step.onnx"
    ops = _ops(step)
    # Every linear layer (5 per block x 4 blocks + the head, rewritten from Gemm) became MatMulNBits.
    assert ops["MatMulNBits"] == 21 and ops["Gemm"] == 0
    assert step.stat().st_size < 0.5 * (onnx_dir / "decode_step.onnx").stat().st_size
    found = tensorrt_violations(onnx.load(str(step), load_external_data=False))
    assert found and "custom domain 'com.microsoft'" in found[0].rule
    assert _ops(int8w_dir / "decoder.onnx") == _ops(onnx_dir / "decoder.onnx")      # decoder kept fp32
    report = _parity(int8w_dir, RECIPES["int8-weight"].thresholds)
    assert report.ok, report.failures
    # Quantization really moved the logits: fp32's 1e-4 bound fails, so the recipe's bounds are what passed.
    assert report.max_logit_diff > 1e-3
    assert not dataclasses.replace(report, thresholds=ParityThresholds()).ok


def test_int8_qdq_is_symmetric_and_buildable_by_tensorrt(int8_dir):
    m = load_manifest(int8_dir, expect_engine="onnx")
    q = m.options["quantization"]
    assert (q["recipe"], q["calibrator"], q["tensorrt"]) == ("int8", "minmax", True)
    assert m.options["kv_inplace_verified"] is True
    for graph in ("decoder", "prefill", "decode_step"):
        model = onnx.load(str(int8_dir / f"{graph}.onnx"), load_external_data=False)
        ops = collections.Counter(n.op_type for n in model.graph.node)
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"], graph
        assert tensorrt_violations(model, graph) == []                        # zero points 0, INT8 only
    assert q["checks"]["decode_step"]["feeds_checked"] == 8
    report = _parity(int8_dir, RECIPES["int8"].thresholds)
    assert report.ok, report.failures
    assert 30 <= report.psnr_db < 80          # the decoder is quantized too: not fp32-exact, still close


def test_fp8_is_float8_qdq_buildable_by_tensorrt(fp8_dir):
    out = fp8_dir
    model = onnx.load(str(out / "decode_step.onnx"), load_external_data=False)
    q_types = {t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    assert q_types == {onnx.TensorProto.FLOAT8E4M3FN}
    assert next(i.version for i in model.opset_import if i.domain == "") >= 19
    assert tensorrt_violations(model) == []
    checks = load_manifest(out).options["quantization"]["checks"]["decode_step"]
    # Per-feed agreement with fp32 (real feeds from the set); the loop-level verdict is the report's.
    assert checks["mean_kl"] <= RECIPES["fp8"].thresholds.max_mean_kl and checks["top1_agreement"] >= 0.6
    OrtExecutor(out)    # loads unchanged


def test_a_set_from_other_weights_is_refused_and_nothing_is_written(tmp_path, onnx_dir):
    gpt, tok = tiny_models(1)       # same presets, other weights: only the recorded logits can tell
    other = collect(gpt, tok, tmp_path / "other.safetensors", CollectOptions(images=2, batch_images=2))
    out = tmp_path / "q"
    with pytest.raises(CalibrationError, match="recorded logits are not reproduced by this export .* other weights"):
        export_quantized(out, "int8", from_onnx=onnx_dir, calibration=other, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_too_few_images_for_a_histogram_calibrator(tmp_path, onnx_dir, tiny_set):
    with pytest.raises(CalibrationError, match="2 images are too few for the entropy calibrator .* at least 4"):
        export_quantized(tmp_path / "q", "int8", from_onnx=onnx_dir, calibration=tiny_set, calibrator="entropy",
                         progress=False)
    with pytest.raises(CalibrationError, match="needs --calibration SET"):
        export_quantized(tmp_path / "q", "int8", from_onnx=onnx_dir, progress=False)
    with pytest.raises(ValueError, match="calibrates with max, distribution, not 'minmax'"):
        export_quantized(tmp_path / "q", "fp8", from_onnx=onnx_dir, calibration=tiny_set, calibrator="minmax")
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_folder_is_not_quantized_again(tmp_path, int8w_dir, tiny_set):
    with pytest.raises(ValueError, match="is already a int8-weight export; quantize an fp32 ONNX folder"):
        export_quantized(tmp_path / "q", "int8", from_onnx=int8w_dir, calibration=tiny_set, progress=False)


def test_a_gqa_export_is_not_given_qdq(tmp_path, monkeypatch, onnx_dir, tiny_set):
    """Q/DQ recipes are for TensorRT, which cannot parse an `--attention gqa` folder's contrib op:
    refused by name (weight-only recipes do quantize it: tests/export/test_gqa.py). The tiny
    folder's manifest, read for real, gets the option a gqa export records."""
    import hita.calibration.export as cal_export

    real = cal_export.load_manifest

    def as_gqa(folder, **kw):
        m = real(folder, **kw)
        return dataclasses.replace(m, options={**m.options, "attention": "gqa"})

    monkeypatch.setattr(cal_export, "load_manifest", as_gqa)
    with pytest.raises(ValueError, match="an `--attention gqa` export; quantize a plain fp32 ONNX folder"):
        export_quantized(tmp_path / "q", "int8", from_onnx=onnx_dir, calibration=tiny_set, progress=False)
    assert list(tmp_path.iterdir()) == []
