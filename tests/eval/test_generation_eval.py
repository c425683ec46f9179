"""`evaluate_generation_job`: sharded, resumable, any runtime, ADM-style references refused when they cannot fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hita.eval.classifier import ClassifierConfig, FashionClassifier
from hita.eval.features import ClassifierFeatures
from hita.jobs.evaluate import evaluate_generation_job, reference_from_npz
from hita.runtimes.sampling import SamplingOptions

OPTS = SamplingOptions(cfg_scale=2.0, seed=3)


@pytest.fixture()
def extractor():
    torch.manual_seed(0)
    return ClassifierFeatures(FashionClassifier(ClassifierConfig(widths=(4, 4, 8), feature_dim=8)).eval(), name="random-cls")


@pytest.fixture()
def reference(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    return path


def _run(ex, extractor, out, reference, **kw):
    return evaluate_generation_job(ex, extractor, kw.pop("opts", OPTS), out, per_class=1, reference=str(reference),
                                   shard_size=4, batch_size=4, progress=False, **kw)


def test_report_shards_and_resume(tiny_torch_executor, extractor, reference, tmp_path):
    out = tmp_path / "run"
    rep = _run(tiny_torch_executor, extractor, out, reference)
    g = rep["generated"]
    assert g["images"] == 10 and np.isfinite(g["fid"]) and 1.0 <= g["is"] <= 10.0
    assert 0.0 <= g["precision"] <= 1.0 and 0.0 <= g["recall"] <= 1.0
    assert len(g["class_accuracy_per_class"]) == 10
    shards = sorted((out / "shards").glob("shard_*.npz"))
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert (out / "report.md").is_file() and (out / "grid.png").is_file()
    first = np.load(shards[1])["features"]
    # Interrupted run: one shard lost. Resuming regenerates exactly that shard, with the same images.
    shards[1].unlink()
    before = shards[0].stat().st_mtime_ns
    rep2 = _run(tiny_torch_executor, extractor, out, reference)
    assert shards[0].stat().st_mtime_ns == before
    np.testing.assert_allclose(np.load(shards[1])["features"], first, atol=1e-5)
    assert rep2["generated"]["fid"] == pytest.approx(g["fid"], rel=1e-5)


def test_other_settings_on_the_same_folder_are_refused_until_restart(tiny_torch_executor, extractor, reference, tmp_path):
    out = tmp_path / "run"
    _run(tiny_torch_executor, extractor, out, reference)
    with pytest.raises(ValueError, match=r"other settings \(options\).*--restart"):
        _run(tiny_torch_executor, extractor, out, reference, opts=SamplingOptions(cfg_scale=2.0, seed=4))
    rep = _run(tiny_torch_executor, extractor, out, reference, opts=SamplingOptions(cfg_scale=2.0, seed=4), restart=True)
    assert rep["spec"]["options"]["seed"] == 4


def test_onnxruntime_scores_like_eager(onnx_dir, tiny_torch_executor, extractor, reference, tmp_path):
    from hita.runtimes.onnxrt import OrtExecutor

    eager = _run(tiny_torch_executor, extractor, tmp_path / "eager", reference)
    ort = _run(OrtExecutor(onnx_dir), extractor, tmp_path / "ort", reference)
    a = np.load(tmp_path / "eager" / "shards" / "shard_00000.npz")
    b = np.load(tmp_path / "ort" / "shards" / "shard_00000.npz")
    # Same tokens (equal logits draw equal tokens); pixels may differ by one uint8 level.
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
    assert ort["generated"]["fid"] == pytest.approx(eager["generated"]["fid"], rel=1e-2, abs=1e-3)


def test_reference_batches_that_cannot_fit_are_refused(extractor, tmp_path):
    np.savez(tmp_path / "r64.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="64x64 images but the generated images are 32x32; pass --resize 64"):
        reference_from_npz(tmp_path / "r64.npz", extractor, 32)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-wide but the random-cls features are 8-wide"):
        reference_from_npz(tmp_path / "stats.npz", extractor, 32)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="neither arr_0"):
        reference_from_npz(tmp_path / "other.npz", extractor, 32)
    with pytest.raises(ValueError, match="no such file"):
        reference_from_npz(tmp_path / "absent.npz", extractor, 32)
