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
    "demo", "generate", "export", "parity",
    "train", "codes",
    "convert", "build_cpp", "doctor",
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"hita.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
