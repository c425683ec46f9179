"""Do quantized free-run images keep their class? fp32 vs a quantized folder, judged by a classifier.

Teacher-forced KL and top-1 (:mod:`~hita.calibration.report`) say how far each step's distribution
moved; they cannot say whether the images a deployment draws still show the class asked for. This
module measures that directly: generate images of every class free-running (the loop, the sampler,
guidance, the shared noise stream: image ``i`` draws noise row ``i`` on every runtime), classify
them with the Fashion-MNIST classifier that ships with the embedded model (:mod:`hita.eval`'s code:
:func:`~hita.eval.classifier.load_classifier`, :class:`~hita.eval.features.ClassifierFeatures`,
:func:`~hita.eval.metrics.class_accuracy`), and compare the accuracy with fp32's on the same seeds.

Statistics, and why the verdict needs many images:

- each accuracy ``p`` over ``n`` images carries the binomial standard error ``sqrt(p (1 - p) / n)``;
  at ``p`` ~ 0.7 and 100 images that is 4.6 points, so a 2-point threshold means nothing there;
- fp32 and the recipe draw every image with the same noise, so the two runs are *paired*: most
  images get the same verdict from the classifier on both, and the difference's standard error comes
  from the images whose verdict changed (``d_i`` = correct on the recipe's minus on fp32's,
  ``SE = std(d) / sqrt(n)``), smaller than the unpaired ``sqrt(SE_a^2 + SE_b^2)``;
- the verdict "within ``Recipe.class_accuracy_points`` of fp32" is judged only from
  :data:`MIN_JUDGED_IMAGES` images on; below that the figures are printed as *indicative* and do not
  fail the report (CI runs a few images per class to exercise the path).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hita.util.log import Log, logger

__all__ = ["MIN_JUDGED_IMAGES", "ClassJudge", "Accuracy", "Comparison", "class_judge", "classify_generated",
           "accuracy_of", "compare", "GENERATE_BATCH"]

# Images from which the 2-point verdict is judged. Measured on the embedded model (guidance 1.5,
# 5000 images): 18-26 % of the images change their classifier verdict between fp32 and a recipe (a
# flipped near-tie early in the sequence gives another sample of the class), which puts the paired
# standard error of the difference at about sqrt(q / n) for a share q of changed verdicts: 0.6-0.7
# points at n = 5000 (2.0-2.3 measured at n = 500). So a recipe that changes nothing fails the
# 2-point bound by chance in under 1 % of runs and one 3 points off passes in under 10 %; at n = 2000
# (~1.1 points) those rates would be 7 % and 18 %.
MIN_JUDGED_IMAGES = 5000
# Images per loop run while generating for the classifier: 100 images are 200 rows with guidance,
# ~70 MB of embedded-model cache; memory stays flat however many images are asked for.
GENERATE_BATCH = 100


@dataclass(frozen=True)
class ClassJudge:
    """A classifier able to judge a model's classes, or why there is none.

    Fields:
        extractor: :class:`~hita.eval.features.ClassifierFeatures` over the classifier (``None``:
            not available).
        classifier: path of the classifier file (``None`` when not available).
        reason: why it is not available (empty when it is).
    """

    extractor: Any
    classifier: str | None
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.extractor is not None


def class_judge(num_classes: int, classifier: str | os.PathLike | None = None) -> ClassJudge:
    """The classifier for a GPT with ``num_classes`` classes: ``classifier`` or the shipped one.

    The shipped classifier knows the 10 Fashion-MNIST classes of the embedded model (and of any GPT
    trained with ``hita train`` on Fashion-MNIST); a GPT with another class count has no classifier
    unless one is given, and the report says so instead of a number.

    Raises:
        ClassifierError: a given ``classifier`` file that cannot be loaded.
    """
    from hita.eval.classifier import ClassifierError, load_classifier, shipped_classifier
    from hita.eval.features import ClassifierFeatures

    if classifier is None:
        try:
            path = shipped_classifier()
        except ClassifierError as e:
            return ClassJudge(None, None, str(e))
    else:
        path = Path(classifier)
    model = load_classifier(path)
    if model.cfg.num_classes != num_classes:
        which = "the shipped Fashion-MNIST classifier" if classifier is None else f"classifier {path}"
        return ClassJudge(None, None, f"the GPT has {num_classes} classes and {which} judges "
                                      f"{model.cfg.num_classes}; pass --classifier PATH trained on this model's classes")
    return ClassJudge(ClassifierFeatures(model), str(path))


def classify_generated(executor, class_ids: Sequence[int], opts, judge: ClassJudge, *,
                       batch_images: int = GENERATE_BATCH, progress: bool | Log = False) -> np.ndarray:
    """Free-run ``class_ids`` through ``executor`` and return the class the classifier gives each image.

    Image ``i`` uses noise row ``i`` whatever the batch (``row_offset``), so two executors given the
    same ids and options draw paired images.

    Returns:
        int64 ``[len(class_ids)]`` predicted classes.
    """
    from hita.runtimes.loop import generate_images, to_uint8

    if not judge.available:
        raise ValueError(f"no classifier: {judge.reason}")
    log = logger(progress)
    out = []
    n = len(class_ids)
    for a in range(0, n, batch_images):
        ids = torch.tensor(list(class_ids[a:a + batch_images]), dtype=torch.long)
        images, _ = generate_images(executor, ids, opts, row_offset=a)
        out.append(judge.extractor(to_uint8(images).numpy()).logits.argmax(1))
        log(f"    {executor.name}: {min(a + batch_images, n)}/{n} images classified")
    return np.concatenate(out).astype(np.int64)


@dataclass(frozen=True)
class Accuracy:
    """Classifier accuracy of one runtime's images: overall, its binomial standard error, per class."""

    images: int
    accuracy: float
    stderr: float
    per_class: list[float]


