"""FID, IS, precision/recall, class accuracy and codebook usage against values known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hita.eval.codebook import UsageCounter
from hita.eval.metrics import GaussianStats, class_accuracy, frechet_distance, inception_score, precision_recall


def test_fid_of_gaussians_in_closed_form():
    d = 16
    a = GaussianStats(np.zeros(d), np.eye(d), 0)
    b = GaussianStats(np.full(d, 0.5), 4 * np.eye(d), 0)
    # |mu|^2 = 16 * 0.25 = 4; trace(I + 4I - 2 * 2I) = 16
    assert frechet_distance(a, b) == pytest.approx(4.0 + 16.0, abs=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_from_samples_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    same = frechet_distance(GaussianStats.of(x), GaussianStats.of(y))
    shifted = frechet_distance(GaussianStats.of(x), GaussianStats.of(y + 1.0))
    assert same < 0.05
    assert shifted == pytest.approx(8.0, rel=0.05)


def test_fid_refuses_features_of_different_widths():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(GaussianStats(np.zeros(3), np.eye(3), 0), GaussianStats(np.zeros(4), np.eye(4), 0))


def test_inception_score_extremes():
    k = 10
    confident = np.eye(k)[np.arange(1000) % k]  # one-hot, classes balanced: IS = k
    assert inception_score(confident, splits=10)[0] == pytest.approx(k, rel=1e-6)
    uniform = np.full((1000, k), 1.0 / k)  # no information: IS = 1
    assert inception_score(uniform, splits=10)[0] == pytest.approx(1.0, abs=1e-9)


def test_precision_recall_cover_and_miss():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 4))
    p, r = precision_recall(real, real.copy(), k=3)
    assert (p, r) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Generated images that cover only half of the real set: precise, but half the recall is lost.
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half, k=3)
    assert p == 1.0 and 0.3 < r < 0.75


def test_class_accuracy_per_class():
    acc, per = class_accuracy(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 4)
    assert acc == pytest.approx(4 / 6)
    assert per[:3].tolist() == [0.5, 0.5, 1.0] and math.isnan(per[3])


def test_usage_counter_finds_a_collapsed_codebook():
    c = UsageCounter("holistic", 512, 16)
    c.add(np.tile(np.arange(16), (100, 1)))  # slot s always uses code s
    u = c.result()
    assert (u.used, u.positions_with_one_code, u.per_position_used) == (16, 16, (1,) * 16)
    assert u.perplexity == pytest.approx(16.0)


def test_usage_counter_perplexity_of_uniform_use():
    c = UsageCounter("patch", 8, 2)
    c.add(np.stack([np.arange(8), np.arange(8)[::-1]], axis=1))
    u = c.result()
    assert u.used == 8 and u.fraction_used == 1.0 and u.positions_with_one_code == 0
    assert u.perplexity == pytest.approx(8.0)
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        c.add(np.array([[8, 0]]))
