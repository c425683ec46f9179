"""`hita parity`: prove an artifacts folder matches eager PyTorch (logits, tokens, pixels)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import user_errors
from hita.cli.generate import GPT_OPT, PIN_OPT, TOK_OPT


@user_errors
def parity(
    artifacts: Annotated[Path, typer.Option("--artifacts", help="Folder made by `hita export`.")],
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    classes: Annotated[str, typer.Option(help="Class ids to run.")] = "0,1",
    seed: Annotated[int, typer.Option(help="Seed of the shared noise stream.")] = 0,
    cfg_scale: Annotated[float, typer.Option(help="CFG scale for the free-running check.")] = 1.5,
    max_logit_diff: Annotated[float, typer.Option(help="Fail above this teacher-forced |dlogit|.")] = 1e-4,
    min_token_agreement: Annotated[float, typer.Option(help="Fail below this free-running agreement.")] = 1.0,
    min_psnr: Annotated[float, typer.Option(help="Fail below this decoded-image PSNR (dB).")] = 60.0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
    expect_manifest_sha256: PIN_OPT = None,
) -> None:
    """Compare a runtime with eager PyTorch and exit 3 when it is past the thresholds."""
    from hita.jobs.sources import eager_reference
    from hita.runtimes.factory import executor_for_artifacts
    from hita.jobs.generate import check_output_dir, parse_classes
    from hita.runtimes.parity import ParityThresholds, assert_parity, check_parity
    from hita.runtimes.sampling import SamplingOptions

    if json_out is not None and json_out.is_dir():
        raise ValueError(f"--json {json_out}: is a folder; give a file path such as {json_out / 'parity.json'}")
    if json_out is not None:
        check_output_dir(json_out.parent)
    cand = executor_for_artifacts(artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
    ref = eager_reference(artifacts, gpt, tokenizer, device=device)
    ids = parse_classes(classes, cand.gpt_config.num_classes)
    th = ParityThresholds(max_logit_diff, min_token_agreement, min_psnr)
    report = check_parity(ref, cand, ids, SamplingOptions(cfg_scale=cfg_scale, seed=seed), th)
    typer.echo(report.summary())
    if json_out is not None:
        from hita.util.files import atomic_write

        atomic_write(json_out, lambda tmp: Path(tmp).write_text(report.to_json()))
    assert_parity(report)


def register(app: typer.Typer) -> None:
    app.command("parity")(parity)
