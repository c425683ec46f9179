"""Calibration sets: what the loop fed the graphs, recorded exactly, saved whole or not at all."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hita.calibration.collect import collect
from hita.calibration.dataset import CalibrationError, check_writable, load_set
from hita.calibration.options import MiB, CollectOptions
from hita.export.spec import DECODE_STEP, graph_specs
from hita.export.testing import tiny_models
from hita.runtimes.torch_eager import TorchExecutor
from hita.util.files import file_sha256


def test_set_records_every_position_cfg_rows_and_sources(tiny_set, tiny_ckpts):
    s = load_set(tiny_set)
    cfg = s.gpt_cfg
    assert (s.runs, s.rows, s.images, s.positions) == (2, 2, 2, cfg.seq_len - 1)
    # CFG rows: each run's prefill saw the class row and the null-class row; both rows were fed the
    # same sampled token at every position.
    assert s.tensors["prefill.class_ids"].tolist() == [[0, cfg.null_class], [7, cfg.null_class]]
    fed = s.tensors["decode.tokens"]
    assert torch.equal(fed[:, 0], fed[:, 1]) and int(fed.min()) >= 0
    assert torch.equal(fed[:, 0, :], torch.cat([s.tensors["decoder.holistic_ids"],
                                                s.tensors["decoder.patch_ids"]], 1)[:, :-1])
    assert s.manifest["checkpoints"] == {k: file_sha256(p) for k, p in tiny_ckpts.items()}
    assert s.manifest["options"]["seed"] == 3  # conftest.SMALL and s.manifest["pos128"] == "reference"


def test_decode_feed_is_the_cache_the_step_saw(tiny_set):
    """The final cache with later slots zeroed must equal, bit for bit, the eager cache at that
    position (replayed from the recorded tokens): the premise of storing one cache per run."""
    s = load_set(tiny_set)
    gpt, tok = tiny_models(0)
    ex = TorchExecutor(gpt, tok)
    names = graph_specs(s.tokenizer_cfg, s.gpt_cfg)[DECODE_STEP].input_names
    run, checks = 1, {1, s.gpt_cfg.n_holistic, s.gpt_cfg.n_holistic + 1, 50}
    ex.start(s.rows)
    ex.prefill(s.tensors["prefill.class_ids"][run])
    for p in range(1, max(checks) + 1):
        if p in checks:
            feed = s.decode_feed(run, p, names)
            live = ex.kv_cache()
            assert feed["position"].tolist() == [p]
            assert all(np.array_equal(feed[n], t.numpy()) for n, t in zip(names[2:], live)), p
        ex.decode(s.tensors["decode.tokens"][run, :, p - 1], p)


def test_eager_cache_accessor_matches_onnx_runtime_and_is_live(onnx_dir):
    """``TorchExecutor.kv_cache()`` gives the cache in ``OrtExecutor.kv_cache()``'s order and layout
    (``onnx_dir`` is the export of the same ``tiny_models(0)``), and it is the live cache."""
    from hita.runtimes.onnxrt import OrtExecutor

    gpt, tok = tiny_models(0)
    ex, ort = TorchExecutor(gpt, tok), OrtExecutor(onnx_dir, threads=1)
    with pytest.raises(RuntimeError, match="call start"):
        ex.kv_cache()
    ids = torch.tensor([2, gpt.cfg.null_class])
    for e in (ex, ort):
        e.start(2)
        e.prefill(ids)
    mine, theirs = ex.kv_cache(), ort.kv_cache()
    assert len(mine) == len(theirs) == 2 * gpt.cfg.n_layer
    assert [tuple(t.shape) for t in mine] == [tuple(t.shape) for t in theirs]
    # The export itself is validated against eager to 1e-4 on its outputs; the cache is one of them.
    assert max(float((a - b.to(a.dtype)).abs().max()) for a, b in zip(mine, theirs)) < 1e-4
    before = mine[0][:, :, 1].clone()                               # slot 1: still zero after prefill
    ex.decode(torch.tensor([5, 5]), 1)
    assert not torch.equal(ex.kv_cache()[0][:, :, 1], before) and not before.any()


def test_budget_is_checked_before_sampling(tmp_path):
    gpt, tok = tiny_models(0)
    out = tmp_path / "set.safetensors"
    opts = CollectOptions(images=4096, batch_images=1, max_bytes=MiB)
    with pytest.raises(CalibrationError, match=r"needs \d+ MiB .* budget is 1 MiB; lower --images or raise --max-mib"):
        collect(gpt, tok, out, opts)
    assert list(tmp_path.iterdir()) == []


def test_damaged_sets_are_refused_in_one_line(tiny_set, tmp_path):
    data = tiny_set.read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])   # a bit in the tensor data
    with pytest.raises(CalibrationError, match="does not match its sha256") as e:
        load_set(flipped)
    assert "\n" not in str(e.value) and "hita calibrate" in str(e.value)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="not a readable calibration set"):
        load_set(cut)


def test_a_file_that_is_not_a_set_is_never_overwritten(tmp_path):
    precious = tmp_path / "notes.safetensors"
    precious.write_text("mine")
    with pytest.raises(CalibrationError, match="not a hita calibration set; refusing to overwrite"):
        check_writable(precious)
    assert precious.read_text() == "mine"


def test_options_refuse_ragged_runs():
    with pytest.raises(ValueError, match="multiple of batch_images"):
        CollectOptions(images=5, batch_images=2)
