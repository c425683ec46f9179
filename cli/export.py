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


class Engine(str, Enum):
    onnx = "onnx"
    aoti = "aoti"
    tensorrt = "tensorrt"
    trt = "trt"  # alias of tensorrt


class HardwareCompat(str, Enum):
    none = "none"
    ampere = "ampere+"
    same_cc = "same-cc"


@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Artifacts folder to write (replaced atomically).")],
    engine: Annotated[Engine, typer.Option(help="What to build.")] = Engine.onnx,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    gpt_preset: Annotated[Optional[str], typer.Option(help="GPT preset (inferred from shapes when omitted).")] = None,
    tokenizer_preset: Annotated[Optional[str], typer.Option(help="Tokenizer preset (inferred when omitted).")] = None,
    precision: Annotated[Precision, typer.Option(help="GPT graph precision (the decoder stays fp32).")] = Precision.fp32,
    pos128: Annotated[Pos128, typer.Option(help="Embedding rule at position 128 baked into the decode step.")] = Pos128.reference,
    opset: Annotated[int, typer.Option(min=18, max=23, help="ONNX opset.")] = 18,
    kv_write: Annotated[Optional[KvWrite], typer.Option(
        help="Decode-step cache write: scatter (ScatterElements; the onnx default, fastest in ONNX Runtime) or "
             "tensorscatter (opset 24 TensorScatter: TensorRT's in-place KV-cache update; the tensorrt default).")
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
) -> None:
    """Export the tokenizer decoder, GPT prefill and GPT decode step, with a manifest."""
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.config import check_pair
    from hita.export.manifest import check_output_folder, manifest_sha256
    from hita.runtimes.factory import check_device

    if engine is Engine.trt:
        engine = Engine.tensorrt
    if engine is Engine.tensorrt:
        _export_tensorrt(out, from_onnx, gpt, tokenizer, gpt_preset, tokenizer_preset, precision, pos128,
                         skip_validation, max_batch, kv_write,
                         dict(workspace_mib=workspace_mib, optimization_level=opt_level, timing_cache=timing_cache,
                              hardware_compat=hardware_compat.value, version_compatible=version_compatible))
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
                    max_batch=max_batch)
    else:
        from hita.export.aoti import export_aoti

        export_aoti(g, tok, out, device=device, pos128=pos128.value, dtype=precision.dtype,
                    validate=not skip_validation, checkpoints=sources, max_batch=max_batch)
    typer.echo(f"wrote {out} ({engine.value}; {g.cfg.name} + {tok.cfg.name}, {precision.value}, pos128={pos128.value})")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256)")


def _export_tensorrt(out, from_onnx, gpt, tokenizer, gpt_preset, tokenizer_preset, precision, pos128,
                     skip_validation, max_batch, kv_write, builder) -> None:
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
        build_from_onnx(from_onnx, out, options=options)
    else:
        from hita.checkpoint import load_gpt, load_tokenizer
        from hita.config import check_pair

        gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
        tok = load_tokenizer(tok_path, tokenizer_preset, device="cuda")
        g = load_gpt(gpt_path, gpt_preset, device="cuda")
        check_pair(tok.cfg, g.cfg)
        export_tensorrt(g, tok, out, options=options, pos128=pos128.value, dtype=precision.dtype,
                        validate=not skip_validation, max_batch=max_batch,
                        checkpoints={"gpt": gpt_path, "tokenizer": tok_path})
    typer.echo(f"wrote {out} (tensorrt)")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256; engines are code)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
