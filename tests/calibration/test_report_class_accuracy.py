"""The report's class-accuracy column: free-run images of fp32 and a quantized folder on the same
seeds, judged by the shipped classifier (hita.eval's code), paired statistics, the verdict only from
enough images; and the manifest figures a benchmark reads (recorded_accuracy)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hita.calibration.class_accuracy import MIN_JUDGED_IMAGES, class_judge, classify_generated, compare
from hita.calibration.report import accuracy_report, recorded_accuracy
from hita.runtimes.sampling import SamplingOptions


def test_paired_difference_and_its_standard_error():
    wanted = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    ref = wanted.copy()
    ref[[0, 1, 2]] = 9 - wanted[[0, 1, 2]]         # fp32 wrong on images 0, 1, 2 -> 70 %
    cand = wanted.copy()
    cand[[1, 5]] = 0                               # recipe wrong on 1 and 5 -> 80 %: fixed 0 and 2, broke 5
    c = compare(ref, cand, wanted, 10, threshold_points=2.0, min_images=10)
    assert (c.fp32.accuracy, c.quantized.accuracy, c.changed) == (0.7, 0.8, 3)
    assert math.isclose(c.fp32.stderr, math.sqrt(0.7 * 0.3 / 10))
    # d = +1, +1, -1 on three images, 0 elsewhere: mean 0.1, sample std sqrt((3 - 10 * 0.01) / 9).
    assert math.isclose(c.diff_points, 10.0)
    assert math.isclose(c.diff_stderr_points, 100 * math.sqrt((3 - 0.1) / 9) / math.sqrt(10))
    assert c.judged and c.ok is False and "moved +10.0 points" in c.failure
    # The same images below the verdict's count: indicative, no verdict, no failure.
    c = compare(ref, cand, wanted, 10, threshold_points=2.0, min_images=11)
    assert not c.judged and c.ok is None and c.failure is None
    # Identical runs: zero difference with zero standard error, a pass.
    c = compare(ref, ref, wanted, 10, threshold_points=2.0, min_images=10)
    assert (c.diff_points, c.diff_stderr_points, c.ok) == (0.0, 0.0, True)
    with pytest.raises(ValueError, match="same images"):
        compare(ref, cand[:5], wanted, 10, 2.0)


def test_the_shipped_classifier_judges_ten_classes_only(tmp_path):
    judge = class_judge(10)
    assert judge.available and judge.classifier.endswith("fmnist-classifier.safetensors")
    other = class_judge(7)
    assert not other.available and "7 classes" in other.reason and "judges 10" in other.reason


def test_images_are_paired_by_seed_whatever_the_batch(int8w_dir):
    """Image i draws noise row i in any batch, so fp32 and a recipe (and two batchings) see the same
    draws; without row offsets the second batching would classify other images."""
    from hita.runtimes.onnxrt import OrtExecutor

    ex = OrtExecutor(int8w_dir, threads=1)
    ids = [3, 1, 4, 1, 5, 9, 2]
    opts = SamplingOptions(cfg_scale=1.5, seed=11)
    judge = class_judge(10)
    one_batch = classify_generated(ex, ids, opts, judge, batch_images=7)
    three_batches = classify_generated(ex, ids, opts, judge, batch_images=3)
    assert one_batch.dtype == np.int64 and one_batch.shape == (7,)
    assert np.array_equal(one_batch, three_batches)


def test_report_has_the_class_accuracy_column_indicative_on_few_images(int8w_dir, tiny_ckpts, tmp_path):
    out = tmp_path / "report"
    result = accuracy_report([int8w_dir], out, [0, 1], gpt=tiny_ckpts["gpt"], tokenizer=tiny_ckpts["tokenizer"],
                             per_class=1, progress=False)
    summary = result["class_accuracy"]
    assert summary["available"] and summary["per_class"] == 1 and summary["fp32"]["images"] == 10
    assert summary["judged"] is False and summary["min_images"] == MIN_JUDGED_IMAGES
    row = result["results"][0]
    k = row["class_accuracy"]
    assert k["quantized"]["images"] == 10 and not k["judged"] and k["ok"] is None
    assert math.isclose(k["diff_points"], 100 * (k["quantized"]["accuracy"] - k["fp32"]["accuracy"]), abs_tol=1e-9)
    assert row["ok"] and row["thresholds"]["class_accuracy_points"] == 2.0     # indicative never fails a row
    table = (out / "report.md").read_text()
    assert "| class accuracy vs fp32 |" in table and "n=10) indicative |" in table
    assert "Indicative only: fewer than the 5000 images" in table and "binomial standard error" in table
    assert json.loads((out / "report.json").read_text())["class_accuracy"] == summary


def test_report_says_not_available_for_classes_the_classifier_does_not_know(int8w_dir, tiny_ckpts, tmp_path):
    from hita.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier

    five = save_classifier(FashionClassifier(ClassifierConfig(num_classes=5)), tmp_path / "five.safetensors")
    result = accuracy_report([int8w_dir], tmp_path / "r", [0], gpt=tiny_ckpts["gpt"],
                             tokenizer=tiny_ckpts["tokenizer"], classifier=five, progress=False)
    row = result["results"][0]
    assert row["class_accuracy"] == result["class_accuracy"]
    assert not row["class_accuracy"]["available"] and "10 classes" in row["class_accuracy"]["reason"]
    table = (tmp_path / "r" / "report.md").read_text()
    assert "| not available |" in table and "Class accuracy: not available (the GPT has 10 classes" in table


def test_recorded_accuracy_reads_the_export_checks(int8w_dir, int8_dir, onnx_dir):
    from hita.export.manifest import load_manifest

    assert recorded_accuracy(onnx_dir) is None                      # fp32: nothing quantized
    for folder in (int8w_dir, int8_dir):
        figures = recorded_accuracy(folder)
        checks = load_manifest(folder).options["quantization"]["checks"]
        assert figures["on_calibration_feeds"] and figures["calibration_images"] == 2
        assert figures["decode_step_mean_kl"] == checks["decode_step"]["mean_kl"] > 0
        assert figures["decode_step_top1"] == checks["decode_step"]["top1_agreement"]
        assert figures["graphs"]["decode_step"]["feeds_checked"] == 8
    assert recorded_accuracy(int8w_dir)["recipe"] == "int8-weight" and "decoder" not in recorded_accuracy(int8w_dir)["graphs"]
    assert recorded_accuracy(int8_dir)["graphs"]["decoder"]["psnr_db"] >= 30
    assert recorded_accuracy(int8_dir)["thresholds"] == {"max_mean_kl": 3e-2, "min_top1_agreement": 0.88}
