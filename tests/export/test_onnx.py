"""ONNX export of the tiny presets: files, signatures, self-validation, and what validation catches.

One export per pytest session (``tiny_onnx_artifacts`` reuses a verified folder), shared with
``tests/runtimes/test_onnxrt.py`` and ``tests/runtimes/test_polygraphy.py``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hita.export.errors import ParityError, SignatureError
from hita.export.graphs import build_graph
from hita.export.manifest import load_manifest
from hita.export.onnx import export_onnx, onnx_signature, validate_onnx
from hita.export.spec import DECODE_STEP, DECODER, GRAPH_NAMES, PREFILL, graph_specs
from hita.export.testing import tiny_models

ATOL = 1e-4  # fp32 tolerance (see hita.export.spec.TOLERANCES for why)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def specs(models):
    gpt, tok = models
    return graph_specs(tok.cfg, gpt.cfg)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_manifest_records_the_export(onnx_dir, specs):
    m = load_manifest(onnx_dir, expect_engine="onnx")
    assert set(m.files) == {"decoder.onnx", "prefill.onnx", "decode_step.onnx"}  # weights inline (< 2 GB)
    assert (m.gpt_preset, m.tokenizer_preset, m.pos128, m.precision) == ("tiny", "tiny", "reference", "float32")
    assert m.versions["opset"] == "18" and m.versions["onnxruntime"] == ort.__version__
    assert m.options["kv_inplace_verified"] is True
    for name in GRAPH_NAMES:
        assert m.signature(name) == specs[name].signature
        assert m.options["validation"][name]["max_abs_diff"] <= ATOL
    assert m.options["validation"][DECODE_STEP]["positions"] == [1, 15, 16, 17, 79]


def test_onnx_files_are_valid_and_declare_the_spec(onnx_dir, specs):
    for name in GRAPH_NAMES:
        path = onnx_dir / specs[name].file_name
        onnx.checker.check_model(str(path))
        assert {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}[""] == 18
        specs[name].signature.check(onnx_signature(path), path.name, specs[name].description, "-")
    # The batch axis survived tracing at batch 2 under its own name.
    assert onnx_signature(onnx_dir / "decode_step.onnx").inputs[2].shape == ("batch", 4, 88, 32)


def test_decoder_matches_eager_images(onnx_dir, models, specs):
    _, tok = models
    feed = specs[DECODER].example_inputs({"batch": 4}, seed=7)
    (image,) = _session(onnx_dir / "decoder.onnx").run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        ref = tok.decode(feed["holistic_ids"], feed["patch_ids"]).double()
    diff = (torch.from_numpy(image).double() - ref).abs()
    psnr = 10 * math.log10(4.0 / float((diff**2).mean()))
    assert float(diff.max()) <= ATOL
    assert psnr > 100.0, psnr


@pytest.mark.parametrize("name", [PREFILL, DECODE_STEP])
def test_gpt_graphs_run_at_batch_one(onnx_dir, models, specs, name):
    gpt, tok = models
    spec, graph = specs[name], build_graph(name, gpt, tok)
    feed = spec.example_inputs({"batch": 1}, seed=3)
    outs = _session(onnx_dir / spec.file_name).run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        ref = graph(*graph.args(feed, spec))
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)


def test_validation_catches_a_graph_that_differs_from_eager(onnx_dir, specs):
    other_gpt, tok = tiny_models(seed=1)  # same shapes, other weights
    spec = specs[PREFILL]
    match = r"prefill.onnx: output logits differs .* max \|diff\| .* > tolerance atol 0.0001"
    with pytest.raises(ParityError, match=match):
        validate_onnx(onnx_dir / spec.file_name, build_graph(PREFILL, other_gpt, tok), spec, other_gpt.cfg)


def test_signature_check_catches_a_renamed_input(onnx_dir, specs, tmp_path):
    model = onnx.load(str(onnx_dir / "decode_step.onnx"))
    model.graph.input[0].name = "input_ids"
    for node in model.graph.node:
        node.input[:] = ["input_ids" if i == "token" else i for i in node.input]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    spec = specs[DECODE_STEP]
    with pytest.raises(SignatureError, match=r"renamed.onnx: has inputs \[input_ids, position, .*expected \[token"):
        spec.signature.check(onnx_signature(tmp_path / "renamed.onnx"), "renamed.onnx", spec.description, "-")


@pytest.mark.parametrize(
    "kwargs, match", [(dict(opset=17), "opset must be in 18..23"), (dict(pos128="train"), "pos128 must be one of")]
)
def test_bad_arguments_fail_before_exporting(models, tmp_path, kwargs, match):
    gpt, tok = models
    with pytest.raises(ValueError, match=match):
        export_onnx(gpt, tok, tmp_path / "art", progress=False, **kwargs)
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_external_data_consistent_pos128_and_tensorscatter(tmp_path):
    """Large-model path (weights in ``.onnx.data`` files, hashed in the manifest), the other
    pos128 rule and the TensorRT cache write (``TensorScatter``, opset 24), exported for real and
    checked through the executor against eager (one export covers the three variants)."""
    from hita.runtimes.loop import teacher_forced
    from hita.runtimes.onnxrt import OrtExecutor
    from hita.runtimes.torch_eager import TorchExecutor

    gpt, tok = tiny_models()
    lines = []
    out = export_onnx(gpt, tok, tmp_path / "art", pos128="consistent", external_data=True, progress=lines.append,
                      kv_write="tensorscatter")
    assert len(lines) == 4 and "decode_step.onnx: exported" in lines[2]
    m = load_manifest(out)
    step = onnx.load(str(out / "decode_step.onnx"), load_external_data=False)
    ops = [n.op_type for n in step.graph.node]
    assert ops.count("TensorScatter") == 2 * gpt.cfg.n_layer and "ScatterElements" not in ops
    assert {o.domain: o.version for o in step.opset_import}[""] == 24
    assert m.graphs["decode_step"]["kv_write"] == "tensorscatter" and m.graphs["decode_step"]["opset"] == 24
    assert {"decoder.onnx.data", "prefill.onnx.data", "decode_step.onnx.data"} <= set(m.files)
    assert m.options["external_data"] is True and m.pos128 == "consistent"
    cfg = gpt.cfg
    g = torch.Generator().manual_seed(0)
    hol = torch.randint(0, cfg.vocab_size, (2, cfg.n_holistic), generator=g)
    patch = torch.randint(0, cfg.vocab_size, (2, cfg.n_patch), generator=g)
    ref = teacher_forced(TorchExecutor(gpt, tok, pos128="consistent"), [1, 2], hol, patch)
    got = teacher_forced(OrtExecutor(out, threads=1), [1, 2], hol, patch)
    assert float((ref - got).abs().max()) <= ATOL
