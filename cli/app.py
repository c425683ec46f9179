"""The `hita` command: thin typer commands over library functions.

Each command lives in its own module under ``hita.cli`` and exposes ``register(app)``; the modules
listed in ``COMMAND_MODULES`` are imported lazily-cheap (they must not import torch at module level
beyond what ``import hita`` already does) and attached to one app.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hita: train, export, generate and check parity of Hita tokenizers and GPTs.",
)

# One module per command (or command group); each defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES: tuple[str, ...] = (
    "demo", "generate", "export", "parity", "calibrate",
    "train", "codes",
    "convert", "build_cpp", "doctor",
    "evaluate", "edit",
    "serve", "client",
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"hita.cli.{_name}").register(app)


def main() -> None:
    """Entry point: option parsing errors become one ``error:`` line too (exit 2), not a usage box."""
    import sys

    from typer.exceptions import Abort

    try:  # typer 0.29 vendors click; older typer uses the click package
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    from hita.cli.common import printable

    try:
        code = app(standalone_mode=False)
    except UsageError as e:
        message = e.format_message().strip().rstrip(".")
        if message:  # (bare `hita` prints the help and exits 2 with nothing more to say)
            cmd = e.ctx.command_path if e.ctx is not None else "hita"
            print(f"error: {printable(message)}; see `{cmd} --help`", file=sys.stderr)
        raise SystemExit(2) from None
    except Abort:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
