"""Which engine may run which quantized folder: one rule in the recipes, applied by the TensorRT
builder (before any GPU work) and the runtime factory. No GPU here: capabilities and versions are
injected, and the builder's GPU query is replaced by a fake GPU."""
from __future__ import annotations

import onnxruntime
import pytest
from typer.testing import CliRunner

from hita.calibration.recipes import ENGINES, RECIPES, RecipeRefused, check_engine, engine_refusal, kv_cache_refusal
from hita.util.gpu import GpuFacts, Unavailable

runner = CliRunner()


def _never():
    raise AssertionError("asked for a value the decision does not need")


def test_fp8_needs_sm89_for_tensorrt_and_nothing_else_does():
    for cc in [(7, 5), (8, 0), (8, 6), (8, 7)]:
        why = engine_refusal("fp8", "tensorrt", compute_capability=cc)
        assert why is not None and f"compute capability {cc[0]}.{cc[1]}" in why and "SM 8.9+" in why
    for cc in [(8, 9), (9, 0), (10, 0), (12, 0)]:
        assert engine_refusal("fp8", "tensorrt", compute_capability=cc) is None
        assert engine_refusal("fp8", "tensorrt", compute_capability=lambda cc=cc: cc) is None
    # int8 has no capability rule of its own (TensorRT's minimum applies), so the GPU is not asked.
    assert engine_refusal("int8", "tensorrt", compute_capability=_never) is None
    # Q/DQ graphs run on ONNX Runtime's providers whatever the GPU (dequantize + float matmul).
    for name in ("int8", "fp8"):
        for engine in ("onnxruntime-cpu", "onnxruntime-cuda"):
            assert engine_refusal(name, engine, compute_capability=_never, version=_never) is None


def test_weight_only_folders_never_reach_tensorrt():
    for name in ("int8-weight", "int4-weight"):
        why = engine_refusal(name, "tensorrt", compute_capability=_never, version=_never)
        assert why is not None and "MatMulNBits" in why and "no TensorRT version parses" in why
        assert "--precision int8" in why


def test_int8_weight_on_onnxruntime_cuda_needs_1_22():
    why = engine_refusal("int8-weight", "onnxruntime-cuda", version="1.21.1")
    assert why is not None and "onnxruntime-cuda 1.21" in why and "onnxruntime-gpu>=1.22" in why
    assert engine_refusal("int8-weight", "onnxruntime-cuda", version="1.22.0") is None
    assert engine_refusal("int8-weight", "onnxruntime-cuda", version=(1, 32)) is None
    assert engine_refusal("int4-weight", "onnxruntime-cuda", version=_never) is None   # 4-bit: since 1.17
    assert engine_refusal("int8-weight", "onnxruntime-cpu", version=_never) is None


def test_the_table_agrees_with_itself():
    for rec in RECIPES.values():
        engines = dict(rec.engines)
        assert set(engines) <= set(ENGINES)
        # Every folder is checked in ONNX Runtime on the CPU before it is written, so every recipe runs there.
        assert "onnxruntime-cpu" in engines, rec.name
        # The recipe's TensorRT flag (its graphs pass TensorRT's support check) matches the engine list.
        assert rec.tensorrt == ("tensorrt" in engines), rec.name
        assert rec.unsupported or set(engines) == set(ENGINES), rec.name
    with pytest.raises(ValueError, match="unknown engine"):
        engine_refusal("int8", "openvino")
    check_engine({}, "tensorrt", compute_capability=_never)          # an fp32 folder: nothing to refuse
    with pytest.raises(RecipeRefused, match=r"^DIR: tensorrt cannot run int4-weight"):
        check_engine({"quantization": {"recipe": "int4-weight"}}, "tensorrt", folder="DIR")


