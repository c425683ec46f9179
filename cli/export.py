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
    kv_write: Annotated[KvWrite, typer.Option(
        help="ONNX decode-step cache write: scatter (ScatterElements, fastest in ONNX Runtime) or "
             "tensorscatter (opset 24 TensorScatter: TensorRT's in-place KV-cache update).")] = KvWrite.scatter,
    device: Annotated[str, typer.Option(help="Device to build and validate on (aoti: cpu or cuda).")] = "cpu",
    skip_validation: Annotated[bool, typer.Option("--skip-validation", help="Do not check graphs against eager.")] = False,
) -> None:
    """Export the tokenizer decoder, GPT prefill and GPT decode step, with a manifest."""
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.config import check_pair
    from hita.export.manifest import check_output_folder, manifest_sha256
    from hita.runtimes.factory import check_device

    if engine is Engine.tensorrt:
        raise ValueError(
            "the tensorrt engine builder is not available in this release (TensorRT cannot be installed "
            "on our machines); export --engine onnx and build with trtexec on the target GPU"
        )
    if engine is Engine.onnx and device != "cpu":
        raise ValueError("ONNX graphs are exported and validated on the CPU; drop --device (ONNX Runtime picks "
                         "the GPU at run time)")
    if kv_write is KvWrite.tensorscatter and engine is not Engine.onnx:
        raise ValueError("--kv-write applies to ONNX exports; drop it or use --engine onnx")
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
                    validate=not skip_validation, checkpoints=sources, kv_write=kv_write.value)
    else:
        from hita.export.aoti import export_aoti

        export_aoti(g, tok, out, device=device, pos128=pos128.value, dtype=precision.dtype,
                    validate=not skip_validation, checkpoints=sources)
    typer.echo(f"wrote {out} ({engine.value}; {g.cfg.name} + {tok.cfg.name}, {precision.value}, pos128={pos128.value})")
    typer.echo(f"manifest sha256 {manifest_sha256(out)} (pin it: --expect-manifest-sha256)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
