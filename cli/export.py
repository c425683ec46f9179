"""`hita export`: checkpoints → an artifacts folder (graphs + manifest) for one engine kind."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import Pos128, Precision, user_errors
from hita.cli.generate import GPT_OPT, TOK_OPT
from hita.jobs.sources import resolve_checkpoints


class KvWrite(str, Enum):
    scatter = "scatter"
    tensorscatter = "tensorscatter"


class Attention(str, Enum):
    plain = "plain"
    gqa = "gqa"


class Engine(str, Enum):
    onnx = "onnx"
    aoti = "aoti"
    tensorrt = "tensorrt"
    trt = "trt"  # alias of tensorrt
    triton = "triton"  # a Triton model repository (hita.serving) around an ONNX export or --from-artifacts


class KvCache(str, Enum):
    int8 = "int8"
    fp8 = "fp8"


class HardwareCompat(str, Enum):
    none = "none"
    ampere = "ampere+"
    same_cc = "same-cc"


class ExportPrecision(str, Enum):
    """fp32 / bf16 graphs, or a quantization recipe (``hita.calibration.recipes``) applied to fp32 ONNX."""

    fp32 = "fp32"
    bf16 = "bf16"
    int8_weight = "int8-weight"
    int4_weight = "int4-weight"
    int8 = "int8"
    fp8 = "fp8"

    @property
    def quantized(self) -> bool:
        return self.value not in ("fp32", "bf16")

    @property
    def dtype(self):
        return Precision(self.value).dtype


class Calibrator(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"
    distribution = "distribution"
    max = "max"


@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Artifacts folder to write (replaced atomically).")],
    engine: Annotated[Engine, typer.Option(help="What to build.")] = Engine.onnx,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    gpt_preset: Annotated[Optional[str], typer.Option(help="GPT preset (inferred from shapes when omitted).")] = None,
    tokenizer_preset: Annotated[Optional[str], typer.Option(help="Tokenizer preset (inferred when omitted).")] = None,
    precision: Annotated[ExportPrecision, typer.Option(
        help="GPT graph precision (the decoder stays fp32), or a quantization recipe for --engine onnx: int8-weight / "
             "int4-weight (ONNX Runtime MatMulNBits), int8 / fp8 (Q/DQ, need --calibration).")] = ExportPrecision.fp32,
    calibration: Annotated[Optional[Path], typer.Option(
        help="Calibration set from `hita calibrate` (int8, fp8; optional check data for weight-only).")] = None,
    calibrator: Annotated[Optional[Calibrator], typer.Option(
        help="Activation calibrator (int8: minmax, entropy or percentile; fp8: max or distribution).")] = None,
    pos128: Annotated[Pos128, typer.Option(help="Embedding rule at position 128 baked into the decode step.")] = Pos128.reference,
    opset: Annotated[int, typer.Option(min=18, max=23, help="ONNX opset.")] = 18,
    kv_write: Annotated[Optional[KvWrite], typer.Option(
        help="Decode-step cache write: scatter (ScatterElements; the onnx default, fastest in ONNX Runtime) or "
             "tensorscatter (opset 24 TensorScatter: TensorRT's in-place KV-cache update; the tensorrt default).")
    ] = None,
    attention: Annotated[Optional[Attention], typer.Option(
        help="onnx decode-step attention: plain (standard ONNX, every runtime; the default) or gqa (ONNX "
             "Runtime's GroupQueryAttention: in-place prefix-only attention and only the needed head half; fp32, "
             "ONNX Runtime only).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device to build and validate on (aoti: cpu or cuda).")] = "cpu",
    skip_validation: Annotated[bool, typer.Option("--skip-validation", help="Do not check graphs against eager.")] = False,
    from_onnx: Annotated[Optional[Path], typer.Option(
        help="tensorrt: build from this verified ONNX artifacts folder (no checkpoints needed).")] = None,
    workspace_mib: Annotated[int, typer.Option(min=16, help="tensorrt: builder workspace limit, MiB.")] = 4096,
    opt_level: Annotated[int, typer.Option(min=0, max=5, help="tensorrt: builder optimisation level.")] = 3,
    timing_cache: Annotated[Optional[str], typer.Option(
        help="tensorrt: timing cache file, reused across builds ('' turns it off; default ~/.cache/hita/).")] = None,
    hardware_compat: Annotated[HardwareCompat, typer.Option(
        help="tensorrt: GPUs the engines may run on besides this one's compute capability.")] = HardwareCompat.none,
    version_compatible: Annotated[bool, typer.Option(
        "--version-compatible", help="tensorrt: engines later TensorRT versions can run.")] = False,
    max_batch: Annotated[int, typer.Option(min=1, max=4096,
                                           help="Largest rows per call in the graphs' profiles (CFG rows count).")] = 16,
    expect_manifest_sha256: Annotated[Optional[str], typer.Option(
        help="--from-onnx: pin the ONNX folder's manifest (sha256 of its manifest.json).")] = None,
    row_positions: Annotated[bool, typer.Option(
        "--row-positions", help="Decode step takes one position per row (position [batch]): what `hita serve` "
                                "needs to batch requests in flight. The C++ host feeds one position.")] = False,
    kv_cache: Annotated[Optional[KvCache], typer.Option(
        help="Quantized KV cache (int8 or fp8): refused with what the runtimes lack (see README, Quantized exports).")
    ] = None,
    from_artifacts: Annotated[Optional[Path], typer.Option(
        help="triton: serve this exported folder (onnx, aoti or tensorrt) instead of exporting ONNX now.")] = None,
) -> None:
    """Export the tokenizer decoder, GPT prefill and GPT decode step, with a manifest."""
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.config import check_pair
    from hita.export.manifest import check_output_folder, manifest_sha256
    from hita.runtimes.factory import check_device

    if engine is Engine.trt:
        engine = Engine.tensorrt
    if kv_cache is not None:
        from hita.calibration.recipes import kv_cache_refusal

        raise ValueError(kv_cache_refusal(kv_cache.value))
    if from_artifacts is not None and engine is not Engine.triton:
        raise ValueError("--from-artifacts puts an exported folder into a Triton repository; use it with --engine triton")
    if engine is Engine.triton:
        _export_triton(out, from_artifacts, gpt, tokenizer, device, max_batch,
                       dict(precision=precision is not ExportPrecision.fp32, calibration=calibration is not None,
                            from_onnx=from_onnx is not None, kv_write=kv_write is not None,
                            attention=attention is not None))
        return
    _check_attention(attention, engine, precision, kv_write, from_onnx, expect_manifest_sha256)
    if precision.quantized or calibration is not None or calibrator is not None:
        _export_quantized(out, engine, precision, calibration, calibrator, from_onnx, gpt, tokenizer, gpt_preset,
                          tokenizer_preset, pos128, opset, kv_write, skip_validation, max_batch, device,
                          (attention or Attention.plain).value)
        return
    if engine is Engine.tensorrt:
        _export_tensorrt(out, from_onnx, gpt, tokenizer, gpt_preset, tokenizer_preset, precision, pos128,
                         skip_validation, max_batch, kv_write, row_positions,
                         dict(workspace_mib=workspace_mib, optimization_level=opt_level, timing_cache=timing_cache,
                              hardware_compat=hardware_compat.value, version_compatible=version_compatible),
                         expect_manifest_sha256)
        return
    if from_onnx is not None:
        raise ValueError("--from-onnx builds TensorRT engines; use it with --engine tensorrt")
    if engine is Engine.onnx and device != "cpu":
        raise ValueError("ONNX graphs are exported and validated on the CPU; drop --device (ONNX Runtime picks "
                         "the GPU at run time)")
    if kv_write is not None and engine is Engine.aoti:
        raise ValueError("--kv-write applies to ONNX and TensorRT exports; drop it or use --engine onnx")
    check_output_folder(out)  # before loading anything: never replace a folder hita did not write
    check_device(device)
    gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
    tok = load_tokenizer(tok_path, tokenizer_preset, device=device)
    g = load_gpt(gpt_path, gpt_preset, device=device)
    check_pair(tok.cfg, g.cfg)
    sources = {"gpt": gpt_path, "tokenizer": tok_path}
    if engine is Engine.onnx:
        from hita.export.onnx import export_onnx

        export_onnx(g, tok, out, opset=opset, pos128=pos128.value, dtype=precision.dtype,
                    validate=not skip_validation, checkpoints=sources, kv_write=(kv_write or KvWrite.scatter).value,
                    max_batch=max_batch, row_positions=row_positions, attention=(attention or Attention.plain).value)
    else:
        from hita.export.aoti import export_aoti

        export_aoti(g, tok, out, device=device, pos128=pos128.value, dtype=precision.dtype,
                    validate=not skip_validation, checkpoints=sources, max_batch=max_batch, row_positions=row_positions)
    typer.echo(f"wrote {out} ({engine.value}; {g.cfg.name} + {tok.cfg.name}, {precision.value}, pos128={pos128.value})")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256)")


def _check_attention(attention, engine, precision, kv_write, from_onnx, expect_manifest_sha256) -> None:
    """``--attention``: the combinations that cannot work, refused in one line before any work."""
    if engine is Engine.tensorrt and from_onnx is not None:
        from hita.export.trt_support import refuse_contrib_attention

        refuse_contrib_attention(from_onnx, expect_manifest_sha256)  # a gqa folder: before TensorRT is needed
    if attention is not Attention.gqa:
        if attention is not None and engine is Engine.aoti:
            raise ValueError("--attention applies to ONNX exports; drop it for --engine aoti")
        return
    if engine is not Engine.onnx:
        raise ValueError(f"--attention gqa is an ONNX Runtime contrib op that {engine.value} cannot run; use "
                         "--engine onnx (or --attention plain)")
    if precision.quantized and precision.value not in ("int8-weight", "int4-weight"):
        raise ValueError(f"--precision {precision.value} (Q/DQ, for TensorRT) quantizes the plain graph; drop "
                         "--attention gqa (weight-only int8-weight / int4-weight work with it)")
    if precision is not ExportPrecision.fp32 and not precision.quantized:
        raise ValueError(f"--attention gqa exports fp32 only (ONNX Runtime's CPU GroupQueryAttention has no "
                         f"{precision.value} kernel); drop --precision {precision.value} or use --attention plain")
    if kv_write is not None:
        raise ValueError(f"--attention gqa writes the cache inside GroupQueryAttention; drop --kv-write "
                         f"{kv_write.value} (TensorScatter is for TensorRT, which needs --attention plain)")


def _export_quantized(out, engine, precision, calibration, calibrator, from_onnx, gpt, tokenizer, gpt_preset,
                      tokenizer_preset, pos128, opset, kv_write, skip_validation, max_batch, device,
                      attention="plain") -> None:
    """``--precision int8-weight|int4-weight|int8|fp8``: an fp32 ONNX export (made now, or --from-onnx)
    quantized by the recipe (``hita.calibration.export``); every option checked before any work."""
    from hita.calibration.export import export_quantized
    from hita.calibration.recipes import recipe
    from hita.export.manifest import check_output_folder, manifest_sha256

    if not precision.quantized:
        raise ValueError(f"--calibration and --calibrator apply to quantized precisions (int8-weight, int4-weight, "
                         f"int8, fp8), not {precision.value}")
    if engine is not Engine.onnx:
        fix = ("build engines from it with `--engine tensorrt --from-onnx DIR`" if engine is Engine.tensorrt
               else "AOTInductor has no quantized path here")
        raise ValueError(f"--precision {precision.value} makes an ONNX folder: run `hita export --engine onnx "
                         f"--precision {precision.value}`; {fix}")
    if skip_validation:
        raise ValueError("quantized exports always check their graphs against fp32; drop --skip-validation")
    if device != "cpu":
        raise ValueError("ONNX graphs are quantized and checked on the CPU; drop --device")
    rec = recipe(precision.value)
    rec.check_calibrator(None if calibrator is None else calibrator.value)
    if rec.needs_calibration and calibration is None:
        raise ValueError(f"--precision {rec.name} calibrates activations: pass --calibration SET (collect one with "
                         "`hita calibrate --out SET`, same --gpt/--tokenizer)")
    check_output_folder(out)  # before loading anything
    common = dict(calibration=calibration, calibrator=None if calibrator is None else calibrator.value)
    if from_onnx is not None:
        if gpt is not None or tokenizer is not None:
            raise ValueError("--from-onnx quantizes that fp32 ONNX folder; drop --gpt/--tokenizer")
        export_quantized(out, rec.name, from_onnx=from_onnx, **common)
    else:
        from hita.checkpoint import load_gpt, load_tokenizer
        from hita.config import check_pair

        gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
        tok = load_tokenizer(tok_path, tokenizer_preset)
        g = load_gpt(gpt_path, gpt_preset)
        check_pair(tok.cfg, g.cfg)
        export_quantized(out, rec.name, gpt=g, tokenizer=tok, checkpoints={"gpt": gpt_path, "tokenizer": tok_path},
                         opset=opset, pos128=pos128.value, kv_write=(kv_write or KvWrite.scatter).value,
                         max_batch=max_batch, attention=attention, **common)
    typer.echo(f"wrote {out} (onnx, {rec.name}: {rec.runtime_note})")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256)")


def _export_tensorrt(out, from_onnx, gpt, tokenizer, gpt_preset, tokenizer_preset, precision, pos128,
                     skip_validation, max_batch, kv_write, row_positions, builder, expect_manifest_sha256=None) -> None:
    """``--engine tensorrt``: everything checked (options, output folder, GPU, TensorRT) before any work."""
    from hita.export.manifest import check_output_folder, manifest_sha256
    from hita.export.tensorrt import TensorRTOptions, build_from_onnx, export_tensorrt
    from hita.util.gpu import gpu_facts, import_tensorrt

    options = TensorRTOptions(**builder, kv_write=(kv_write or KvWrite.tensorscatter).value)
    check_output_folder(out)
    import_tensorrt()
    gpu_facts()
    if from_onnx is not None:
        if gpt is not None or tokenizer is not None:
            raise ValueError("--from-onnx builds from the ONNX folder; drop --gpt/--tokenizer")
        if row_positions:
            raise ValueError("--from-onnx keeps the ONNX folder's decode step; export that folder with --row-positions")
        build_from_onnx(from_onnx, out, options=options, expect_manifest_sha256=expect_manifest_sha256)
    else:
        from hita.checkpoint import load_gpt, load_tokenizer
        from hita.config import check_pair

        gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
        tok = load_tokenizer(tok_path, tokenizer_preset, device="cuda")
        g = load_gpt(gpt_path, gpt_preset, device="cuda")
        check_pair(tok.cfg, g.cfg)
        export_tensorrt(g, tok, out, options=options, pos128=pos128.value, dtype=precision.dtype,
                        validate=not skip_validation, max_batch=max_batch,
                        checkpoints={"gpt": gpt_path, "tokenizer": tok_path},
                        spec_options={"row_positions": row_positions})
    typer.echo(f"wrote {out} (tensorrt)")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256; engines are code)")


def _export_triton(out, from_artifacts, gpt, tokenizer, device, max_batch, other_options) -> None:
    """``--engine triton``: a standalone Triton model repository (``hita.serving.repository``)."""
    from hita.serving.repository import export_repository

    used = [name for name, given in other_options.items() if given]
    if used:
        flag = "--" + used[0].replace("_", "-")
        raise ValueError(f"{flag} does not apply to --engine triton: export the folder you want served first "
                         "(any engine, precision or recipe), then pass it as --from-artifacts DIR")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device for --engine triton is where the server runs the model: cpu or cuda, got {device!r}")
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    settings = export_repository(out, artifacts=from_artifacts, gpt=gpt, tokenizer=tokenizer, device=device,
                                 max_rows=max_batch, log=log)
    typer.echo(f"wrote Triton model repository {out} (model 'hita', {settings.runtime} on {device}, up to "
               f"{settings.max_rows} rows per step)")
    typer.echo(f"serve it with: tritonserver --model-repository {out}  (the Python that runs Triton's Python "
               "backend needs hita installed)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
