"""benchmarks/decode.py on the tiny preset (eager, ONNX Runtime fp32 and static int8 over a
calibration set the benchmark samples itself, a C++ host that fails to build).

Checked: the rows per batch (two GPT rows per image with CFG, one without), positive and consistent
times, the roofline floor below every measured step, images/s from its parts, agreement with eager
(exact for fp32, top-1 / KL figures for int8), the JSON file and its schema, exports and the
calibration set reused from the workdir, and a runtime that cannot be built reported as a row with a
one-line reason. No speed is asserted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import decode
import pytest
import torch
from benchlib.floor import matmul_params, step_cost
from benchlib.report import HEADER, table_rows
from benchlib.results import SCHEMA, BenchResult, Row
from benchlib.workload import spread_positions

from hita.config import GPTConfig

BATCHES = (1, 2)
RUNTIMES = ("torch", "onnxruntime", "cpp", "onnxruntime-int8")
MEASURED = ("torch", "onnxruntime", "onnxruntime-int8")
CMAKE_ERROR = "cmake configure failed (exit 1): cmake -S runtimes/cpp ...\nCMake Error: Cannot find source file"


class CppBuildError(RuntimeError):
    pass


def _failing_build(*args, **kwargs):
    raise CppBuildError(CMAKE_ERROR)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def result(workdir):
    # The C++ host is built by hita.jobs.build_cpp; stand in a module whose build fails the way CMake does.
    fake = types.ModuleType("hita.jobs.build_cpp")
    fake.build_host, fake.run_host = _failing_build, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "hita.jobs.build_cpp", fake)
        return decode.run_benchmark(preset="tiny", batches=BATCHES, runtimes=RUNTIMES, steps=3, warmup=1,
                                    rounds=2, repeats=2, threads=1, workdir=workdir)


def _rows(result, runtime):
    return [r for r in result.rows if r.runtime == runtime]


def test_two_rows_per_image_with_cfg(result):
    assert [(r.runtime, r.images, r.rows, r.cfg) for r in result.rows] == [
        (rt, n, 2 * n, True) for n in BATCHES for rt in RUNTIMES
    ]
    assert result.tokenizer == "tiny" and result.sampling["cfg_scale"] > 1


def test_measured_rows_are_consistent(result):
    cfg = GPTConfig.from_name("tiny")
    assert result.positions == spread_positions(cfg, 3)
    for name in MEASURED:
        for r in _rows(result, name):
            assert r.error is None, r.error
            for v in (r.step_ms, r.forward_ms, r.prefill_ms, r.decode_image_ms, r.floor_ms, r.images_per_s):
                assert v is not None and math.isfinite(v) and v > 0
            assert r.forward_ms <= r.step_ms  # the forward is timed inside the loop step
            assert r.step_ms_min <= r.step_ms <= r.step_ms_p90
            assert r.spread is not None and r.spread >= 0
            assert sorted(r.per_position_ms) == result.positions
            whole_ms = (cfg.seq_len - 1) * r.step_ms + r.prefill_ms + r.decode_image_ms
            assert r.images_per_s == pytest.approx(r.images / whole_ms * 1e3)


def test_floor_is_below_every_measured_step(result):
    cfg, m = GPTConfig.from_name("tiny"), result.machine
    assert m.bandwidth["read_gbs"] > 0 and m.matmul["gflops"] > 0
    for name in MEASURED:
        for r in _rows(result, name):
            for pos, ms in r.per_position_ms.items():
                assert 1e3 * step_cost(cfg, r.rows, pos).floor_s(m.bandwidth["read_gbs"], m.matmul["gflops"]) <= ms
            assert r.floor_ms <= r.step_ms and r.x_floor == pytest.approx(r.step_ms / r.floor_ms)


def test_ratios_and_agreement_with_eager(result):
    for eager, ort in zip(_rows(result, "torch"), _rows(result, "onnxruntime")):
        assert eager.x_eager == pytest.approx(1.0)
        assert ort.x_eager == pytest.approx(eager.step_ms / ort.step_ms)
        assert ort.max_abs_diff_vs_eager < 1e-3  # same calls, so the same logits
        assert ort.top1_vs_eager == 1.0 and 0 <= ort.kl_vs_eager < 1e-8


def test_quantized_rows_carry_their_accuracy(result, workdir):
    from hita.export.manifest import load_manifest, manifest_sha256

    q = load_manifest(workdir / "onnx-plain-int8-tiny-seed0").options["quantization"]
    assert q["recipe"] == "int8" and q["calibration_set"]["images"] == 4
    assert q["source_manifest_sha256"] == manifest_sha256(workdir / "onnx-tiny-seed0")
    for r in _rows(result, "onnxruntime-int8"):
        # The int8 recipe's own parity thresholds (hita.calibration.recipes: KL <= 3e-2, top-1 >= 88 % over
        # every step of the embedded model) are for whole sequences; at 3 timed positions of random
        # weights the figures only have to be real: some logits moved, the distributions stay close.
        assert 0.3 <= r.top1_vs_eager <= 1.0 and 0 < r.kl_vs_eager < 0.5
        assert r.max_abs_diff_vs_eager > 1e-4  # a quantized graph, not the fp32 one under another name


def test_failed_build_is_a_row_with_one_line(result):
    table = table_rows(result)
    for r, cells in zip(result.rows, table):
        assert len(cells) == len(HEADER)
        if r.runtime != "cpp":
            continue
        assert r.error == f"C++ host build failed: CppBuildError: {CMAKE_ERROR.splitlines()[0]}"
        assert (r.step_ms, r.floor_ms, r.images_per_s) == (None, None, None)
        assert cells[2] == f"unavailable: {r.error}"
    assert "| runtime | batch (rows) | ms/step |" in decode.format_table(result)


def test_cli_without_cfg_writes_json_and_reuses_the_export(result, workdir, tmp_path, capsys):
    manifest = workdir / "onnx-tiny-seed0" / "manifest.sha256"
    before = manifest.read_text()
    quantized = workdir / "onnx-plain-int8-tiny-seed0" / "manifest.sha256"
    before_q = quantized.read_text()
    out = tmp_path / "bench.json"
    assert decode.main([
        "--preset", "tiny", "--batches", "2", "--no-cfg", "--runtimes", "torch,onnxruntime,onnxruntime-int8",
        "--steps", "2",
        "--warmup", "0", "--rounds", "1", "--repeats", "1", "--threads", "1", "--workdir", str(workdir),
        "--json", str(out), "--quiet",
    ]) == 0
    assert manifest.read_text() == before  # the export was reused, not redone
    assert quantized.read_text() == before_q  # so were the calibration set and the int8 folder
    assert "| torch | 2 (2) |" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    assert set(data) == {f.name for f in dataclasses.fields(BenchResult)}
    assert [(r["runtime"], r["images"], r["rows"], r["cfg"]) for r in data["rows"]] == [
        ("torch", 2, 2, False), ("onnxruntime", 2, 2, False), ("onnxruntime-int8", 2, 2, False)]
    for row in data["rows"]:
        assert set(row) == {f.name for f in dataclasses.fields(Row)}
        assert row["error"] is None and row["step_ms"] > 0 and row["floor_ms"] <= row["step_ms"]
    assert data["sampling"]["cfg_scale"] > 1  # the loop's options; batches without CFG run at scale 1
    assert data["machine"]["bandwidth"]["read_gbs"] > 0 and data["machine"]["threads"] == 1


@pytest.mark.parametrize("args", [["--runtimes", "nope"], ["--batches", "0"], ["--batches", "x"], ["--steps", "0"]])
def test_bad_arguments_exit_2_before_any_work(args, capsys):
    assert decode.main(["--preset", "tiny", "--quiet", *args]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_positions_cover_both_heads():
    cfg = GPTConfig.from_name("GPT-B")
    pos = spread_positions(cfg, 24)
    assert pos[0] == 1 and pos[-1] == cfg.seq_len - 1 and len(pos) == 24
    assert any(p < cfg.n_holistic for p in pos) and any(p > cfg.n_holistic for p in pos)


def test_floor_counts_the_model_weights():
    from hita.models.gpt import HitaGPT

    cfg = GPTConfig.from_name("tiny")
    linear = sum(m.weight.numel() for m in HitaGPT(cfg).modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear
    cost = step_cost(cfg, rows=2, pos=10)
    assert cost.kv_bytes == 2 * cfg.n_layer * 2 * cfg.dim * 11 * 4
    assert cost.flops > 2 * 2 * linear
