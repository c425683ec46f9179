"""`hita generate`: class-conditional images through any runtime, as PNG files and a grid."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import (
    CFG_INTERVAL_OPT, CFG_SCALE_OPT, Pos128, Precision, SEED_OPT,
    TEMPERATURE_OPT, TOP_K_OPT, TOP_P_OPT, progress_enabled, user_errors,
)
from hita.jobs.sources import resolve_checkpoints
from hita.runtimes.factory import ARTIFACT_RUNTIMES, Runtime

GPT_OPT = Annotated[Optional[Path], typer.Option("--gpt", help="GPT checkpoint (.pt or .safetensors). Default: the embedded model.")]
TOK_OPT = Annotated[Optional[Path], typer.Option("--tokenizer", help="Tokenizer checkpoint. Default: the embedded model.")]
ART_OPT = Annotated[Optional[Path], typer.Option("--artifacts", help="Folder made by `hita export` (artifact runtimes).")]
PIN_OPT = Annotated[Optional[str], typer.Option(
    "--expect-manifest-sha256", help="Run only the export whose manifest.json has this sha256 (`hita export` prints it).")]


@user_errors
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output folder for PNGs and grid.png.")] = Path("out/generate"),
    runtime: Annotated[Runtime, typer.Option(help="Step executor.")] = Runtime.torch,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    artifacts: ART_OPT = None,
    classes: Annotated[Optional[str], typer.Option(help="Class ids, e.g. 1,2,5-7. Default: every class of a small model.")] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Images per class id.")] = 1,
    cfg_scale: CFG_SCALE_OPT = 1.5,
    cfg_interval: CFG_INTERVAL_OPT = -1,
    temperature: TEMPERATURE_OPT = 1.0,
    top_k: TOP_K_OPT = 0,
    top_p: TOP_P_OPT = 1.0,
    seed: SEED_OPT = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (CFG doubles the rows).")] = 8,
    precision: Annotated[Optional[Precision], typer.Option(help="GPT precision (torch runtime; default fp32).")] = None,
    pos128: Annotated[Optional[Pos128], typer.Option(help="Embedding rule at position 128 (torch runtime; default reference).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    resize: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Resize outputs (bicubic), e.g. 256 as the reference evaluates.")] = None,
    expect_manifest_sha256: PIN_OPT = None,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="torch runtime on CUDA: replay the decode step as one CUDA graph.")] = False,
) -> None:
    """Generate class-conditional images (one PNG each, plus grid.png)."""
    from hita.jobs.generate import check_output_dir, generate_to_dir, parse_classes
    from hita.runtimes.factory import check_device, make_executor
    from hita.runtimes.sampling import SamplingOptions

    # Everything the user set is checked before a model is loaded.
    opts = SamplingOptions(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
    check_device(device)
    if classes is not None:
        parse_classes(classes, 2**62, per_class)  # syntax and size; ids are checked against the model below
    names = None
    if runtime in ARTIFACT_RUNTIMES:
        if gpt is not None or tokenizer is not None:
            raise ValueError(f"--runtime {runtime.value} runs --artifacts; --gpt/--tokenizer are for the torch runtime")
        if precision is not None or pos128 is not None:
            raise ValueError(f"--precision and --pos128 were fixed at export; --runtime {runtime.value} reads them "
                             "from the artifacts' manifest (drop them, or re-export)")
        if artifacts is None:
            raise ValueError(f"the {runtime.value} runtime needs --artifacts DIR (made by `hita export`)")
        if cuda_graphs:
            raise ValueError("--cuda-graphs applies to --runtime torch (the tensorrt runtime replays its own graphs)")
        check_output_dir(out, kind="generate")
        ex = make_executor(runtime, artifacts=artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
    else:
        if artifacts is not None:
            raise ValueError("--artifacts runs with an artifact runtime (--runtime onnxruntime or aoti); "
                             "the torch runtime runs --gpt/--tokenizer checkpoints")
        if expect_manifest_sha256 is not None:
            raise ValueError("--expect-manifest-sha256 pins an artifacts folder; the torch runtime runs checkpoints")
        gpt, tokenizer, names = resolve_checkpoints(gpt, tokenizer)
        check_output_dir(out, kind="generate")
        ex = make_executor(runtime, gpt=gpt, tokenizer=tokenizer, device=device,
                           dtype=(precision or Precision.fp32).dtype, pos128=(pos128 or Pos128.reference).value,
                           cuda_graphs=cuda_graphs)
    n_classes = ex.gpt_config.num_classes
    if classes is None:
        if n_classes > 100:
            raise ValueError(f"pass --classes (this GPT has {n_classes} classes), e.g. --classes 0,1,2")
        classes = f"0-{n_classes - 1}"
    ids = parse_classes(classes, n_classes, per_class)
    res = generate_to_dir(ex, ids, opts, out, batch_size=batch_size, resize=resize, class_names=names,
                          progress=progress_enabled())
    typer.echo(f"wrote {len(res.pngs)} PNGs and {res.grid} ({res.seconds:.1f}s, runtime {runtime.value})")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
