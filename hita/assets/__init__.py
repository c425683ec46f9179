"""The embedded default model: a small Hita (tokenizer + GPT) trained on Fashion-MNIST.

It lets `hita generate` and `hita demo` run offline on a fresh machine. How it was trained (the
exact commands) is in ``hita/assets/README.md``; the data's licence (Fashion-MNIST, MIT) too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DefaultModel:
    tokenizer: Path
    gpt: Path
    class_names: tuple[str, ...]


def default_model() -> DefaultModel:
    """Paths of the embedded default checkpoints; a clear error if the install lacks them."""
    tok, gpt, names = ASSETS / "tiny-tokenizer.safetensors", ASSETS / "tiny-gpt.safetensors", ASSETS / "classes.json"
    missing = [p.name for p in (tok, gpt, names) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded default model is missing ({', '.join(missing)}); reinstall hita, or pass "
            "--gpt and --tokenizer checkpoints"
        )
    return DefaultModel(tok, gpt, tuple(json.loads(names.read_text())))
