"""Executors for the benchmark, built only the way users build them: ``hita.runtimes.factory`` over
the checkpoints (eager) or over artifacts written by the export driver (``export_onnx`` /
``export_aoti``), and the C++ host through ``hita.jobs.build_cpp`` (:mod:`.host`).

``onnxruntime-gqa`` is ONNX Runtime over the ``--attention gqa`` export (GroupQueryAttention over the
filled cache prefix, in place, and only the needed head half; ``hita.export.gqa``), in its own folder,
beside ``onnxruntime`` over the plain graph.

The quantized runtimes (:data:`QUANTIZED`) are ONNX Runtime over ``hita.calibration.export_quantized``
folders made from those fp32 exports, as ``hita export --precision R --from-onnx`` makes them: the
weight-only recipes from the gqa graph (their CPU speed case), static ``int8`` from the plain graph
(Q/DQ is for TensorRT, which parses no contrib op) with a calibration set that
``hita.calibration.collect`` samples from the eager model once per workdir. ``fp8`` is left out: on a
CPU it is a simulation (Q/DQ in float) whose time says nothing about FP8 hardware.

A runtime that cannot run here (missing package, failed import, export, build or load) becomes
:class:`Unavailable` with a one-line reason; the benchmark shows that as a table row and carries on.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hita.util.log import Log, first_line

from .models import Checkpoints

# runtime -> (export engine, ONNX attention variant or None, the factory's runtime name)
EXPORTS = {"onnxruntime": ("onnx", "plain", "onnxruntime"), "onnxruntime-gqa": ("onnx", "gqa", "onnxruntime"),
           "aoti": ("aoti", None, "aoti")}
# runtime -> (quantization recipe, attention variant of the fp32 ONNX export it quantizes)
QUANTIZED = {"onnxruntime-int8-weight": ("int8-weight", "gqa"), "onnxruntime-int4-weight": ("int4-weight", "gqa"),
             "onnxruntime-int8": ("int8", "plain")}
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-gqa", "aoti", "cpp", *QUANTIZED)
EAGER = "torch"  # the reference every ratio is taken against
# The calibration set of the static recipe: images sampled by eager (one image + CFG per run, the
# deployed batch-1 shape). 4 images of GPT-B take about a minute on 2 cores and are twice what the
# minmax calibrator needs (hita.calibration.recipes.MIN_IMAGES).
CALIBRATION_IMAGES = 4


class Unavailable(Exception):
    """A runtime cannot be benchmarked here; the message (one line, for the table) says why, and
    ``detail`` keeps the whole original message (a compiler's output, say) for the progress log."""

    def __init__(self, line: str, detail: str = "") -> None:
        super().__init__(line)
        self.detail = detail


def reason(e: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a table cell."""
    line = first_line(e)
    return f"{type(e).__name__}: {line[:240]}" if line else type(e).__name__


def attempt(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or :class:`Unavailable` ``"<what>: <reason>"`` when it raises anything."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure makes the runtime a row, not a crash
        raise Unavailable(f"{what}: {reason(e)}", detail=str(e)) from None


@dataclass
class Context:
    """What a runtime builder gets: the checkpoints, where exports go, the largest batch (rows)."""

    checkpoints: Checkpoints
    seed: int
    threads: int
    workdir: Path
    max_rows: int
    log: Log
    # variant -> folder checked or written in this run: several runtimes share one export (gqa: its
    # own row and two quantized ones; aoti: the C++ host too), and checking means hashing every file.
    exports: dict[str, Path] = field(default_factory=dict)


def reusable(folder: Path, engine: str, ctx: Context, attention: str | None = None) -> bool:
    """Whether ``folder`` holds a verified ``engine`` export (``load_manifest``) of exactly these
    checkpoints (the sha256 the manifest records), made by this torch, fp32 on the CPU with the
    default position rule, for at least ``max_rows`` rows (ONNX: with this ``attention`` variant;
    AOTI: with today's CPU defaults, so an older package compiled otherwise is not timed as if it
    were what ``hita export --engine aoti`` makes now)."""
    import torch

    from hita.export.errors import ArtifactError
    from hita.export.manifest import load_manifest

    try:
        m = load_manifest(folder, expect_engine=engine)
    except ArtifactError:
        return False
    made = (m.checkpoints, m.versions.get("torch"), m.precision, m.device, m.pos128)
    if engine == "aoti":
        from hita.export.aoti import default_attention, effective_inductor_configs

        current = (m.options.get("attention", "plain") == default_attention("cpu")
                   and m.options.get("inductor_configs") == effective_inductor_configs("cpu", None))
    else:
        current = attention is None or m.options.get("attention", "plain") == attention
    return (made == (ctx.checkpoints.sha256, torch.__version__, "float32", "cpu", "reference")
            and m.options.get("max_batch", 0) >= ctx.max_rows and current)


def exported(ctx: Context, engine: str, attention: str | None = None) -> Path:
    """``workdir/<engine>-<preset>-seed<seed>`` (``onnx-gqa-...`` for the gqa variant): reused while
    :func:`reusable`, else written there by the export driver from the checkpoints, as ``hita export``
    does."""
    from hita.checkpoint import load_gpt, load_tokenizer

    variant = f"{engine}-gqa" if attention == "gqa" else engine
    if variant in ctx.exports:
        return ctx.exports[variant]
    out = ctx.workdir / f"{variant}-{ctx.checkpoints.gpt_cfg.name}-seed{ctx.seed}"
    if reusable(out, engine, ctx, attention):
        ctx.log(f"{engine}: reusing the export in {out}")
        ctx.exports[variant] = out
        return out
    extra: dict[str, Any] = {}
    if engine == "onnx":
        from hita.export.onnx import export_onnx as export

        extra["attention"] = attention or "plain"
    else:
        from hita.export.aoti import export_aoti as export
    t0 = time.perf_counter()
    ck = ctx.checkpoints
    attempt(f"{variant} export failed", lambda: export(
        load_gpt(ck.gpt), load_tokenizer(ck.tokenizer), out, checkpoints=ck.sources,
        max_batch=max(16, ctx.max_rows), progress=lambda s: ctx.log(f"{variant}: {s}"), **extra))
    ctx.log(f"{variant}: exported in {time.perf_counter() - t0:.0f} s to {out}")
    ctx.exports[variant] = out
    return out


def calibration_set(ctx: Context) -> Path:
    """``workdir/calibration-<preset>-seed<seed>.safetensors``: reused while it loads (its hashes are
    verified) and was collected from these checkpoints, else sampled by eager as ``hita calibrate``
    does (progress every 10 %)."""
    from hita.calibration.collect import collect
    from hita.calibration.dataset import CalibrationError, load_set
    from hita.calibration.options import CollectOptions
    from hita.checkpoint import load_gpt, load_tokenizer

    ck = ctx.checkpoints
    path = ctx.workdir / f"calibration-{ck.gpt_cfg.name}-seed{ctx.seed}.safetensors"
    try:
        cal = load_set(path)
        if cal.manifest.get("checkpoints") == ck.sha256 and cal.images >= CALIBRATION_IMAGES:
            ctx.log(f"calibration: reusing {path}")
            return path
    except (CalibrationError, OSError):
        pass
    opts = CollectOptions.from_name("gpt-b").with_changes(images=CALIBRATION_IMAGES, seed=ctx.seed)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth > shown[0]:
            shown[0] = tenth
            ctx.log(f"calibration: {done}/{total} eager steps")

    t0 = time.perf_counter()
    attempt("calibration failed", lambda: collect(load_gpt(ck.gpt), load_tokenizer(ck.tokenizer), path, opts,
                                                  checkpoints=ck.sources, progress=progress))
    ctx.log(f"calibration: {CALIBRATION_IMAGES} images sampled in {time.perf_counter() - t0:.0f} s to {path}")
    return path


def quantized(ctx: Context, recipe: str, attention: str) -> Path:
    """``workdir/onnx-<attention>-<recipe>-<preset>-seed<seed>``: reused while its manifest verifies,
    names this recipe and was made from the fp32 folder as it is now (the manifest sha256 it records),
    else written by ``export_quantized`` from that folder."""
    from hita.calibration.export import export_quantized
    from hita.calibration.recipes import recipe as get_recipe
    from hita.export.errors import ArtifactError
    from hita.export.manifest import load_manifest, manifest_sha256

    src = exported(ctx, "onnx", attention)
    out = ctx.workdir / f"onnx-{attention}-{recipe}-{ctx.checkpoints.gpt_cfg.name}-seed{ctx.seed}"
    try:
        q = load_manifest(out, expect_engine="onnx").options.get("quantization", {})
        if q.get("recipe") == recipe and q.get("source_manifest_sha256") == manifest_sha256(src):
            ctx.log(f"{recipe}: reusing the export in {out}")
            return out
    except ArtifactError:
        pass
    cal = calibration_set(ctx) if get_recipe(recipe).needs_calibration else None
    t0 = time.perf_counter()
    attempt(f"{recipe} export failed", lambda: export_quantized(
        out, recipe, from_onnx=src, calibration=cal, progress=lambda s: ctx.log(f"{recipe}: {s}")))
    ctx.log(f"{recipe}: quantized in {time.perf_counter() - t0:.0f} s to {out}")
    return out


def build(name: str, ctx: Context) -> Any:
    """The executor (or, for ``cpp``, the :class:`~.host.HostProcess`) of runtime ``name``.

    Raises:
        Unavailable: why it cannot run here.
    """
    if name == "cpp":
        from .host import build_host_process

        return build_host_process(ctx)
    from hita.runtimes.factory import make_executor

    if name == EAGER:
        ck = ctx.checkpoints
        return attempt("load failed", lambda: make_executor(name, gpt=ck.gpt, tokenizer=ck.tokenizer))
    if name in QUANTIZED:
        folder, runtime = quantized(ctx, *QUANTIZED[name]), "onnxruntime"
    else:
        engine, attention, runtime = EXPORTS[name]
        folder = exported(ctx, engine, attention)
    return attempt("load failed", lambda: make_executor(runtime, artifacts=folder))


def build_all(names: list[str], ctx: Context) -> tuple[dict[str, Any], dict[str, str]]:
    """Build every runtime in ``names``: ``(name -> executor or host, name -> why it is unavailable)``."""
    built: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        ctx.log(f"{name}: building ...")
        try:
            built[name] = build(name, ctx)
        except Exception as e:  # noqa: BLE001 - a broken runtime is a row, not a crash
            errors[name] = str(e) if isinstance(e, Unavailable) else f"build failed: {reason(e)}"
            ctx.log(f"{name}: unavailable: {errors[name]}")
            if "\n" in getattr(e, "detail", ""):
                ctx.log(e.detail)
    return built, errors
