"""What quantization costs in accuracy: ``hita calibrate --report``.

For each quantized artifacts folder, against fp32 eager PyTorch on the checkpoints it was exported
from, through the one loop with the same seeds (:func:`hita.runtimes.parity.compare_runs`):

- teacher-forced on fp32's own tokens: per-step KL(fp32 || quantized) of the softmax (mean and
  worst step, nats) and top-1 agreement: how far each step's distribution moved;
- free-running under the shared noise: token agreement and the first step where the runs part;
- pixels: PSNR of the quantized decoder on fp32's tokens (what decoder quantization costs) and of the
  free-running images against fp32's (what the whole pipeline costs: once a token flips the two
  images are two samples of the class, so this PSNR is low by nature and is reported, not judged);
- the verdict with the recipe's thresholds (:data:`~hita.calibration.recipes.RECIPES`).

Written to ``out``: ``report.json`` (last: its presence marks a complete report), ``report.md`` (the
table) and ``grid.png`` (one row per image: fp32, then each recipe), each atomically.
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

__all__ = ["accuracy_report", "format_table"]

_COLUMNS = ("recipe", "calibrator", "mean KL", "worst-step KL", "top-1", "free-run tokens", "first split",
            "decoder PSNR dB", "free-run PSNR dB", "verdict")


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
                 _db(p["psnr_db"]), _db(p["free_run_psnr_db"]),
                 "PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_report(
    artifacts: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    class_ids: Sequence[int],
    *,
    gpt: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    cfg_scale: float = 1.5,
    progress: bool | Log = True,
) -> dict[str, Any]:
    """Compare quantized artifacts folders with fp32 eager and write the report files.

    Args:
        artifacts: quantized ONNX folders (``hita export --precision ...``), all from one model.
        out_dir: folder for ``report.json``, ``report.md`` and ``grid.png`` (created).
        class_ids: one image per id, the same seeds for every runtime.
        gpt, tokenizer: the checkpoints the folders were exported from (default: the embedded
            model, accepted only when the manifests say they came from it).
        seed, cfg_scale: sampling of the free-running runs.
    Returns:
        The report as written to ``report.json``.
    Raises:
        ValueError: a folder is not a quantized ONNX export, or folders come from different models.
    """
    from hita.calibration.recipes import recipe as get_recipe
    from hita.export.manifest import load_manifest, manifest_sha256
    from hita.jobs.sources import eager_reference
    from hita.runtimes.loop import to_uint8
    from hita.runtimes.onnxrt import OrtExecutor
    from hita.runtimes.parity import compare_runs
    from hita.runtimes.sampling import SamplingOptions

    if not artifacts:
        raise ValueError("pass at least one quantized folder with --artifacts DIR")
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
    reference = eager_reference(artifacts[0], gpt, tokenizer)
    rows, columns = [], []
    ref_images = None
    for a, m in zip(artifacts, manifests):
        q = m.options["quantization"]
        rec = get_recipe(q["recipe"])
        log(f"{q['recipe']}: comparing {a} with fp32 eager on {len(class_ids)} images")
        report, ref_img, cand_img = compare_runs(reference, OrtExecutor(a), class_ids, opts, rec.thresholds)
        ref_images = ref_img if ref_images is None else ref_images
        columns.append(cand_img)
        rows.append({"recipe": q["recipe"], "calibrator": q.get("calibrator"), "artifacts": str(a),
                     "manifest_sha256": manifest_sha256(a), "ok": report.ok, "failures": report.failures,
                     "thresholds": asdict(rec.thresholds), "parity": asdict(report)})
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
    table = format_table(rows)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(table))
    result = {"reference": "torch-eager float32", "classes": list(class_ids), "seed": seed, "cfg_scale": cfg_scale,
              "images": n, "results": rows, "grid": "grid.png", "table": "report.md"}
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result
