"""`hita extract-codes`: tokenize a data set once with a frozen tokenizer, for `hita train gpt --codes`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from hita.cli.common import progress_enabled, user_errors


@user_errors
def extract_codes(
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Frozen tokenizer weights.")],
    data: Annotated[str, typer.Option("--data", help="'fashion-mnist', a folder of its IDX files, or an image folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output codes file (.safetensors).")],
    tokenizer_preset: Annotated[Optional[str], typer.Option(help="Tokenizer preset, for released files only.")] = None,
    backbone: Annotated[Optional[Path], typer.Option(help="Local DINOv2 weights, for tokenizers with a backbone.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per tokenizer batch.")] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Also store each image's horizontal flip.")] = True,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N images.")] = None,
) -> None:
    """Tokenize a data set once; GPT training then reads the codes instead of running the tokenizer."""
    from hita.train.codes import extract_codes as run

    path = run(tokenizer, data, out, preset=tokenizer_preset, backbone=None if backbone is None else str(backbone),
               batch_size=batch_size, device=device, flip=flip, limit=limit, progress=progress_enabled())
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("extract-codes")(extract_codes)