def test_kv_cache_is_refused_with_what_is_missing(tmp_path, onnx_dir, tiny_set):
    from hita.calibration.export import export_quantized

    assert "no float8 KV cache" in kv_cache_refusal("fp8")
    assert "GroupQueryAttention" in kv_cache_refusal("int8") and "float32 I/O" in kv_cache_refusal("int8")
    with pytest.raises(ValueError, match="must be one of int8, fp8"):
        kv_cache_refusal("int4")
    for kind in ("int8", "fp8"):
        with pytest.raises(ValueError, match=f"--kv-cache {kind} is not supported"):
            export_quantized(tmp_path / "q", "int8", from_onnx=onnx_dir, calibration=tiny_set, kv_cache=kind,
                             progress=False)
    assert list(tmp_path.iterdir()) == []


def _gpu(monkeypatch, cc):
    """Replace the GPU the TensorRT builder would ask about (no GPU here)."""
    import hita.export.tensorrt as trt_export

    fake = (lambda device=0: GpuFacts("fake GPU", cc)) if cc else (lambda device=0: _never())
    monkeypatch.setattr(trt_export, "gpu_facts", fake)


def test_build_from_onnx_refuses_fp8_below_sm89_before_any_build(tmp_path, monkeypatch, fp8_dir):
    from hita.export.tensorrt import build_from_onnx

    out = tmp_path / "engines"
    _gpu(monkeypatch, (8, 6))
    with pytest.raises(RecipeRefused, match=r"cannot build fp8 folders on this GPU \(compute capability 8\.6\)"):
        build_from_onnx(fp8_dir, out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # On an SM 9.0 GPU the recipe check passes; the build then needs TensorRT, which is not here.
    _gpu(monkeypatch, (9, 0))
    with pytest.raises(Unavailable, match="TensorRT"):
        build_from_onnx(fp8_dir, out, progress=False)
    assert not out.exists()


def test_build_from_onnx_refuses_weight_only_without_asking_the_gpu(tmp_path, monkeypatch, int8w_dir):
    from hita.export.tensorrt import build_from_onnx

    _gpu(monkeypatch, None)
    with pytest.raises(RecipeRefused, match="tensorrt cannot run int8-weight folders: MatMulNBits"):
        build_from_onnx(int8w_dir, tmp_path / "engines", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_fp8_engines_on_an_old_gpu_in_one_line(tmp_path, monkeypatch, fp8_dir):
    import hita.util.gpu as gpu
    from hita.cli.app import app

    # TensorRT and a GPU "present" as far as the CLI's up-front checks go; the GPU is an SM 8.6 one.
    monkeypatch.setattr(gpu, "import_tensorrt", lambda: None)
    monkeypatch.setattr(gpu, "gpu_facts", lambda device=0: GpuFacts("fake GPU", (8, 6)))
    _gpu(monkeypatch, (8, 6))
    out = tmp_path / "engines"
    res = runner.invoke(app, ["export", "--engine", "tensorrt", "--from-onnx", str(fp8_dir), "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "compute capability 8.6" in errors[0] and "SM 8.9+" in errors[0], res.output
    assert not out.exists()


def test_factory_refuses_int8_weight_on_an_old_onnxruntime_gpu(monkeypatch, int8w_dir, int8_dir):
    from hita.runtimes.factory import Runtime, make_executor

    assert make_executor(Runtime.onnxruntime, artifacts=int8w_dir).gpt_config is not None   # CPU, this ORT: runs
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.0")
    with pytest.raises(RecipeRefused, match="onnxruntime-cuda 1.21 cannot run int8-weight folders"):
        make_executor(Runtime.onnxruntime, artifacts=int8w_dir)
    # The same faked provider and version pass an int8 Q/DQ folder: only 8-bit MatMulNBits needs 1.22.
    from hita.runtimes.factory import check_quantized_on_onnxruntime

    check_quantized_on_onnxruntime(int8_dir)


@pytest.mark.parametrize("kind, why", [("int8", "GroupQueryAttention"), ("fp8", "float8")])
def test_hita_export_kv_cache_is_refused_in_one_line_naming_what_the_runtime_lacks(tmp_path, kind, why):
    from typer.testing import CliRunner

    from hita.cli.app import app

    res = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "out"), "--kv-cache", kind])
    assert res.exit_code == 2 and why in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()
