"""The ``--attention gqa`` decode step (hita.export.gqa): exactly the model, prefix-only, in place,
one head half, and refused where it cannot run.

Two tiny exports: a full folder (pos128 "reference", one position per row: ``row_positions``; shared
with tests/runtimes/test_onnx_gqa.py through its folder name) and a decode step alone (pos128
"consistent", one position for all rows). Tolerance: the spec's fp32 1e-4 (hita.export.spec.TOLERANCES:
~1e-6 reordering noise on the tiny preset, while a wrong position rule or head moves logits by >= 1e-2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from hita.cli.app import app
from hita.config import GPTConfig
from hita.export.driver import validate_graph
from hita.export.errors import ExportError
from hita.export.gqa import check_gqa_export, check_gqa_step, inplace_runner
from hita.export.graphs import build_graph
from hita.export.manifest import load_manifest
from hita.export.onnx import OnnxBackend, export_onnx
from hita.export.spec import DECODE_STEP, decode_spec
from hita.export.testing import tiny_models, tiny_onnx_artifacts
from hita.export.trt_support import check_onnx_for_tensorrt, refuse_contrib_attention, tensorrt_violations

ATOL = 1e-4


def gqa_rows_folder(base: Path) -> Path:
    """The shared tiny gqa export with per-row positions (reused while its manifest verifies)."""
    return tiny_onnx_artifacts(base / "hita-onnx-tiny-gqa-rows", attention="gqa", row_positions=True)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    return gqa_rows_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def consistent_step(models, tmp_path_factory):
    """decode_step.onnx alone, pos128 "consistent", position [1]: (path, spec)."""
    gpt, tok = models
    spec = decode_spec(gpt.cfg)
    folder = tmp_path_factory.mktemp("gqa-consistent")
    backend = OnnxBackend(attention="gqa")
    backend.write(backend.graph(DECODE_STEP, gpt, tok, "consistent"), spec, folder, torch.device("cpu"))
    return folder / spec.file_name, spec


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _eager(models, pos128, feed, spec):
    gpt, tok = models
    graph = build_graph(DECODE_STEP, gpt, tok, pos128)
    with torch.no_grad():
        return graph(*graph.args(feed, spec))


def _rows_spec(models):
    return decode_spec(models[0].cfg, row_positions=True)


# ----------------------------------------------------------------------------------------------
# What was written
# ----------------------------------------------------------------------------------------------


def test_manifest_records_the_variant_and_its_checks(gqa_dir):
    m = load_manifest(gqa_dir, expect_engine="onnx")
    assert (m.options["attention"], m.options["kv_write"], m.options["kv_inplace_verified"]) == ("gqa", "gqa", True)
    step = m.options["validation"][DECODE_STEP]
    assert step["max_abs_diff"] <= ATOL and step["prefix_only_verified"] is True
    assert m.graphs[DECODE_STEP]["attention"] == "gqa" and "attention" not in m.graphs["prefill"]


def test_the_cache_is_touched_only_by_group_query_attention(gqa_dir, models):
    model = onnx.load(str(gqa_dir / "decode_step.onnx"))
    g = model.graph
    gqa = [n for n in g.node if (n.domain, n.op_type) == ("com.microsoft", "GroupQueryAttention")]
    assert len(gqa) == models[0].cfg.n_layer
    past = {i.name for i in g.input if i.name.startswith("past_key_values.")}
    readers = [n for n in g.node if past & set(n.input)]
    assert readers == gqa  # no Transpose / Mul / scatter over the cache, no copy
    assert {o.name for o in g.output if o.name.startswith("present.")} == {o for n in gqa for o in n.output[1:]}
    for n in gqa:  # positions are applied before the op
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("do_rotary", 0) == 0 and attrs["num_heads"] == attrs["kv_num_heads"] == 4
        assert attrs["scale"] == pytest.approx(32 ** -0.5)


def test_only_the_needed_head_half_is_read(gqa_dir, models):
    """The 2V head is two [V, dim] constants used inside If branches; no [2V, dim] weight is left."""
    cfg = models[0].cfg
    g = onnx.load(str(gqa_dir / "decode_step.onnx")).graph
    shapes = [tuple(t.dims) for t in g.initializer]
    assert (2 * cfg.vocab_size, cfg.dim) not in shapes and (cfg.dim, 2 * cfg.vocab_size) not in shapes
    ifs = [n for n in g.node if n.op_type == "If"]
    assert len(ifs) == 1  # the top-level choice; per-row graphs nest the mixed-rows case inside
    top = {a.name: a.g for a in ifs[0].attribute}
    assert [n.op_type for n in top["then_branch"].node if n.op_type in ("MatMul", "Gemm")] != []


# ----------------------------------------------------------------------------------------------
# Exactly the model
# ----------------------------------------------------------------------------------------------


def test_driver_validation_of_the_consistent_step(models, consistent_step):
    """The driver's full check (positions around every branch, a chain across Nh) on the other pos128
    rule and the one-position shape, plus the in-place and prefix-only facts."""
    gpt, tok = models
    path, spec = consistent_step
    runner = inplace_runner(_session(path), spec)
    report, feed = validate_graph(runner, path.name, build_graph(DECODE_STEP, gpt, tok, "consistent"), spec,
                                  gpt.cfg, torch.device("cpu"))
    assert report["max_abs_diff"] <= ATOL
    nh = gpt.cfg.n_holistic
    assert check_gqa_step(_session(path), spec, feed, [nh - 1, nh, nh + 1]) == {
        "kv_inplace_verified": True, "prefix_only_verified": True}


@pytest.mark.parametrize("pos128", ["reference", "consistent"])
def test_position_nh_rule_is_baked_in(models, gqa_dir, consistent_step, pos128):
    """At position Nh each graph equals eager under its own rule and differs under the other one."""
    gpt = models[0]
    nh = gpt.cfg.n_holistic
    if pos128 == "reference":
        path, spec = gqa_dir / "decode_step.onnx", _rows_spec(models)
    else:
        path, spec = consistent_step
    feed = spec.example_inputs({"batch": 3}, seed=5)
    feed["position"] = torch.full(spec.inputs[1].concrete_shape({"batch": 3}), nh, dtype=torch.int64)
    got = inplace_runner(_session(path), spec)(feed)
    other = "consistent" if pos128 == "reference" else "reference"
    own, wrong = _eager(models, pos128, feed, spec), _eager(models, other, feed, spec)
    assert float((got[0] - own[0]).abs().max()) <= ATOL
    assert float((got[0] - wrong[0]).abs().max()) > 1e-2
    for g, r in zip(got[1:], own[1:]):
        assert float((g - r).abs().max()) <= ATOL


def test_rows_at_different_positions_match_eager(models, gqa_dir):
    """One row per branch in one call: slot rows + holistic head, the Nh quirk (q = k = 0, patch
    head), RoPE rows, the last position; and a batch wholly on each side of Nh."""
    spec = _rows_spec(models)
    nh, last = models[0].cfg.n_holistic, models[0].cfg.seq_len - 1
    run = inplace_runner(_session(gqa_dir / "decode_step.onnx"), spec)
    for rows in ([1, nh - 1, nh, nh + 1, last], [2, 5, nh - 1], [nh, nh + 3, last]):
        feed = spec.example_inputs({"batch": len(rows)}, seed=len(rows))
        feed["position"] = torch.tensor(rows)
        got, ref = run(feed), _eager(models, "reference", feed, spec)
        for g, r in zip(got, ref):
            assert float((g - r).abs().max()) <= ATOL, rows


def test_head_half_logits_equal_the_plain_graph(models, gqa_dir, onnx_dir):
    """Same feed through the plain export (full 2V head) and the gqa one (one half per step)."""
    spec_rows, spec_one = _rows_spec(models), decode_spec(models[0].cfg)
    nh = models[0].cfg.n_holistic
    plain = _session(onnx_dir / "decode_step.onnx")
    gqa = inplace_runner(_session(gqa_dir / "decode_step.onnx"), spec_rows)
    for p in (3, nh - 1, nh, 50):
        feed = spec_one.example_inputs({"batch": 2}, seed=p)
        feed["position"] = torch.tensor([p])
        want = plain.run(["logits"], {k: v.numpy() for k, v in feed.items()})[0]
        got = gqa(dict(feed, position=torch.tensor([p, p])))[0].numpy()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------
# Prefix only, in place
# ----------------------------------------------------------------------------------------------


def test_garbage_beyond_each_rows_prefix_is_ignored(models, gqa_dir):
    spec = _rows_spec(models)
    nh = models[0].cfg.n_holistic
    rows = [4, nh, 40]
    feed = spec.example_inputs({"batch": 3}, seed=9)
    feed["position"] = torch.tensor(rows)
    dirty = dict(feed)
    for name in spec.input_names[2:]:
        t = feed[name].clone()
        for r, p in enumerate(rows):
            t[r, :, p + 1:] = float("nan") if name.endswith("key") else 1e30
        dirty[name] = t
    run = inplace_runner(_session(gqa_dir / "decode_step.onnx"), spec)
    clean_out, dirty_out = run(feed), run(dirty)
    assert torch.equal(clean_out[0], dirty_out[0])  # bit for bit: those slots are never read
    for r, p in enumerate(rows):  # ... nor written
        for out, fed in zip(dirty_out[1:], (dirty[n] for n in spec.input_names[2:])):
            assert torch.equal(out[r, :, p + 1:].nan_to_num(7.0), fed[r, :, p + 1:].nan_to_num(7.0))


def test_bound_buffer_is_updated_in_place(models, gqa_dir):
    """One OrtValue bound as past and present: same memory afterwards, slot pos holds eager's new
    k/v, every other slot is bit-identical to what was there."""
    spec = _rows_spec(models)
    sess = _session(gqa_dir / "decode_step.onnx")
    feed = spec.example_inputs({"batch": 2}, seed=4)
    rows = [7, 30]
    feed["position"] = torch.tensor(rows)
    ref = _eager(models, "reference", feed, spec)
    binding = sess.io_binding()
    caches = [ort.OrtValue.ortvalue_from_numpy(feed[n].numpy().copy()) for n in spec.input_names[2:]]
    ptrs = [c.data_ptr() for c in caches]
    binding.bind_cpu_input("token", feed["token"].numpy())
    binding.bind_cpu_input("position", feed["position"].numpy())
    binding.bind_output("logits")
    for i, o, c in zip(spec.input_names[2:], spec.output_names[1:], caches):
        binding.bind_ortvalue_input(i, c)
        binding.bind_ortvalue_output(o, c)
    sess.run_with_iobinding(binding)
    assert [c.data_ptr() for c in caches] == ptrs
    for c, name, want in zip(caches, spec.input_names[2:], ref[1:]):
        now, before = torch.from_numpy(c.numpy()), feed[name]
        for r, p in enumerate(rows):
            assert float((now[r, :, p] - want[r, :, p]).abs().max()) <= ATOL
            assert torch.equal(now[r, :, :p], before[r, :, :p]) and torch.equal(now[r, :, p + 1:], before[r, :, p + 1:])


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


def test_bad_combinations_fail_before_any_work(models, tmp_path):
    gpt, tok = models
    with pytest.raises(ValueError, match="attention must be one of"):
        OnnxBackend(attention="flash")
    with pytest.raises(ValueError, match="drop --kv-write tensorscatter"):
        OnnxBackend(attention="gqa", kv_write="tensorscatter")
    with pytest.raises(ValueError, match="float32 only"):
        export_onnx(gpt, tok, tmp_path / "art", dtype=torch.bfloat16, attention="gqa", progress=False)
    assert not (tmp_path / "art").exists()
    odd = GPTConfig("odd", dim=96, n_layer=1, n_head=8, vocab_size=64, num_classes=2, n_holistic=4, grid=2)
    with pytest.raises(ValueError, match="head_dim % 8 == 0.*head_dim 12"):
        check_gqa_export(odd, "float32")


def test_tensorrt_refuses_a_gqa_folder_in_one_line(gqa_dir, onnx_dir):
    found = tensorrt_violations(onnx.load(str(gqa_dir / "decode_step.onnx"), load_external_data=False))
    assert found and all("--attention plain" in v.rule for v in found if v.op == "GroupQueryAttention")
    with pytest.raises(ExportError, match=r"GroupQueryAttention \(an `--attention gqa` export\)") as e:
        check_onnx_for_tensorrt(gqa_dir / "decode_step.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="--attention plain"):
        refuse_contrib_attention(gqa_dir)
    refuse_contrib_attention(onnx_dir)  # the plain folder passes


runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["--engine", "aoti", "--attention", "gqa"], "--attention gqa is an ONNX Runtime contrib op that aoti cannot run"),
    (["--engine", "aoti", "--attention", "plain"], "--attention applies to ONNX exports"),
    (["--attention", "gqa", "--precision", "bf16"], "fp32 only"),
    (["--attention", "gqa", "--kv-write", "tensorscatter"], "drop --kv-write tensorscatter"),
    (["--attention", "gqa", "--precision", "int8"], "weight-only int8-weight / int4-weight work with it"),
    (["--engine", "triton", "--attention", "gqa"], "--attention does not apply to --engine triton"),
    (["--attention", "flash"], "flash"),
])
def test_cli_refuses_bad_combinations(tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_refuses_tensorrt_from_a_gqa_folder_before_needing_tensorrt(gqa_dir, tmp_path):
    res = runner.invoke(app, ["export", "--engine", "tensorrt", "--from-onnx", str(gqa_dir), "--out",
                              str(tmp_path / "engines")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--attention plain" in lines[0], res.output


def test_weight_only_recipes_quantize_the_gqa_step_and_keep_it_in_place(gqa_dir, tmp_path):
    """int8-weight on a gqa folder: the layer MatMuls become MatMulNBits, the step keeps its
    in-place prefix-only attention, and the executor runs it with the recipe's accuracy (KL bound of
    the int8-weight recipe on the folder's own check feeds)."""
    import onnx

    from hita.calibration.export import export_quantized
    from hita.calibration.recipes import recipe
    from hita.export.manifest import load_manifest
    from hita.runtimes.loop import generate_tokens
    from hita.runtimes.onnxrt import OrtExecutor
    from hita.runtimes.sampling import SamplingOptions

    out = export_quantized(tmp_path / "i8w", "int8-weight", from_onnx=gqa_dir, progress=False)
    m = load_manifest(out, expect_engine="onnx")
    assert m.options["attention"] == "gqa" and m.options["kv_inplace_verified"] is True
    ops = {n.op_type for n in onnx.load(str(out / m.graph_file(DECODE_STEP)), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "If"} <= ops
    checks = m.options["quantization"]["checks"][DECODE_STEP]
    assert checks["mean_kl"] <= recipe("int8-weight").thresholds.max_mean_kl
    ex, ref = OrtExecutor(out), OrtExecutor(gqa_dir)
    opts = SamplingOptions(cfg_scale=2.0, temperature=0.0)
    assert ex.attention == "gqa"
    same = generate_tokens(ex, [1, 4], opts).tokens.eq(generate_tokens(ref, [1, 4], opts).tokens).float().mean()
    assert same > 0.3  # greedy paths agree for a while, then may fork on near ties (KL above is the bound)
