"""ONNX Runtime over the ``--attention gqa`` export vs eager PyTorch through the shared loop.

Fed and bound like the plain folder (the graph derives seqlens_k / total_sequence_length from
``position``): teacher-forced logits within the fp32 tolerance 1e-4 (hita.export.spec.TOLERANCES) at
every step, tokens identical under the shared noise with CFG (seeded sampling and greedy), in-place
and ping-pong bindings bit-identical, per-row positions through add_rows / keep_rows.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hita.export.testing import tiny_models, tiny_onnx_artifacts
from hita.runtimes.loop import generate_tokens, teacher_forced
from hita.runtimes.onnxrt import OrtExecutor
from hita.runtimes.sampling import SamplingOptions
from hita.runtimes.torch_eager import TorchExecutor

ATOL = 1e-4
CLASS_IDS = [0, 3, 9]


def gqa_rows_folder(base: Path) -> Path:
    """The tiny gqa export with per-row positions, shared with tests/export/test_gqa.py (same folder)."""
    return tiny_onnx_artifacts(base / "hita-onnx-tiny-gqa-rows", attention="gqa", row_positions=True)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    return gqa_rows_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def eager():
    gpt, tok = tiny_models()
    return TorchExecutor(gpt, tok)


@pytest.fixture(scope="module")
def ort_ex(gqa_dir):
    return OrtExecutor(gqa_dir, threads=1)


@pytest.fixture(scope="module")
def tokens(eager):
    cfg = eager.gpt_config
    g = torch.Generator().manual_seed(0)
    hol = torch.randint(0, cfg.vocab_size, (len(CLASS_IDS), cfg.n_holistic), generator=g)
    patch = torch.randint(0, cfg.vocab_size, (len(CLASS_IDS), cfg.n_patch), generator=g)
    return hol, patch


def test_executor_binds_the_cache_in_place_on_the_cpu(ort_ex):
    assert (ort_ex.attention, ort_ex.kv_binding, ort_ex.row_positions) == ("gqa", "inplace", True)
    assert ort_ex.providers == ["CPUExecutionProvider"]


def test_teacher_forced_logits_match_eager_at_every_step(eager, ort_ex, tokens):
    ref = teacher_forced(eager, CLASS_IDS, *tokens)
    got = teacher_forced(ort_ex, CLASS_IDS, *tokens)
    assert float((ref - got).abs().max()) <= ATOL


@pytest.mark.parametrize("opts", [
    SamplingOptions(cfg_scale=2.0, temperature=0.0),
    SamplingOptions(cfg_scale=1.5, seed=12, top_k=50, top_p=0.9),
    SamplingOptions(cfg_scale=3.0, cfg_interval=20, seed=13, temperature=0.8),
], ids=["greedy-cfg", "sample-cfg-topk-topp", "sample-cfg-interval"])
def test_generated_tokens_identical_to_eager(eager, ort_ex, opts):
    assert torch.equal(generate_tokens(eager, CLASS_IDS, opts).tokens, generate_tokens(ort_ex, CLASS_IDS, opts).tokens)


def test_inplace_and_pingpong_agree_bit_for_bit(gqa_dir, tokens):
    """Ping-pong hands the op separate past/present buffers: it copies the prefix and leaves later
    slots zero, which no later step reads; the logits must not notice."""
    inplace = OrtExecutor(gqa_dir, threads=1, kv_binding="inplace")
    pingpong = OrtExecutor(gqa_dir, threads=1, kv_binding="pingpong")
    assert torch.equal(teacher_forced(inplace, CLASS_IDS, *tokens), teacher_forced(pingpong, CLASS_IDS, *tokens))


def _row_reference(class_id: int, fed: torch.Tensor, last: int) -> dict[int, torch.Tensor]:
    """Eager logits [V] of one row decoded alone, at every position 1..last."""
    ex = TorchExecutor(*tiny_models())
    ex.start(1)
    ex.prefill(torch.tensor([class_id]))
    return {p: ex.decode(fed[p - 1 : p], p)[0].clone() for p in range(1, last + 1)}


def test_rows_joining_and_leaving_mid_sequence(eager, ort_ex):
    """In-flight batching: a row that joins later decodes at its own position (seqlens_k per row)
    and gets the logits eager gives it alone, while the other row is past Nh (mixed head halves)."""
    cfg = eager.gpt_config
    nh = cfg.n_holistic
    g = torch.Generator().manual_seed(3)
    fed = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)  # tokens fed per row
    refs = [_row_reference(2, fed[0], nh + 5), _row_reference(5, fed[1], 4)]
    ort_ex.start(1)
    ort_ex.prefill(torch.tensor([2]))
    for p in range(1, nh + 2):  # row 0 runs ahead to just past Nh
        ort_ex.decode(fed[0, p - 1 : p], p)
    ort_ex.add_rows(torch.tensor([5]))  # row 1 joins at position 0
    pos = torch.tensor([nh + 2, 1])
    for _ in range(3):
        got = ort_ex.decode(torch.stack([fed[0, pos[0] - 1], fed[1, pos[1] - 1]]), pos.clone())
        for r in range(2):
            assert float((got[r] - refs[r][int(pos[r])]).abs().max()) <= ATOL
        pos += 1
    ort_ex.keep_rows(torch.tensor([1]))  # row 0 leaves
    got = ort_ex.decode(fed[1, pos[1] - 1 : pos[1]], pos[1:].clone())
    assert float((got[0] - refs[1][int(pos[1])]).abs().max()) <= ATOL
