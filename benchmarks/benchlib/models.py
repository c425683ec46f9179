"""The models a benchmark runs, as checkpoint files: seeded random weights of a GPT preset and of the
tokenizer preset that pairs with it.

Random weights, because a decode step's cost does not depend on the weight values and no download is
needed. Checkpoint files, because that is what users start from: the eager executor loads them through
the runtime factory and the exports record their sha256, which is how a later run knows that an
export in its workdir was made from exactly these weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hita.config import GPTConfig, TokenizerConfig, check_pair

HEAD_STD = 0.02  # the output head is zero at init (all logits 0); re-drawn so sampling sees real spreads


@dataclass(frozen=True)
class Checkpoints:
    """The two checkpoint files of one benchmark model, and their configs."""

    gpt: Path
    tokenizer: Path
    gpt_cfg: GPTConfig
    tokenizer_cfg: TokenizerConfig
    sha256: dict[str, str]  # {"gpt": ..., "tokenizer": ...}, as an export's manifest records them

    @property
    def sources(self) -> dict[str, Path]:
        """What the export driver's ``checkpoints=`` takes (hashed into the manifest)."""
        return {"gpt": self.gpt, "tokenizer": self.tokenizer}


def paired_tokenizer(gpt_cfg: GPTConfig) -> TokenizerConfig:
    """The first tokenizer preset whose token layout fits the GPT (``tiny`` -> ``tiny``, the released
    layout -> ``hita-v``): the decoder that turns this GPT's tokens into pixels.

    Raises:
        ValueError: no preset fits.
    """
    for tok in TokenizerConfig.PRESETS.values():
        try:
            check_pair(tok, gpt_cfg)
        except ValueError:
            continue
        return tok
    raise ValueError(f"no tokenizer preset fits GPT {gpt_cfg.name!r}")


def random_models(preset: str, seed: int):
    """Seeded random ``(gpt, tokenizer)`` for a GPT preset, eval mode, float32 (the global RNG is kept).

    ``tiny`` is :func:`hita.export.testing.tiny_models`; other presets follow the same recipe
    (seeded init, output head re-drawn with :data:`HEAD_STD`) with :func:`paired_tokenizer`.
    """
    if preset == "tiny":
        from hita.export.testing import tiny_models

        return tiny_models(seed)
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

    gpt_cfg = GPTConfig.from_name(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gpt = HitaGPT(gpt_cfg)
        with torch.no_grad():
            gpt.output.weight.normal_(0.0, HEAD_STD)
        tok = HitaTokenizer(paired_tokenizer(gpt_cfg))
    return gpt.eval(), tok.eval()


def write_checkpoints(preset: str, seed: int, folder: Path) -> Checkpoints:
    """``folder/gpt.safetensors`` and ``folder/tokenizer.safetensors`` holding :func:`random_models`
    ``(preset, seed)`` (``hita.checkpoint.save_model``, atomic), written only when the folder lacks
    them: safetensors files are not byte-reproducible (their metadata order varies), so keeping the
    files is what lets a later run's hashes match the exports recorded against them."""
    from hita.checkpoint import save_model
    from hita.util.files import file_sha256

    paths = {"gpt": folder / "gpt.safetensors", "tokenizer": folder / "tokenizer.safetensors"}
    gpt_cfg = GPTConfig.from_name(preset)
    tok_cfg = paired_tokenizer(gpt_cfg)
    if not all(p.is_file() for p in paths.values()):
        gpt, tok = random_models(preset, seed)
        save_model(gpt, gpt.cfg, paths["gpt"])
        save_model(tok, tok.cfg, paths["tokenizer"])
    return Checkpoints(paths["gpt"], paths["tokenizer"], gpt_cfg, tok_cfg,
                       sha256={k: file_sha256(p) for k, p in paths.items()})
