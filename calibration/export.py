"""Quantized ONNX artifacts: ``hita export --engine onnx --precision int8-weight|int4-weight|int8|fp8``.

A quantized folder is made from a verified fp32 ONNX folder, never from scratch, so everything the
fp32 export proves (each graph against eager PyTorch, the signatures, the cache binding) holds for
the graph that gets quantized. The steps, all inside a hidden staging folder next to ``out``:

1. the fp32 folder: exported now (validated against eager as usual) or given (``--from-onnx``,
   its manifest and files verified);
2. the calibration set must come from the same model: same configs and position-128 rule, the same
   checkpoint sha256 where both record one, and the fp32 decode step must reproduce the eager
   logits the set recorded (a fingerprint that needs no hashes);
3. each graph the recipe names is quantized (:func:`~hita.calibration.quantize.quantize_graph`);
4. every quantized graph is checked: ONNX Runtime loads it, its I/O equals the fp32 manifest's,
   outputs on the set's real feeds are finite and close to fp32 (KL and top-1 recorded), Q/DQ graphs
   pass TensorRT's ONNX support check, and in-place cache binding is re-verified;
5. one atomic :func:`~hita.export.manifest.write_artifacts`, manifest = the fp32 one plus
   ``options.quantization`` (recipe, calibrator, set, per-graph facts, checks). ``precision`` stays
   ``float32``: it names the graphs' I/O dtype, which quantization does not change, so
   :class:`~hita.runtimes.onnxrt.OrtExecutor` loads the folder unchanged.

Any failure leaves ``out`` as it was.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hita.export.errors import ExportError, ParityError
from hita.export.manifest import Manifest, check_output_folder, load_manifest, staging_dir, write_artifacts
from hita.export.spec import DECODE_STEP, DECODER, GRAPH_NAMES, PREFILL, graph_specs, has_row_positions
from hita.util.log import Log, logger

from .dataset import CalibrationError, CalibrationSet, load_set
from .quantize import quantize_graph
from .recipes import Recipe, recipe as get_recipe

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["export_quantized", "check_set_matches", "MAX_FEEDS", "PROBE_TOL"]

# Decode-step feeds given to a calibrator: every position of every run up to this many, else spread
# evenly. 256 feeds of GPT-B take ~1 min of calibration on 2 cores; ranges stop moving well before.
MAX_FEEDS = 256
# The fp32 graph reproduces eager logits to ~1e-5 (the export's own tolerance is 1e-4); logits of
# other weights differ by whole units. 1e-3 separates the two with margins of 10x either way.
PROBE_TOL = 1e-3
_CHECK_FEEDS = 8       # decode-step feeds compared with fp32 after quantizing
_GROSS_KL = 10.0       # x the recipe's KL threshold: a graph this far off is broken, not just coarse


def _fix(set_path: Path) -> str:
    return f"collect a set from this model: `hita calibrate --gpt G --tokenizer T --out {set_path}`"


def _check_hashes(cal: CalibrationSet, recorded: Mapping[str, str | None]) -> None:
    """Checkpoint sha256 of the set against the export's, where both are known."""
    for kind in ("gpt", "tokenizer"):
        mine, theirs = cal.manifest.get("checkpoints", {}).get(kind), recorded.get(kind)
        if mine and theirs and mine != theirs:
            raise CalibrationError(
                f"{cal.path}: collected from another {kind} checkpoint (sha256 {mine[:12]}..., this export's is "
                f"{theirs[:12]}...); {_fix(cal.path)}")


