"""`hita parity`: prove an artifacts folder matches eager PyTorch (logits, tokens, pixels)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import SEED_OPT, user_errors
from hita.cli.generate import GPT_OPT, PIN_OPT, TOK_OPT


@user_errors
def parity(
    artifacts: Annotated[Path, typer.Option("--artifacts", help="Folder made by `hita export`.")],
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    classes: Annotated[str, typer.Option(help="Class ids to run.")] = "0,1",
    seed: SEED_OPT = 0,
    cfg_scale: Annotated[float, typer.Option(help="CFG scale for the free-running check.")] = 1.5,
    max_logit_diff: Annotated[Optional[float], typer.Option(
        help="Fail above this teacher-forced |dlogit| (default 1e-4; quantized folders: not checked).")] = None,
    min_token_agreement: Annotated[Optional[float], typer.Option(
        help="Fail below this free-running agreement (default 1; quantized: the recipe's).")] = None,
    min_psnr: Annotated[Optional[float], typer.Option(
        help="Fail below this decoded-image PSNR, dB (default 60; quantized: the recipe's).")] = None,
    max_mean_kl: Annotated[Optional[float], typer.Option(
        help="Fail above this mean per-step KL(fp32 || runtime) (default: the recipe's, quantized folders).")] = None,
    min_top1: Annotated[Optional[float], typer.Option(
        help="Fail below this teacher-forced top-1 agreement (default: the recipe's for quantized folders).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
    expect_manifest_sha256: PIN_OPT = None,
) -> None:
    """Compare a runtime with eager PyTorch and exit 3 when it is past the thresholds."""
    from hita.jobs.sources import eager_reference
    from hita.runtimes.factory import executor_for_artifacts
    from hita.jobs.generate import check_output_dir, parse_classes
    from hita.runtimes.parity import assert_parity, check_parity
    from hita.runtimes.sampling import SamplingOptions

    from hita.runtimes.parity import ParityThresholds
    from hita.util.files import check_output_file

    if json_out is not None and json_out.is_dir():
        raise ValueError(f"--json {json_out}: is a folder; give a file path such as {json_out / 'parity.json'}")
    if json_out is not None:
        check_output_dir(json_out.parent)
        check_output_file(json_out, "--json", owned=_our_report)
    given = dict(max_logit_diff=max_logit_diff, min_token_agreement=min_token_agreement, min_psnr_db=min_psnr,
                 max_mean_kl=max_mean_kl, min_top1_agreement=min_top1)
    ParityThresholds(**{k: v for k, v in given.items() if v is not None})  # bad limits refused before any work
    cand = executor_for_artifacts(artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
    ref = eager_reference(artifacts, gpt, tokenizer, device=device)
    ids = parse_classes(classes, cand.gpt_config.num_classes)
    th = _thresholds(artifacts, given)
    report = check_parity(ref, cand, ids, SamplingOptions(cfg_scale=cfg_scale, seed=seed), th)
    recipe = _recipe_name(artifacts)
    if recipe is not None:
        typer.echo(f"{artifacts}: {recipe} export, judged by the {recipe} recipe's thresholds against fp32 eager")
    typer.echo(report.summary())
    if json_out is not None:
        from hita.util.files import atomic_write

        atomic_write(json_out, lambda tmp: Path(tmp).write_text(report.to_json()))
    assert_parity(report)


def _our_report(path: Path) -> bool:
    """An earlier ``hita parity --json`` report (so re-running may replace it)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"reference", "candidate", "token_agreement"} <= set(data)


def _recipe_name(artifacts: Path) -> str | None:
    from hita.export.manifest import load_manifest

    q = load_manifest(artifacts, verify_files=False).options.get("quantization")
    return None if q is None else str(q.get("recipe"))


def _thresholds(artifacts: Path, given: dict):
    """fp32 defaults, or the quantization recipe's thresholds for a quantized folder; options the user
    gave win either way."""
    import dataclasses

    from hita.runtimes.parity import ParityThresholds

    name = _recipe_name(artifacts)
    if name is None:
        base = ParityThresholds()
    else:
        from hita.calibration.recipes import recipe

        try:
            base = recipe(name).thresholds
        except ValueError:
            raise ValueError(f"{artifacts}: quantized with recipe {name!r}, which this hita does not know; pass "
                             "--max-mean-kl/--min-top1/--min-psnr or re-export with this hita") from None
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def register(app: typer.Typer) -> None:
    app.command("parity")(parity)
