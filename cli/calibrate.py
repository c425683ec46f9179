"""`hita calibrate`: collect a calibration set from sampling runs, or report what quantization costs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from hita.cli.common import Pos128, progress_enabled, user_errors
from hita.cli.generate import GPT_OPT, TOK_OPT


@user_errors
def calibrate(
    out: Annotated[Path, typer.Option(
        "--out", help="The set's file (.safetensors); with --report, the report folder.")],
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    preset: Annotated[str, typer.Option(
        help="Collection preset: ci, default or gpt-b (options below override it).")] = "default",
    images: Annotated[Optional[int], typer.Option(min=1, help="Images to sample.")] = None,
    batch_images: Annotated[Optional[int], typer.Option(min=1, help="Images per run (CFG doubles the rows); "
                                                        "every run has this shape.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class ids to cycle through, e.g. 0-9 (default: all).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the shared noise stream.")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(help="Guidance scale of the runs (1 = no CFG rows).")] = None,
    max_mib: Annotated[Optional[int], typer.Option(min=1, help="Size budget of the set, MiB.")] = None,
    pos128: Annotated[Pos128, typer.Option(
        help="Embedding rule at position 128 (must match the export).")] = Pos128.reference,
    report: Annotated[bool, typer.Option(
        "--report", help="Report quantized --artifacts against fp32 eager instead.")] = False,
    artifacts: Annotated[Optional[List[Path]], typer.Option(
        "--artifacts", help="--report: a quantized ONNX folder (repeat for several recipes).")] = None,
    per_class: Annotated[Optional[int], typer.Option(
        min=0, help="--report: free-run images per class for the classifier accuracy (default: enough for a "
                    "verdict, 5000 in all; fewer are reported as indicative; 0 skips it).")] = None,
    classifier: Annotated[Optional[Path], typer.Option(
        help="--report: classifier file judging the classes (default: the one shipped with the embedded model).")] = None,
) -> None:
    """Record the decode-step inputs and token grids of the generator's own sampling runs (a
    calibration set for `hita export --precision int8|fp8 --calibration SET`), or with --report
    compare quantized exports with fp32 (JSON, table, image grid)."""
    from hita.jobs.generate import parse_classes

    if report:
        _report(out, gpt, tokenizer, classes, seed, cfg_scale, artifacts or [], per_class, classifier,
                dict(images=images, batch_images=batch_images, max_mib=max_mib))
        return
    for flag, given in (("--artifacts", artifacts), ("--per-class", per_class is not None),
                        ("--classifier", classifier is not None)):
        if given:
            raise ValueError(f"{flag} is for --report; to collect a set give --gpt/--tokenizer (or neither)")
    from hita.calibration.collect import collect
    from hita.calibration.dataset import check_writable
    from hita.calibration.options import MiB, CollectOptions
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.jobs.sources import resolve_checkpoints

    ids = None if classes is None else tuple(dict.fromkeys(parse_classes(classes, 2**62)))
    options = CollectOptions.from_name(preset).with_changes(
        images=images, batch_images=batch_images, classes=ids, seed=seed, cfg_scale=cfg_scale,
        max_bytes=None if max_mib is None else max_mib * MiB)
    check_writable(out)                                  # before any model loads
    gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
    tok = load_tokenizer(tok_path)
    g = load_gpt(gpt_path)
    rows = options.batch_images * (2 if options.sampling().use_cfg else 1)
    typer.echo(f"sampling {options.images} images ({options.batches} runs of {rows} rows, all "
               f"{g.cfg.seq_len} positions) with the eager executor", err=True)
    path = collect(g, tok, out, options, pos128=pos128.value, progress=progress_enabled(),
                   checkpoints={"gpt": gpt_path, "tokenizer": tok_path})
    typer.echo(f"wrote {path} ({path.stat().st_size / MiB:.1f} MiB; {options.images} images, {options.name} preset)")


def _report(out, gpt, tokenizer, classes, seed, cfg_scale, artifacts, per_class, classifier, collect_only) -> None:
    from hita.calibration.report import accuracy_report
    from hita.export.manifest import load_manifest
    from hita.jobs.generate import check_output_dir, parse_classes

    given = [f"--{k.replace('_', '-')}" for k, v in collect_only.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set what a calibration set collects; drop them with --report")
    if not artifacts:
        raise ValueError("--report needs --artifacts DIR (a quantized ONNX folder; repeat it for several recipes)")
    check_output_dir(out)
    num_classes = load_manifest(artifacts[0], verify_files=False).gpt_cfg.num_classes
    ids = parse_classes(classes, num_classes) if classes is not None else list(range(min(num_classes, 8)))
    result = accuracy_report(artifacts, out, ids, gpt=gpt, tokenizer=tokenizer, seed=0 if seed is None else seed,
                             cfg_scale=1.5 if cfg_scale is None else cfg_scale, per_class=per_class,
                             classifier=classifier, progress=True)
    typer.echo((out / "report.md").read_text().rstrip())
    typer.echo(f"report: {out / 'report.json'}, grid: {out / 'grid.png'}")
    failed = [r["recipe"] for r in result["results"] if not r["ok"]]
    if failed:
        from hita.cli.common import EXIT_CHECK_FAILED, fail

        fail(f"{', '.join(failed)} past the recipe thresholds (see the table); recalibrate with more images or "
             "another --calibrator, or use a wider recipe", EXIT_CHECK_FAILED)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