def check_set_matches(cal: CalibrationSet, manifest: Manifest, decode_path: Path | None = None,
                      checkpoints: Mapping[str, str | None] | None = None) -> None:
    """Refuse a calibration set that was not collected from the model being quantized.

    Args:
        cal: the set.
        manifest: the fp32 ONNX folder's manifest.
        decode_path: its decode-step graph; when given, the set's recorded eager logits must be
            reproduced by it within :data:`PROBE_TOL`.
        checkpoints: sha256 of the checkpoints being exported (else the manifest's are used).
    Raises:
        CalibrationError: one line naming what differs and how to get a matching set.
    """
    fix = _fix(cal.path)
    if cal.gpt_cfg != manifest.gpt_cfg or cal.tokenizer_cfg != manifest.tokenizer_cfg:
        raise CalibrationError(
            f"{cal.path}: collected from {cal.manifest['gpt_preset']}/{cal.manifest['tokenizer_preset']} with other "
            f"configs than this export ({manifest.gpt_preset}/{manifest.tokenizer_preset}); {fix}")
    if cal.manifest.get("pos128") != manifest.pos128:
        raise CalibrationError(f"{cal.path}: collected with pos128={cal.manifest.get('pos128')}, the export uses "
                               f"{manifest.pos128}; collect with --pos128 {manifest.pos128}")
    _check_hashes(cal, dict(checkpoints or manifest.checkpoints))
    if decode_path is None:
        return
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(decode_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for pos, eager in cal.probes():
        per_row = has_row_positions(manifest.signature(DECODE_STEP))
        got = sess.run([sess.get_outputs()[0].name], cal.decode_feed(0, pos, names, per_row))[0]
        diff = float(np.abs(got - eager).max())
        if not diff <= PROBE_TOL:
            raise CalibrationError(
                f"{cal.path}: its recorded logits are not reproduced by this export (max |diff| {diff:.3g} at "
                f"position {pos} > {PROBE_TOL:g}): the set comes from other weights; {fix}")


# ----------------------------------------------------------------------------------------------
# Feeds and checks
# ----------------------------------------------------------------------------------------------


def _feeds(cal: CalibrationSet, graph: str, names: list[str], max_feeds: int, row_positions: bool = False) -> list:
    if graph == DECODE_STEP:
        return [lambda r=r, p=p: cal.decode_feed(r, p, names, row_positions) for r, p in cal.decode_points(max_feeds)]
    if graph == PREFILL:
        return [lambda r=r: cal.prefill_feed(r) for r in range(cal.runs)]
    return [lambda f=f: f for f in cal.decoder_feeds()]


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path.name}: ONNX Runtime cannot load the quantized graph ({first}); report it with "
                          "the recipe and tool versions") from None