def accuracy_of(predicted: np.ndarray, wanted: np.ndarray, num_classes: int) -> Accuracy:
    """:class:`Accuracy` of ``predicted`` classes against ``wanted`` (per class: NaN where absent)."""
    from hita.eval.metrics import class_accuracy

    acc, per = class_accuracy(predicted, wanted, num_classes)
    n = len(wanted)
    return Accuracy(n, acc, math.sqrt(acc * (1 - acc) / n) if n else math.nan, [float(x) for x in per])


@dataclass(frozen=True)
class Comparison:
    """A recipe's class accuracy against fp32's on the same seeds, and the verdict.

    Fields:
        fp32, quantized: each runtime's :class:`Accuracy`.
        diff_points: quantized minus fp32 accuracy, percentage points.
        diff_stderr_points: paired standard error of ``diff_points`` (see the module docstring).
        changed: images the classifier judged differently on the two runs (right on one, wrong on
            the other).
        threshold_points: the recipe's bound on ``|diff_points|``.
        judged: ``images >= min_images``: the verdict counts. Otherwise the figures are indicative.
        ok: within the bound (``None`` when not judged).
        min_images: images needed for a verdict.
    """

    fp32: Accuracy
    quantized: Accuracy
    diff_points: float
    diff_stderr_points: float
    changed: int
    threshold_points: float
    judged: bool
    ok: bool | None
    min_images: int

    @property
    def failure(self) -> str | None:
        if self.ok is not False:
            return None
        return (f"classifier accuracy {100 * self.quantized.accuracy:.1f}% moved {self.diff_points:+.1f} points from "
                f"fp32's {100 * self.fp32.accuracy:.1f}% (bound {self.threshold_points:g})")

    def to_dict(self) -> dict[str, Any]:
        return {"available": True, **asdict(self), "failure": self.failure}


def compare(ref_pred: np.ndarray, cand_pred: np.ndarray, wanted: Sequence[int], num_classes: int,
            threshold_points: float, min_images: int = MIN_JUDGED_IMAGES) -> Comparison:
    """Compare two runs' predicted classes on the same images (paired) and judge the difference."""
    want = np.asarray(wanted, dtype=np.int64)
    if not len(want) == len(ref_pred) == len(cand_pred):
        raise ValueError(f"paired runs must cover the same images: {len(want)}, {len(ref_pred)}, {len(cand_pred)}")
    ref, cand = accuracy_of(ref_pred, want, num_classes), accuracy_of(cand_pred, want, num_classes)
    d = (cand_pred == want).astype(np.float64) - (ref_pred == want).astype(np.float64)   # [n] in {-1, 0, 1}
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    diff = 100 * float(d.mean()) if n else math.nan
    judged = n >= min_images
    return Comparison(ref, cand, diff, 100 * se, int(np.count_nonzero(d)), threshold_points, judged,
                      (abs(diff) <= threshold_points) if judged else None, min_images)


def cell(c: dict[str, Any] | None) -> str:
    """The report table's cell for a row's ``class_accuracy`` entry."""
    if c is None:
        return "-"
    if not c.get("available"):
        return "not available"
    q, f = c["quantized"], c["fp32"]
    text = (f"{100 * q['accuracy']:.1f}% vs {100 * f['accuracy']:.1f}% ({c['diff_points']:+.1f} ± "
            f"{c['diff_stderr_points']:.1f} pts, n={q['images']})")
    if not c["judged"]:
        return text + " indicative"
    return text + (" PASS" if c["ok"] else " FAIL")
