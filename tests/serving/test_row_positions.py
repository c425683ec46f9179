"""Per-row decode positions (position [B]): the model, the eager executor, the ONNX graph.

In-flight batching runs rows of requests that started at different steps in one decode step. Each
row must get what it gets in its own sequence, and one shared position ([1]) must keep its old
numerics exactly.
"""
from __future__ import annotations

import pytest
import torch

from hita.export.testing import tiny_models
from hita.runtimes.torch_eager import TorchExecutor


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


def _steps(gpt, tokens, pos_of_step, rows):
    """Prefill class ids [1, 4, null] then decode with the given position tensor per step."""
    k, v = gpt.new_caches(rows)
    ids = torch.tensor([1, 4, gpt.cfg.null_class])[:rows]
    out, k, v = gpt.prefill(ids, k, v, inplace=True)
    outs = [out]
    for p in range(1, gpt.cfg.seq_len):
        out, k, v = gpt.decode(tokens[:, p - 1], pos_of_step(p), k, v, inplace=True)
        outs.append(out)
    return torch.stack(outs, 1), k, v


@torch.no_grad()
def test_every_row_at_one_position_as_a_b_tensor_equals_position_1_bit_for_bit(models):
    gpt, _ = models
    tokens = torch.randint(0, gpt.cfg.vocab_size, (3, gpt.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    one, k1, v1 = _steps(gpt, tokens, lambda p: torch.tensor([p]), 3)
    per_row, k3, v3 = _steps(gpt, tokens, lambda p: torch.full((3,), p), 3)
    assert torch.equal(one, per_row)
    assert all(torch.equal(a, b) for a, b in zip(k1 + v1, k3 + v3))


@torch.no_grad()
def test_rows_at_different_positions_match_their_own_sequences(models):
    """Row b runs at position p - b (it started b steps later); each equals its sequence alone,
    including across the position-128 rule (slot table, zero RoPE row, patch head)."""
    gpt, _ = models
    cfg = gpt.cfg
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    alone = [_steps(gpt, tokens[b:b + 1].roll(0), lambda p: torch.tensor([p]), 1)[0] for b in range(3)]
    # Same three sequences, row b started b steps after row 0: caches built by per-row steps.
    k, v = gpt.new_caches(3)
    logits = {b: [] for b in range(3)}
    out, k, v = gpt.prefill(torch.tensor([1, 1, 1]), k, v, inplace=True)
    for b in range(3):
        logits[b].append(out[b])
    for step in range(1, cfg.seq_len + 2):
        pos = torch.tensor([min(max(step - b, 1), cfg.seq_len - 1) for b in range(3)])
        fed = torch.stack([tokens[b, pos[b] - 1] for b in range(3)])
        out, k, v = gpt.decode(fed, pos, k, v, inplace=True)
        for b in range(3):
            if 1 <= step - b <= cfg.seq_len - 1:
                logits[b].append(out[b])
    # Rows 1 and 2 re-ran position 1 while waiting (a no-op rewrite of the same slot), as a server's
    # idle rows never do; what matters is each row's logits at its own positions.
    for b in range(3):
        got = torch.stack(logits[b])
        assert got.shape == alone[b][0].shape
        torch.testing.assert_close(got, alone[b][0], atol=1e-5, rtol=1e-5)


def test_the_eager_executor_adds_and_drops_rows_of_a_running_batch(models):
    gpt, tok = models
    ex = TorchExecutor(gpt, tok)
    L = gpt.cfg.seq_len
    tokens = torch.randint(0, gpt.cfg.vocab_size, (3, L), generator=torch.Generator().manual_seed(2))
    classes = [2, 7, gpt.cfg.null_class]
    alone = []
    for b in range(3):
        ex.start(1)
        out = [ex.prefill(torch.tensor([classes[b]])).clone()]
        out += [ex.decode(tokens[b, p - 1:p], p).clone() for p in range(1, L)]
        alone.append(torch.cat(out))
    got, pos, rows = {b: [] for b in range(3)}, {}, []
    ex.keep_rows(torch.zeros(0, dtype=torch.int64))
    joins = {0: 0, 1: 3, 2: 40}                                # sequence b joins at step joins[b]
    step = 0
    while any(len(got[b]) < L for b in range(3)):
        done = [b for b in rows if pos[b] == L]
        if done:
            ex.keep_rows(torch.tensor([i for i, b in enumerate(rows) if b not in done], dtype=torch.int64))
            rows = [b for b in rows if b not in done]
        if rows:
            out = ex.decode(torch.stack([tokens[b, pos[b] - 1] for b in rows]), torch.tensor([pos[b] for b in rows]))
            for i, b in enumerate(rows):
                got[b].append(out[i].clone())
                pos[b] += 1
        for b, at in joins.items():
            if at == step:
                got[b].append(ex.add_rows(torch.tensor([classes[b]]))[0].clone())
                rows.append(b)
                pos[b] = 1
        step += 1
    for b in range(3):
        torch.testing.assert_close(torch.stack(got[b]), alone[b], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="strictly increasing"):
        ex.keep_rows(torch.tensor([0, 0]))


def test_decode_refuses_positions_out_of_range_or_of_the_wrong_shape(models):
    gpt, tok = models
    ex = TorchExecutor(gpt, tok)
    ex.start(2)
    ex.prefill(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"positions \[0, 5\] out of range"):
        ex.decode(torch.tensor([1, 2]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"per-row positions must be int64 \[2\]"):
        ex.decode(torch.tensor([1, 2]), torch.tensor([5]))


def test_the_driver_validates_rows_at_different_positions_and_the_check_can_fail(rows_onnx):
    """The export driver's check of a per-row graph (the serving export) runs rows at different
    positions in one call; against eager with the other position-128 rule, the same check fails."""
    from hita.checkpoint import load_gpt
    from hita.export.driver import validate_graph
    from hita.export.errors import ParityError
    from hita.export.graphs import build_graph
    from hita.export.onnx import OnnxBackend
    from hita.export.spec import DECODE_STEP, decode_spec

    from hita.export.manifest import load_manifest

    path, gpt_file, _ = rows_onnx
    gpt = load_gpt(gpt_file).eval()
    spec = decode_spec(gpt.cfg, row_positions=True)
    cpu = torch.device("cpu")
    backend = OnnxBackend(attention=load_manifest(path).options["attention"])   # the server's: gqa on the CPU
    runner = backend.load(path / backend.spec(spec).file_name, backend.spec(spec), cpu)
    report, _ = validate_graph(runner, spec.file_name, build_graph(DECODE_STEP, gpt, None, "reference"), spec,
                               gpt.cfg, cpu)
    assert report["max_abs_diff"] < 1e-4
    with pytest.raises(ParityError, match="differs from eager"):
        validate_graph(runner, spec.file_name, build_graph(DECODE_STEP, gpt, None, "consistent"), spec, gpt.cfg, cpu)


def test_onnx_runtime_in_flight_rows_equal_each_sequence_alone(rows_onnx):
    from hita.runtimes.onnxrt import OrtExecutor

    ex = OrtExecutor(rows_onnx[0])
    assert ex.row_positions
    L = ex.gpt_config.seq_len
    tokens = torch.randint(0, ex.gpt_config.vocab_size, (2, L), generator=torch.Generator().manual_seed(4))
    alone = []
    for b, c in enumerate((3, 8)):
        ex.start(1)
        out = [ex.prefill(torch.tensor([c])).clone()]
        out += [ex.decode(tokens[b, p - 1:p], p).clone() for p in range(1, L)]
        alone.append(torch.cat(out))
    ex.keep_rows(torch.zeros(0, dtype=torch.int64))
    first = [ex.add_rows(torch.tensor([3]))[0].clone()]
    for p in range(1, 11):
        first.append(ex.decode(tokens[0, p - 1:p], torch.tensor([p]))[0].clone())
    second = [ex.add_rows(torch.tensor([8]))[0].clone()]             # joins row 0 at its step 11
    for p in range(11, L):
        out = ex.decode(torch.stack([tokens[0, p - 1], tokens[1, p - 11]]), torch.tensor([p, p - 10]))
        first.append(out[0].clone())
        second.append(out[1].clone())
    ex.keep_rows(torch.tensor([1]))                                  # row 0 finished and leaves
    for p in range(L - 10, L):
        second.append(ex.decode(tokens[1, p - 1:p], torch.tensor([p]))[0].clone())
    torch.testing.assert_close(torch.stack(first), alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(second), alone[1], atol=1e-5, rtol=1e-5)