def _softmax_kl(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(mean KL(ref || got) over rows, top-1 agreement) of two logit arrays ``[..., V]``."""
    import torch

    from hita.runtimes.parity import step_kl

    r, g = torch.from_numpy(ref.reshape(1, -1, ref.shape[-1])), torch.from_numpy(got.reshape(1, -1, got.shape[-1]))
    kl = float(step_kl(r.transpose(0, 1), g.transpose(0, 1)).mean())
    return kl, float((ref.argmax(-1) == got.argmax(-1)).mean())


def _check_graph(graph: str, fp32: Path, quant: Path, manifest: Manifest, rec: Recipe,
                 feeds: list, judge: bool = True) -> dict[str, Any]:
    """Load, signature, finiteness and closeness to fp32 of one quantized graph (see module doc)."""
    from hita.export.onnx import onnx_signature
    from hita.export.trt_support import tensorrt_violations

    import onnx

    manifest.signature(graph).check(onnx_signature(quant), quant.name, f"quantized {graph}",
                                    "the quantizer changed the graph's I/O; report it")
    if rec.tensorrt:
        found = tensorrt_violations(onnx.load(str(quant), load_external_data=False), quant.name)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ExportError(f"{rec.name}: not buildable by TensorRT: {found[0]}{more}; report it with the "
                              "recipe and tool versions")
    ref_s, q_s = _session(fp32), _session(quant)
    picks = feeds if len(feeds) <= _CHECK_FEEDS else [feeds[i] for i in
                                                      np.linspace(0, len(feeds) - 1, _CHECK_FEEDS).astype(int)]
    kls, tops, psnrs = [], [], []
    for make in picks:
        feed = make()
        want = ref_s.run([ref_s.get_outputs()[0].name], feed)[0]
        got = q_s.run([q_s.get_outputs()[0].name], feed)[0]
        if not np.isfinite(got).all():
            raise ParityError(f"{quant.name}: the {rec.name} graph returns NaN or infinite outputs on calibration "
                              "feeds; try another calibrator or recipe")
        if graph == DECODER:
            import torch

            from hita.util.metrics import psnr

            psnrs.append(psnr(torch.from_numpy(np.asarray(got)), torch.from_numpy(np.asarray(want))))
        else:
            kl, top = _softmax_kl(want, got)
            kls.append(kl)
            tops.append(top)
    out: dict[str, Any] = {"feeds_checked": len(picks), "tensorrt_checked": rec.tensorrt}
    if psnrs:
        out["psnr_db"] = round(min(psnrs), 2)
    if kls:
        out.update(mean_kl=float(np.mean(kls)), top1_agreement=float(np.mean(tops)))
        limit = rec.thresholds.max_mean_kl
        if judge and limit is not None and out["mean_kl"] > _GROSS_KL * limit:
            raise ParityError(
                f"{quant.name}: the {rec.name} graph is far from fp32 on calibration feeds (mean KL "
                f"{out['mean_kl']:.3g} > {_GROSS_KL:g} x the recipe's {limit:g}); try another calibrator or recipe")
    return out


# ----------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------


def export_quantized(
    out_dir: str | os.PathLike,
    precision: str,
    *,
    gpt: "HitaGPT | None" = None,
    tokenizer: "HitaTokenizer | None" = None,
    from_onnx: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    calibrator: str | None = None,
    checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
    max_feeds: int = MAX_FEEDS,
    kv_cache: str | None = None,
    progress: bool | Log = True,
    **onnx_kwargs: Any,
) -> Path:
    """Write a quantized ONNX artifacts folder for recipe ``precision``.

    Args:
        out_dir: the folder to write (new, empty, or an earlier hita export; replaced atomically).
        precision: a recipe name (:data:`~hita.calibration.recipes.RECIPES`).
        gpt, tokenizer: models to export first (with ``checkpoints`` hashed into the manifest), or
        from_onnx: a verified fp32 ONNX artifacts folder to quantize.
        calibration: a calibration set (required by static recipes; weight-only recipes use it, when
            given, to check the quantized graphs on real feeds).
        calibrator: activation calibrator (static recipes; default the recipe's).
        max_feeds: decode-step feeds given to the calibrator.
        kv_cache: ``"int8"`` / ``"fp8"`` asks for a quantized KV cache; refused in one line
            (:func:`~hita.calibration.recipes.kv_cache_refusal` says what the runtimes lack). The cache
            of every recipe stays float32.
        progress: progress lines to stderr, or a callable taking each line.
        onnx_kwargs: passed to :func:`hita.export.onnx.export_onnx` (``opset``, ``pos128``, ...).
    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        CalibrationError: missing, damaged, foreign or too small calibration set.
        ArtifactError, ExportError, ParityError, ValueError: as the export driver; a quantized graph
            that fails its checks.
    """
    rec = get_recipe(precision)
    if kv_cache is not None:
        from .recipes import kv_cache_refusal

        raise ValueError(kv_cache_refusal(kv_cache))
    calibrator = rec.check_calibrator(calibrator)
    log = logger(progress)
    if (from_onnx is None) == (gpt is None or tokenizer is None):
        raise ValueError("quantize either models (gpt and tokenizer) or an fp32 ONNX folder (--from-onnx), not both")
    if rec.needs_calibration and calibration is None:
        raise CalibrationError(f"--precision {rec.name} calibrates activations and needs --calibration SET; collect "
                               "one with `hita calibrate --out SET` (same --gpt/--tokenizer)")
    if not 1 <= max_feeds <= 100_000:
        raise ValueError(f"max_feeds must be in 1..100000, got {max_feeds}")
    out = Path(out_dir)
    check_output_folder(out)
    cal = load_set(calibration) if calibration is not None else None
    if cal is not None and cal.images < rec.min_images(calibrator):
        raise CalibrationError(
            f"{cal.path}: {cal.images} images are too few for the {calibrator} calibrator (needs at least "
            f"{rec.min_images(calibrator)}); collect a larger set with `hita calibrate --images N`")
    hashes = None
    if checkpoints:
        from hita.util.files import file_sha256

        hashes = {k: (file_sha256(p) if p else None) for k, p in checkpoints.items()}
    if cal is not None and from_onnx is None:  # early, before the slow export: configs and hashes
        if cal.gpt_cfg != gpt.cfg or cal.tokenizer_cfg != tokenizer.cfg:
            raise CalibrationError(f"{cal.path}: collected from {cal.manifest['gpt_preset']} with other configs than "
                                   f"these checkpoints ({gpt.cfg.name}); {_fix(cal.path)}")
        _check_hashes(cal, hashes or {})
    t0 = time.perf_counter()
    with staging_dir(out) as work:
        if from_onnx is not None:
            src = Path(from_onnx)
            base = load_manifest(src, expect_engine="onnx")
            if "quantization" in base.options or base.precision != "float32":
                what = base.options.get("quantization", {}).get("recipe", base.precision)
                raise ValueError(f"{src}: is already a {what} export; quantize an fp32 ONNX folder "
                                 "(`hita export --engine onnx --precision fp32`)")
            if base.options.get("attention", "plain") != "plain" and rec.method != "weight-only":
                # Q/DQ recipes are for TensorRT, which parses no contrib op.
                raise ValueError(f"{src}: an `--attention {base.options['attention']}` export; quantize a plain "
                                 "fp32 ONNX folder (`hita export --engine onnx --attention plain`) for "
                                 f"{rec.name}, or use a weight-only recipe (int8-weight, int4-weight)")
        else:
            from hita.export.onnx import export_onnx

            src = work / "fp32"
            export_onnx(gpt, tokenizer, src, checkpoints=checkpoints, progress=progress, **onnx_kwargs)
            base = load_manifest(src, expect_engine="onnx")
        if cal is not None:
            check_set_matches(cal, base, src / base.graph_file(DECODE_STEP), hashes)
        per_row = has_row_positions(base.signature(DECODE_STEP))
        specs = graph_specs(base.tokenizer_cfg, base.gpt_cfg, dtype=base.precision, row_positions=per_row)
        qdir = work / "quantized"
        qdir.mkdir()
        graphs: dict[str, dict[str, Any]] = {}
        checks: dict[str, Any] = {}
        for i, name in enumerate(GRAPH_NAMES, 1):
            file = base.graph_file(name)
            external = (file + ".data") in base.files
            t1 = time.perf_counter()
            feeds = _feeds(cal, name, specs[name].input_names, max_feeds, per_row) if cal is not None else []
            if name in rec.graphs:
                facts = quantize_graph(src / file, qdir / file, rec, graph=name, calibrator=calibrator,
                                       feeds=feeds, external_data=external)
                checks[name] = _check_graph(name, src / file, qdir / file, base, rec,
                                            feeds or _random_feeds(specs[name]), judge=bool(feeds))
                line = (f"[{i}/3] {file}: {rec.name}, {facts.get('quantized_nodes', 0)} nodes quantized in "
                        f"{time.perf_counter() - t1:.1f} s")
                c = checks[name]
                if "mean_kl" in c:
                    line += (f"; vs fp32 on {c['feeds_checked']} feeds: mean KL {c['mean_kl']:.2e}, "
                             f"top-1 {100 * c['top1_agreement']:.1f}%")
                if "psnr_db" in c:
                    line += f"; vs fp32: PSNR {c['psnr_db']:.1f} dB"
                log(line)
            else:
                facts = {"quantized_nodes": 0}
                for f in [file] + ([file + ".data"] if external else []):
                    shutil.copyfile(src / f, qdir / f)
                log(f"[{i}/3] {file}: kept fp32 ({rec.name} does not quantize the {name})")
            graphs[name] = {**base.graphs[name], "quantization": facts}
        inplace = False
        if base.options.get("attention") == "gqa":
            # Weight-only on a GroupQueryAttention step: the layer MatMuls become MatMulNBits; the
            # head halves inside the ``If`` branches stay fp32 (the quantizer is given top-level
            # nodes only). The step's in-place / prefix-only facts are re-checked on the new graph.
            from hita.export.gqa import check_gqa_step
            from hita.export.onnx import _session as onnx_session

            dspec = specs[DECODE_STEP]
            nh = base.gpt_cfg.n_holistic
            facts_gqa = check_gqa_step(onnx_session(qdir / base.graph_file(DECODE_STEP), dspec), dspec,
                                       dspec.example_inputs(dspec.sizes("check"), seed=1), [nh - 1, nh, nh + 1])
            if not all(facts_gqa.values()):
                raise ParityError(f"{rec.name}: the quantized GroupQueryAttention step lost {facts_gqa}; report it")
            inplace = True
        elif base.options.get("kv_inplace_verified"):
            from hita.export.onnx import verify_inplace_kv

            inplace = verify_inplace_kv(qdir / base.graph_file(DECODE_STEP), specs[DECODE_STEP], base.gpt_cfg)
        quant = {
            "recipe": rec.name, "method": rec.method, "dtype": rec.dtype, "bits": rec.bits,
            "graphs": list(rec.graphs), "calibrator": calibrator, "tensorrt": rec.tensorrt,
            "runtime": rec.runtime_note, "checks": checks,
            "calibration_set": None if cal is None else {
                "file": cal.path.name, "images": cal.images, "rows": cal.rows, "runs": cal.runs,
                "options": cal.manifest["options"], "checkpoints": cal.manifest.get("checkpoints", {}),
                "tensors_sha256": {k: v["sha256"] for k, v in sorted(cal.manifest["tensors"].items())
                                   if not k.startswith("decode.cache.")},
            },
            "source_manifest_sha256": _manifest_sha(src),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        versions = dict(base.versions)
        versions["onnxruntime.quantization"] = versions.get("onnxruntime", "")
        manifest = dataclasses.replace(
            base, graphs=graphs, versions=versions, files={},
            options={**base.options, "kv_inplace_verified": inplace, "quantization": quant},
            created=Manifest.__dataclass_fields__["created"].default_factory(),
        )
        files = {f.name: f for f in sorted(qdir.iterdir())}
        write_artifacts(out, files, manifest)
    log(f"wrote {out} ({rec.name}; {len(files)} files + manifest)")
    return out


def _manifest_sha(folder: Path) -> str:
    from hita.export.manifest import manifest_sha256

    return manifest_sha256(folder)


def _random_feeds(spec) -> list:
    """Seeded spec inputs, for checking weight-only graphs when no calibration set is given (the
    check then proves loading, I/O and finiteness; closeness on random caches means little)."""
    return [lambda s=s: {k: v.numpy() for k, v in spec.example_inputs(spec.sizes("check"), seed=s).items()}
            for s in range(2)]
