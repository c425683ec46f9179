"""The CPU AOTInductor decode step (hita.export.aoti, ``attention="prefix"`` + ``freezing``, the CPU
default): exactly the model, reads only the filled cache prefix, one head half, options recorded.

The compiled checks build the decode step alone on the tiny preset (no decoder or prefill: those
take most of a full export's minutes) and validate it with the export driver's own check
(``validate_graph``: every branch position, a chain of in-place steps across the position-128 rule,
and for per-row positions, rows at different positions in one call). Tolerance: the spec's fp32
1e-4 (hita.export.spec.TOLERANCES); measured ~3e-6 here, while a wrong prefix (one slot too many or
too few) or the wrong head half moves tiny logits by >= 1e-3.
"""
from __future__ import annotations

import pytest
import torch

from hita.export.aoti import (
    CPU_INDUCTOR_CONFIGS,
    AotiBackend,
    PrefixDecodeStepGraph,
    default_attention,
    effective_inductor_configs,
)
from hita.export.driver import decode_positions, validate_graph
from hita.export.graphs import build_graph
from hita.export.spec import DECODE_STEP, decode_spec
from hita.export.testing import tiny_models

ATOL = 1e-4
CPU = torch.device("cpu")
# Compiles the test packages faster; the generated kernels are the same.
FAST_COMPILE = {"aot_inductor.compile_wrapper_opt_level": "O0"}


@pytest.fixture(scope="module")
def models():
    return tiny_models(0)


def _compiled_step(models, tmp_path, row_positions: bool):
    """(backend, spec, runner, path) of the tiny decode step built with the CPU defaults."""
    gpt, tok = models
    backend = AotiBackend(FAST_COMPILE)
    spec = decode_spec(gpt.cfg, row_positions=row_positions)
    graph = backend.graph(DECODE_STEP, gpt, tok, "reference")
    aspec = backend.spec(spec)
    extras = backend.write(graph, aspec, tmp_path, CPU)
    path = tmp_path / aspec.file_name
    return backend, spec, backend.load(path, aspec, CPU), path, extras


def _eager(models):
    gpt, tok = models
    return build_graph(DECODE_STEP, gpt, tok, "reference")


def test_cpu_defaults_and_overrides():
    assert default_attention("cpu") == "prefix" and default_attention("cuda") == "plain"
    assert effective_inductor_configs("cpu", None) == CPU_INDUCTOR_CONFIGS == {"freezing": True}
    assert effective_inductor_configs("cpu", {"freezing": False, "x": 1}) == {"freezing": False, "x": 1}
    assert effective_inductor_configs("cuda", None) == {}
    with pytest.raises(ValueError, match="attention must be one of"):
        AotiBackend(attention="gqa")


def test_prefix_graph_run_eagerly_equals_the_model_and_ignores_later_slots(models):
    """The wrapper itself, run eagerly: the plain wrapper's logits and written slot at every branch
    position, for one position and for per-row positions; NaN beyond the furthest row's position
    changes nothing (the plain step would return NaN: its masked scores are NaN + -inf)."""
    gpt, _ = models
    graph = PrefixDecodeStepGraph(gpt).eval()
    eager = _eager(models)
    for rows in (False, True):
        spec = decode_spec(gpt.cfg, row_positions=rows)
        feed = spec.example_inputs(spec.sizes("check"), seed=3)
        b = feed["token"].shape[0]
        positions = decode_positions(gpt.cfg)
        for i, p in enumerate(positions):
            ps = [positions[(i + r) % len(positions)] for r in range(b)] if rows else [p]
            feed["position"] = torch.tensor(ps)
            with torch.no_grad():
                ref = eager(*eager.args(feed, spec))
                caches = tuple(feed[n].clone() for n in spec.input_names[2:])
                logits = graph(feed["token"], feed["position"], caches)
                dirty = tuple(feed[n].clone() for n in spec.input_names[2:])
                for c in dirty:  # beyond the furthest row: nearer rows' later slots are masked, not cut
                    c[:, :, max(ps) + 1:] = float("nan")
                dirty_logits = graph(feed["token"], feed["position"], dirty)
            assert float((logits - ref[0]).abs().max()) <= ATOL
            # The same slot written in place (later layers' k/v differ by the attention's rounding).
            assert max(float((c - r).abs().max()) for c, r in zip(caches, ref[1:])) <= ATOL
            assert torch.equal(dirty_logits, logits)


@pytest.mark.slow
def test_compiled_prefix_step_matches_eager_reads_only_the_prefix_and_records_options(models, tmp_path):
    gpt, _ = models
    backend, spec, runner, path, extras = _compiled_step(models, tmp_path, row_positions=False)
    assert extras["mutates"] == spec.input_names[2:]  # the in-place cache contract holds
    report, feed = validate_graph(runner, spec.file_name, _eager(models), spec, gpt.cfg, CPU)
    assert report["max_abs_diff"] <= ATOL
    assert backend.extra_checks(path, spec, feed, gpt.cfg) == {"prefix_only_verified": True}
    assert backend.options({}) == {"kv_cache": "inplace", "attention": "prefix",
                                   "inductor_configs": {**CPU_INDUCTOR_CONFIGS, **FAST_COMPILE}}


@pytest.mark.slow
def test_compiled_prefix_step_with_rows_at_different_positions(models, tmp_path):
    """In-flight batching: the prefix is the furthest row's, the nearer rows keep the model's mask,
    and a batch with rows on both sides of Nh takes both head halves."""
    gpt, _ = models
    backend, spec, runner, path, _ = _compiled_step(models, tmp_path, row_positions=True)
    report, feed = validate_graph(runner, spec.file_name, _eager(models), spec, gpt.cfg, CPU)
    assert report["max_abs_diff"] <= ATOL
    assert backend.extra_checks(path, spec, feed, gpt.cfg)["prefix_only_verified"] is True
