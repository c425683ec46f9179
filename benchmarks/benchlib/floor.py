"""The roofline floor of one decode step: what it must read and compute, over what the machine can do.

``floor = max(bytes / read bandwidth, FLOPs / matmul rate)`` with both rates measured in the same run
(:mod:`.machine`). A runtime at the floor could only get faster by reading fewer bytes (smaller
weights, less cache) or doing less arithmetic, not by better scheduling.

The floor covers the GPT forward. The loop step that the benchmark times also mixes CFG and draws a
token; that reads the ``[rows, V]`` logits a few times (about 1.5 MB for 16 GPT-B rows, against
hundreds of MB of weights), so leaving it out keeps the floor a lower bound without changing it.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from hita.config import GPTConfig


@dataclass(frozen=True)
class StepCost:
    """What one decode step of ``rows`` rows at position ``pos`` must read (bytes) and compute."""

    weight_bytes: int
    kv_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def floor_s(self, read_gbs: float, gflops: float) -> float:
        return max(self.bytes / (read_gbs * 1e9), self.flops / (gflops * 1e9))


def matmul_params(cfg: GPTConfig) -> int:
    """Weights multiplied per row in one decode step: every layer's projections + the 2V head
    (the decode graph computes both heads and selects by position, so both are read)."""
    d = cfg.dim
    per_layer = 4 * d * d + 3 * d * cfg.ffn_hidden  # wqkv (3d*d) + wo (d*d) + w1, w3, w2 (d*f each)
    return cfg.n_layer * per_layer + 2 * cfg.vocab_size * d


def step_cost(cfg: GPTConfig, rows: int, pos: int, elem_bytes: int = 4) -> StepCost:
    """Bytes read and FLOPs of ``HitaGPT.decode`` for ``rows`` rows at position ``pos``.

    Weights: all matmul weights (read once for all rows), the 2 RMSNorm vectors per layer and the
    final one, the gathered rows of both input tables (the graph embeds with both and selects) and
    one ``slot_pos`` row. KV: keys and values of positions ``0..pos`` in every layer (the ideal; the
    static-cache graphs read all ``cache_len`` slots under a mask, which the floor does not forgive).
    FLOPs: ``2 * params * rows`` for the matmuls plus ``4 * dim * (pos + 1)`` per row and layer for
    the scores and the weighted sum.
    """
    d, L = cfg.dim, cfg.n_layer
    weights = matmul_params(cfg) + (2 * L + 1) * d + 2 * rows * d + d
    kv = 2 * L * rows * d * (pos + 1)                                         # k and v, [L, rows, pos+1, d]
    flops = 2 * matmul_params(cfg) * rows + 4 * L * rows * d * (pos + 1)
    return StepCost(weights * elem_bytes, kv * elem_bytes, flops)


def floor_ms(cfg: GPTConfig, rows: int, positions: Sequence[int], read_gbs: float, gflops: float) -> float:
    """Mean floor in milliseconds over ``positions`` (the K/V part grows with the position)."""
    return 1e3 * statistics.fmean(step_cost(cfg, rows, p).floor_s(read_gbs, gflops) for p in positions)


def bandwidth_buffer_bytes(cfg: GPTConfig, rows: int, pos: int, cap: int = 2**30) -> int:
    """Buffer size for the bandwidth measurement: the bytes of the smallest timed step (``rows``
    and ``pos`` the smallest), at most ``cap``. Measured over that working set, the rate is the one
    the fastest step could stream at (cache for a small model, DRAM for a large one); above ``cap``
    (1 GiB, far past any last-level cache) the rate no longer changes, only the allocation grows."""
    return min(step_cost(cfg, rows, pos).bytes, cap)
