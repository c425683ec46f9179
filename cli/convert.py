"""`hita convert`: released `.pt` → the project's safetensors format (verified strictly first)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import user_errors


@user_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Released checkpoint (.pt) or one of ours.")],
    dst: Annotated[Path, typer.Argument(help="Output .safetensors path.")],
    preset: Annotated[Optional[str], typer.Option(help="Preset name; inferred from shapes when omitted.")] = None,
) -> None:
    """Convert a checkpoint into safetensors with its config in the metadata."""
    from hita.checkpoint import convert as do_convert

    kind, cfg = do_convert(src, dst, preset)
    typer.echo(f"wrote {dst} ({kind}, preset {cfg.name})")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
