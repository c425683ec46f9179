"""What quantization costs in accuracy: ``hita calibrate --report``.

For each quantized artifacts folder, against fp32 eager PyTorch on the checkpoints it was exported
from, through the one loop with the same seeds (:func:`hita.runtimes.parity.compare_runs`):

- teacher-forced on fp32's own tokens: per-step KL(fp32 || quantized) of the softmax (mean and
  worst step, nats) and top-1 agreement: how far each step's distribution moved;
- free-running under the shared noise: token agreement and the first step where the runs part;
- pixels: PSNR of the quantized decoder on fp32's tokens (what decoder quantization costs) and of the
  free-running images against fp32's (what the whole pipeline costs: once a token flips the two
  images are two samples of the class, so this PSNR is low by nature and is reported, not judged);
- class accuracy (:mod:`~hita.calibration.class_accuracy`): free-run images of every class, fp32 and
  quantized on the same seeds, classified by the classifier that ships with the embedded model; the
  difference in points, with its paired standard error and the image count. Judged against the
  recipe's bound (2 points) from :data:`~hita.calibration.class_accuracy.MIN_JUDGED_IMAGES` images
  on, *indicative* below; "not available" (with the reason) for a GPT whose class count the
  classifier does not judge;
- the verdict with the recipe's thresholds (:data:`~hita.calibration.recipes.RECIPES`).

Written to ``out``: ``report.json`` (last: its presence marks a complete report), ``report.md`` (the
table) and ``grid.png`` (one row per image: fp32, then each recipe), each atomically.

:func:`recorded_accuracy` reads, without running anything, the accuracy a quantized folder's manifest
recorded when it was exported (KL and top-1 against fp32 on the calibration set's feeds): the
figures a benchmark prints beside a folder's speed.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hita.util.files import atomic_write
from hita.util.log import Log, logger

from .class_accuracy import MIN_JUDGED_IMAGES, cell

__all__ = ["accuracy_report", "format_table", "recorded_accuracy"]

_COLUMNS = ("recipe", "calibrator", "mean KL", "worst-step KL", "top-1", "free-run tokens", "first split",
            "decoder PSNR dB", "free-run PSNR dB", "class accuracy vs fp32", "verdict")


_MIN_CELL = 96


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of report rows (one per quantized folder)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        p = r["parity"]
        cells = (r["recipe"], r["calibrator"] or "-", f"{p['mean_kl']:.2e}", f"{p['max_step_kl']:.2e}",
                 f"{100 * p['top1_agreement']:.2f}%", f"{100 * p['token_agreement']:.2f}%",
                 "-" if p["first_token_mismatch"] is None else str(p["first_token_mismatch"]),
                 _db(p["psnr_db"]), _db(p["free_run_psnr_db"]), cell(r.get("class_accuracy")),
                 "PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def class_notes(summary: dict[str, Any]) -> str:
    """The lines under the table that say how the class accuracy column was measured."""
    if not summary.get("available"):
        return f"Class accuracy: not available ({summary['reason']}).\n"
    f = summary["fp32"]
    line = (f"Class accuracy: {f['images']} free-run images ({summary['per_class']} per class, guidance "
            f"{summary['cfg_scale']:g}, seed {summary['seed']}) per runtime, classified by {summary['classifier_name']}; "
            f"fp32 {100 * f['accuracy']:.1f}% (binomial standard error {100 * f['stderr']:.1f} points). "
            "Differences are quantized minus fp32 on the same seeds, ± their paired standard error. ")
    if summary["judged"]:
        line += (f"Judged: within {summary['threshold_points']:g} points of fp32 passes "
                 f"(from {summary['min_images']} images on).")
    else:
        line += (f"Indicative only: fewer than the {summary['min_images']} images a verdict needs "
                 f"(`--per-class {-(-summary['min_images'] // summary['num_classes'])}`); it does not fail the report.")
    return line + "\n"


def accuracy_report(
    artifacts: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    class_ids: Sequence[int],
    *,
    gpt: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    cfg_scale: float = 1.5,
    per_class: int | None = None,
    classifier: str | os.PathLike | None = None,
    progress: bool | Log = True,
) -> dict[str, Any]:
    """Compare quantized artifacts folders with fp32 eager and write the report files.

    Args:
        artifacts: quantized ONNX folders (``hita export --precision ...``), all from one model.
        out_dir: folder for ``report.json``, ``report.md`` and ``grid.png`` (created).
        class_ids: one image per id for the parity figures and the grid, the same seeds for every runtime.
        gpt, tokenizer: the checkpoints the folders were exported from (default: the embedded
            model, accepted only when the manifests say they came from it).
        seed, cfg_scale: sampling of the free-running runs.
        per_class: images per class for the class accuracy (``None``: enough for a verdict,
            :data:`MIN_JUDGED_IMAGES` in all; ``0``: not measured).
        classifier: the classifier file (default: the one shipped with the embedded model).
    Returns:
        The report as written to ``report.json``.
    Raises:
        ValueError: a folder is not a quantized ONNX export, or folders come from different models.
    """
    from hita.calibration.class_accuracy import class_judge, classify_generated, compare
    from hita.calibration.recipes import recipe as get_recipe
    from hita.export.manifest import load_manifest, manifest_sha256
    from hita.jobs.evaluate import balanced_classes
    from hita.jobs.sources import eager_reference
    from hita.runtimes.factory import Runtime, make_executor
    from hita.runtimes.loop import to_uint8
    from hita.runtimes.parity import compare_runs
    from hita.runtimes.sampling import SamplingOptions

    if not artifacts:
        raise ValueError("pass at least one quantized folder with --artifacts DIR")
    if per_class is not None and per_class < 0:
        raise ValueError(f"--per-class must be 0 (no class accuracy) or more, got {per_class}")
    log = logger(progress)
    opts = SamplingOptions(cfg_scale=cfg_scale, seed=seed)
    manifests = [load_manifest(a, expect_engine="onnx") for a in artifacts]
    for a, m in zip(artifacts, manifests):
        if "quantization" not in m.options:
            raise ValueError(f"{a}: an fp32 export; the report compares quantized folders (hita export --precision "
                             "int8-weight|int4-weight|int8|fp8) with fp32")
    if len({json.dumps(m.checkpoints, sort_keys=True) for m in manifests}) > 1 or \
            len({(json.dumps(m.gpt_config, sort_keys=True), m.pos128) for m in manifests}) > 1:
        raise ValueError("the folders were exported from different models; report one model at a time")
    num_classes = manifests[0].gpt_cfg.num_classes
    judge = class_judge(num_classes, classifier) if per_class != 0 else None
    reference = eager_reference(artifacts[0], gpt, tokenizer)
    summary: dict[str, Any] = {"available": False, "reason": "not measured (--per-class 0)"}
    ref_pred, wanted = None, []
    if judge is not None and not judge.available:
        summary = {"available": False, "reason": judge.reason}
    elif judge is not None:
        per = per_class if per_class is not None else -(-MIN_JUDGED_IMAGES // num_classes)
        wanted = balanced_classes(num_classes, per)
        log(f"class accuracy: fp32 eager, {len(wanted)} images ({per} per class)")
        ref_pred = classify_generated(reference, wanted, opts, judge, progress=log)
    rows, columns = [], []
    ref_images = None
    for a, m in zip(artifacts, manifests):
        q = m.options["quantization"]
        rec = get_recipe(q["recipe"])
        executor = make_executor(Runtime.onnxruntime, artifacts=a)
        log(f"{q['recipe']}: comparing {a} with fp32 eager on {len(class_ids)} images")
        report, ref_img, cand_img = compare_runs(reference, executor, class_ids, opts, rec.thresholds)
        ref_images = ref_img if ref_images is None else ref_images
        columns.append(cand_img)
        failures = list(report.failures)
        if ref_pred is not None:
            log(f"{q['recipe']}: class accuracy on {len(wanted)} images")
            pred = classify_generated(executor, wanted, opts, judge, progress=log)
            comparison = compare(ref_pred, pred, wanted, num_classes, rec.class_accuracy_points)
            klass = comparison.to_dict()
            if comparison.failure:
                failures.append(comparison.failure)
        else:
            klass = dict(summary)
        rows.append({"recipe": q["recipe"], "calibrator": q.get("calibrator"), "artifacts": str(a),
                     "manifest_sha256": manifest_sha256(a), "ok": not failures, "failures": failures,
                     "thresholds": {**asdict(rec.thresholds), "class_accuracy_points": rec.class_accuracy_points},
                     "parity": asdict(report), "class_accuracy": klass})
    if ref_pred is not None and judge is not None and judge.classifier is not None:
        first = rows[0]["class_accuracy"]
        summary = {"available": True, "classifier": judge.classifier, "classifier_name": Path(judge.classifier).name,
                   "per_class": len(wanted) // num_classes, "num_classes": num_classes, "seed": seed,
                   "cfg_scale": cfg_scale, "fp32": first["fp32"], "judged": first["judged"],
                   "min_images": MIN_JUDGED_IMAGES, "threshold_points": rows[0]["thresholds"]["class_accuracy_points"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(class_ids)
    grid = torch.stack([ref_images, *columns], dim=1).flatten(0, 1)                 # [n * (1 + k), 3, H, W]
    labels = [f"{c} {name}" for c in class_ids for name in ("fp32", *(r["recipe"] for r in rows))]
    from hita.util.images import save_grid

    side = grid.shape[-1]
    # Small models' images (32 px) are upscaled so the labels under them stay readable.
    save_grid(to_uint8(grid, size=None if side >= _MIN_CELL else _MIN_CELL), out / "grid.png", nrow=1 + len(rows),
              labels=labels)
    table = format_table(rows) + "\n" + class_notes(summary)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(table))
    result = {"reference": "torch-eager float32", "classes": list(class_ids), "seed": seed, "cfg_scale": cfg_scale,
              "images": n, "class_accuracy": summary, "results": rows, "grid": "grid.png", "table": "report.md"}
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


def recorded_accuracy(artifacts: str | os.PathLike, verify_files: bool = False) -> dict[str, Any] | None:
    """The accuracy a quantized folder's manifest recorded at export, for a benchmark's table.

    Nothing is run: the figures are the export's own checks (``options.quantization.checks``), each
    graph against the fp32 graph on up to 8 of the calibration set's real feeds: mean KL(fp32 ||
    quantized) of the softmax and top-1 agreement for the GPT graphs, PSNR for the decoder. A
    weight-only folder exported without ``--calibration`` was checked on random feeds only; its
    figures are returned with ``on_calibration_feeds: False`` and no verdict, because closeness on
    random caches says little. For loop-level figures (teacher-forced over every step, free-run
    class accuracy) run ``hita calibrate --report``.

    Args:
        artifacts: an ONNX artifacts folder.
        verify_files: hash every file too (default: the manifest and sizes only; the runtime that
            loads the folder verifies it anyway).
    Returns:
        ``None`` for an unquantized folder, else ``{"recipe", "calibrator", "dtype", "bits",
        "on_calibration_feeds", "calibration_images", "graphs": {graph: {mean_kl, top1_agreement,
        psnr_db, feeds_checked}}, "decode_step_mean_kl", "decode_step_top1", "thresholds": {...}}``.
    Raises:
        ArtifactError: the folder's manifest is missing or damaged.
    """
    from hita.calibration.recipes import recipe as get_recipe
    from hita.export.manifest import load_manifest

    m = load_manifest(artifacts, verify_files=verify_files)
    q = m.options.get("quantization")
    if not q:
        return None
    rec = get_recipe(q["recipe"])
    real = q.get("calibration_set") is not None
    graphs = {g: {k: c[k] for k in ("mean_kl", "top1_agreement", "psnr_db", "feeds_checked") if k in c}
              for g, c in q.get("checks", {}).items()}
    step = graphs.get("decode_step", {})
    t = rec.thresholds
    return {"recipe": rec.name, "calibrator": q.get("calibrator"), "dtype": rec.dtype, "bits": rec.bits,
            "on_calibration_feeds": real,
            "calibration_images": (q.get("calibration_set") or {}).get("images"),
            "graphs": graphs, "decode_step_mean_kl": step.get("mean_kl"), "decode_step_top1": step.get("top1_agreement"),
            "thresholds": {"max_mean_kl": t.max_mean_kl, "min_top1_agreement": t.min_top1_agreement}}
