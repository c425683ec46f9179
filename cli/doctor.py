"""`hita doctor`: one line per engine and runtime: here or not, and the fix."""
from __future__ import annotations

import typer

from hita.cli.common import user_errors


@user_errors
def doctor() -> None:
    """Print what each engine and runtime needs and whether this machine has it."""
    from hita.jobs.doctor import checks

    results = checks()
    width = max(len(c.what) for c in results)
    for c in results:
        line = f"{'ok ' if c.ok else 'no '} {c.what:<{width}}  {c.detail}"
        typer.echo(line + (f"\n    fix: {c.fix}" if c.fix else ""))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
