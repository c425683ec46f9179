"""What every runtime is fed: batches, the timed positions, class ids, tokens and sampling options.

All runtimes get the same calls, so their logits (and the tokens drawn from them) must agree; the
benchmark reports the largest difference to eager as a check that the numbers come from a working
graph.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hita.config import GPTConfig
from hita.runtimes.sampling import SamplingOptions

CFG_SCALE = 1.5  # any scale > 1 doubles the rows; the value itself does not change the cost


@dataclass(frozen=True)
class Batch:
    """``images`` images, with classifier-free guidance (a null-class row per image) unless ``cfg`` is off.

    CFG is the default because class-conditional generation uses it: one image is then two GPT rows.
    """

    images: int
    cfg: bool = True

    @property
    def rows(self) -> int:
        """Rows the GPT runs: ``2 * images`` with CFG."""
        return 2 * self.images if self.cfg else self.images

    @property
    def label(self) -> str:
        return f"{self.images}{'+CFG' if self.cfg else ''}"

    def options(self, seed: int) -> SamplingOptions:
        """The loop's sampling options for this batch (reference defaults: temperature 1, no top-k/p)."""
        return SamplingOptions(cfg_scale=CFG_SCALE if self.cfg else 1.0, seed=seed)


def make_batches(images: Iterable[int | str], cfg: bool = True) -> list[Batch]:
    """One :class:`Batch` per image count (``"8"`` or ``8``), all with or all without CFG.

    Raises:
        ValueError: a count that is not a whole number >= 1.
    """
    out = []
    for n in images:
        try:
            count = int(str(n).strip())
        except ValueError:
            raise ValueError(f"cannot read batch {n!r}; give numbers of images such as 1,8") from None
        if count < 1:
            raise ValueError(f"batch {n!r} must be at least 1 image")
        out.append(Batch(count, cfg))
    if not out:
        raise ValueError("no batches given; pass image counts such as --batches 1,8")
    return out


def spread_positions(cfg: GPTConfig, n: int) -> list[int]:
    """``n`` decode positions spread evenly over ``1 .. seq_len - 1``: holistic and patch positions,
    so both heads and short and long K/V prefixes are timed."""
    last = cfg.seq_len - 1
    if n >= last:
        return list(range(1, last + 1))
    if n == 1:
        return [(1 + last) // 2]
    return sorted({round(1 + i * (last - 1) / (n - 1)) for i in range(n)})


@dataclass(frozen=True)
class Inputs:
    """Seeded inputs for ``images`` images (the loop appends the CFG null rows itself).

    Fields:
        class_ids: int64 ``[n]`` real classes.
        tokens: position -> int64 ``[n]``, the token fed at that position (sequence index ``pos - 1``).
        holistic_ids, patch_ids: int64 ``[n, n_holistic]``, ``[n, n_patch]`` for the image decoder.
    """

    class_ids: torch.Tensor
    tokens: dict[int, torch.Tensor]
    holistic_ids: torch.Tensor
    patch_ids: torch.Tensor


def make_inputs(cfg: GPTConfig, images: int, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    class_ids = torch.randint(0, cfg.num_classes, (images,), generator=gen)                  # [n]
    tokens = {p: torch.randint(0, cfg.vocab_size, (images,), generator=gen) for p in range(1, cfg.seq_len)}
    holistic = torch.randint(0, cfg.vocab_size, (images, cfg.n_holistic), generator=gen)     # [n, n_holistic]
    patch = torch.randint(0, cfg.vocab_size, (images, cfg.n_patch), generator=gen)           # [n, n_patch]
    return Inputs(class_ids, tokens, holistic, patch)
