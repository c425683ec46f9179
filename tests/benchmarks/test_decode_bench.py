"""Smoke test of benchmarks/decode.py on the tiny preset: the table has the expected rows and
positive numbers, and broken runtimes become rows instead of crashes. No timing asserts."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hita_bench_decode", ROOT / "benchmarks" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _missing(ctx):
    raise ImportError("no such runtime here")


def _failing_decode(ctx):
    from hita.runtimes.torch_eager import TorchExecutor

    class Broken(TorchExecutor):
        name = "broken"

        def decode(self, tokens, pos):
            raise RuntimeError("decode exploded")

    return Broken(ctx.gpt, None)


@pytest.fixture(scope="module")
def result(bench):
    return bench.run_benchmark(
        preset="tiny", batches=(1, 2), runtimes=("torch", "missing", "broken"), steps=2, warmup=1,
        rounds=2, threads=1, bandwidth_mib=64, builders={"missing": _missing, "broken": _failing_decode},
    )


def test_rows_and_positive_numbers(bench, result):
    assert [(r.runtime, r.images, r.rows, r.cfg) for r in result.rows] == [
        ("torch", 1, 1, False), ("missing", 1, 1, False), ("broken", 1, 1, False),
        ("torch", 2, 4, True), ("missing", 2, 4, True), ("broken", 2, 4, True),
    ]
    for r in result.rows:
        if r.runtime != "torch":
            continue
        assert r.error is None
        for v in (r.step_ms, r.prefill_ms, r.decode_image_ms, r.floor_ms, r.x_floor, r.images_per_s):
            assert v is not None and math.isfinite(v) and v > 0
        assert r.speedup_vs_eager == pytest.approx(1.0)
        assert len(r.per_position_ms) == 2
    assert result.machine.bandwidth["read_gbs"] > 0 and result.machine.matmul["gflops"] > 0
    assert result.tokenizer_timed  # tiny pairs with the real tiny tokenizer


def test_unavailable_runtimes_say_why(bench, result):
    for r in result.rows:
        if r.runtime == "missing":
            assert "ImportError: no such runtime here" in r.error and r.step_ms is None
        if r.runtime == "broken":
            assert "decode exploded" in r.error and r.step_ms is None and r.images_per_s is None
    table = bench.table_rows(result)
    assert len(table) == 6 and all(len(row) == len(bench.HEADER) for row in table)
    assert table[1][2].startswith("unavailable:")
    text = bench.format_table(result)
    assert "| runtime | batch (rows) | ms/step |" in text and "2+CFG (4)" in text
    json.dumps(result.to_dict())  # the --json payload is serialisable


def test_positions_cover_both_heads(bench):
    from hita.config import GPTConfig

    cfg = GPTConfig.from_name("GPT-B")
    pos = bench.spread_positions(cfg, 24)
    assert pos[0] == 1 and pos[-1] == cfg.seq_len - 1 and len(pos) == 24
    assert any(p < cfg.n_holistic for p in pos) and any(p > cfg.n_holistic for p in pos)


def test_matmul_params_match_the_model(bench):
    from hita.config import GPTConfig
    from hita.models.gpt import HitaGPT

    cfg = GPTConfig.from_name("tiny")
    gpt = HitaGPT(cfg)
    linear = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_params(cfg) == linear
    cost = bench.step_cost(cfg, rows=2, pos=10)
    assert cost.kv_bytes == 2 * cfg.n_layer * 2 * cfg.dim * 11 * 4
    assert cost.flops > 2 * 2 * linear


def test_cli_writes_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main([
        "--preset", "tiny", "--batches", "1", "--runtimes", "torch", "--steps", "2", "--warmup", "0",
        "--threads", "1", "--bandwidth-mib", "64", "--quiet", "--json", str(out),
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["preset"] == "tiny" and data["rows"][0]["step_ms"] > 0
    assert bench.main(["--preset", "tiny", "--runtimes", "nope", "--quiet"]) == 2
