"""`hita demo`: the main job on the embedded default model (offline, CPU, under two minutes)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hita.cli.common import SEED_OPT, progress_enabled, user_errors


@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder (grid.png, cached ONNX export).")] = Path("out/demo"),
    per_class: Annotated[int, typer.Option(min=1, max=32, help="Images per class (grid columns).")] = 8,
    seed: SEED_OPT = 0,
) -> None:
    """Export the default model to ONNX, draw a labelled grid through ONNX Runtime, check parity."""
    from hita.jobs.demo import run_demo
    from hita.runtimes.parity import assert_parity

    res = run_demo(out, per_class=per_class, seed=seed, log=lambda s: typer.echo(s, err=True),
                   progress=progress_enabled())
    typer.echo(f"grid: {res.grid.resolve()} ({res.images} images, one row per class)")
    typer.echo(f"artifacts: {res.artifacts.resolve()} ({'exported' if res.exported else 'cached'})")
    typer.echo(f"parity: {res.parity.summary()}")
    typer.echo(f"done in {res.seconds:.1f}s")
    assert_parity(res.parity)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
