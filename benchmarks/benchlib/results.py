"""Result records: one :class:`Row` per runtime and batch, and the ratios derived from them.

Targets (``2x eager``, ``within 1.3x of the floor``) are judged by a reader from these ratios and
written up in ``benchmarks/RESULTS.md``; nothing here (or in the tests) asserts a speed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .machine import Machine

SCHEMA = "hita-bench-decode/1"  # bump when a JSON field changes meaning or disappears


@dataclass
class Row:
    """One table row: a runtime at one batch, measured or unavailable (``error`` says why).

    Times are milliseconds. ``step_ms`` is one token of the shared loop (``decode_one_token`` +
    ``sample``); ``forward_ms`` the executor's ``decode`` call alone inside it.
    """

    runtime: str
    images: int
    rows: int
    cfg: bool
    error: str | None = None
    step_ms: float | None = None  # median over the timed positions of each position's median repeat
    step_ms_min: float | None = None
    step_ms_p90: float | None = None
    spread: float | None = None  # median over positions of (max - min) / median of the repeats
    forward_ms: float | None = None  # the executor's decode call alone, same statistic as step_ms
    prefill_ms: float | None = None  # start + position 0 + the first draw
    decode_image_ms: float | None = None  # the tokenizer decoder on the whole batch
    floor_ms: float | None = None  # mean roofline floor over the timed positions
    x_eager: float | None = None  # eager step_ms / this step_ms (the speed-up)
    x_floor: float | None = None  # this step_ms / floor_ms
    images_per_s: float | None = None
    max_abs_diff_vs_eager: float | None = None  # largest |logits - eager| over the timed steps
    tokens_equal_eager: bool | None = None  # every drawn token equal to eager's draw
    top1_vs_eager: float | None = None  # share of (position, row) whose argmax is eager's (teacher-forced)
    kl_vs_eager: float | None = None  # mean KL(eager || this) of the guided distributions at the timed steps
    other_load: float | None = None  # CPU share of other processes while this batch was timed
    note: str | None = None  # how this row was measured, when it differs from the others
    per_position_ms: dict[int, float] = field(default_factory=dict)

    @property
    def batch_label(self) -> str:
        return f"{self.images}{'+CFG' if self.cfg else ''}"

    def add_ratios(self, eager: "Row | None", floor_ms: float, seq_len: int) -> None:
        """Fill the floor, the ratios and images/s: a whole image is the prefill, ``seq_len - 1``
        loop steps and the tokenizer decoder."""
        if self.step_ms is None:
            return
        self.floor_ms = floor_ms
        self.x_floor = self.step_ms / floor_ms
        if eager is not None and eager.step_ms is not None:
            self.x_eager = eager.step_ms / self.step_ms
        total_ms = (seq_len - 1) * self.step_ms + (self.prefill_ms or 0.0) + (self.decode_image_ms or 0.0)
        self.images_per_s = self.images / (total_ms / 1e3)


@dataclass
class BenchResult:
    """Everything one run measured (``--json`` writes :meth:`to_dict`)."""

    preset: str
    tokenizer: str
    seq_len: int
    positions: list[int]
    repeats: int
    sampling: dict[str, Any]  # the loop's options (cfg_scale is per batch: 1 without CFG)
    machine: Machine
    rows: list[Row]
    seconds: float = 0.0
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
