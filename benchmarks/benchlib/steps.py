"""The timed unit: one token of the shared decode loop, as ``hita.runtimes.loop`` runs it.

Per token the loop calls ``decode_one_token`` (executor forward, float32 cast, CFG mix) and then
``sample`` with that step's counter-based uniforms. Timing the executor call alone would leave out
work that every generated image pays for, so the step timed here is both. The forward alone is read
off inside the same calls (:class:`ForwardClock`), so the two figures never come from different runs.

Fairness on a shared machine: runtimes take turns in rounds (each turn a slice of the positions,
the order rotating per round), so load from other processes hits all of them alike. The first step
of a turn is not timed: it absorbs the wake-up of a thread pool that sat idle while another runtime
ran. Each position is timed ``repeats`` times (in passes over the turn's slice); the spread of those
repeats is the row's noise indicator.

The tokenizer decoder, which every image also pays for once, is timed once per batch after a
one-image warm-up: at the released size it takes seconds per image, so repeats would dominate the
run, and a call that long is not disturbed by a stray millisecond.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hita.config import GPTConfig
from hita.runtimes.loop import decode_one_token, prefill
from hita.runtimes.sampling import NoiseStream, SamplingOptions, sample
from hita.util.log import Log

from .results import Row
from .runtimes import EAGER, reason
from .stats import Summary, relative_range, time_calls
from .workload import Batch, make_inputs


class ForwardClock:
    """Executor wrapper that times its ``decode`` calls (the forward) while the caller times the
    whole loop step around them. Everything else is passed through to the executor."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.seconds = 0.0  # the last decode call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.executor, name)

    def decode(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = self.executor.decode(tokens, pos)
        self.seconds = time.perf_counter() - t0
        return logits


def loop_step(executor: Any, tokens: torch.Tensor, pos: int, opts: SamplingOptions, noise: NoiseStream
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token as the loop draws it on a CPU executor (``sampling="device"``, the default).

    Args:
        tokens: int64 ``[n]`` fed at ``pos`` (the loop repeats them for the CFG null rows).
    Returns:
        the guided float32 logits ``[n, V]`` (may share memory with the executor's output buffer)
        and the drawn tokens int64 ``[n]``.
    """
    logits = decode_one_token(executor, tokens, pos, opts, host=False)      # [n, V]
    return logits, sample(logits, opts, noise.uniform(pos, tokens.shape[0]))


def loop_prefill(executor: Any, class_ids: torch.Tensor, opts: SamplingOptions, noise: NoiseStream) -> torch.Tensor:
    """The start of a sequence as the loop runs it: ``start`` (cache allocation), position 0, first draw."""
    logits = prefill(executor, class_ids, opts, host=False)                 # [n, V]
    return sample(logits, opts, noise.uniform(0, class_ids.shape[0]))


class _Record:
    """Per runtime: seconds per repeat of each timed position, and the last logits / draw there."""

    def __init__(self) -> None:
        self.step: dict[int, list[float]] = defaultdict(list)
        self.forward: dict[int, list[float]] = defaultdict(list)
        self.logits: dict[int, torch.Tensor] = {}
        self.drawn: dict[int, torch.Tensor] = {}

    def fill(self, row: Row) -> None:
        per_pos = {p: statistics.median(ts) for p, ts in sorted(self.step.items())}
        step = Summary.of(list(per_pos.values())).scaled(1e3)
        row.step_ms, row.step_ms_min, row.step_ms_p90 = step.median, step.min, step.p90
        row.forward_ms = 1e3 * statistics.median([statistics.median(ts) for ts in self.forward.values()])
        spreads = [s for s in map(relative_range, self.step.values()) if s is not None]
        row.spread = statistics.median(spreads) if spreads else None
        row.per_position_ms = {p: 1e3 * t for p, t in per_pos.items()}

    def compare(self, ref: "_Record", row: Row) -> None:
        """Accuracy against eager on the same calls (teacher-forced: both were fed the same tokens at
        every position): the largest logit difference, whether the draws match, and what a quantized
        graph costs: the share of rows whose top-1 token is eager's and the mean KL(eager || this) of
        the guided distributions the sampler draws from."""
        row.max_abs_diff_vs_eager = max(float((t - ref.logits[p]).abs().max()) for p, t in self.logits.items())
        row.tokens_equal_eager = all(torch.equal(t, ref.drawn[p]) for p, t in self.drawn.items())
        got = torch.stack([self.logits[p] for p in sorted(self.logits)]).double()     # [P, n, V]
        want = torch.stack([ref.logits[p] for p in sorted(self.logits)]).double()    # [P, n, V]
        row.top1_vs_eager = float((got.argmax(-1) == want.argmax(-1)).double().mean())
        log_p, log_q = want.log_softmax(-1), got.log_softmax(-1)
        row.kl_vs_eager = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def time_batch(
    executors: Mapping[str, Any],
    cfg: GPTConfig,
    batch: Batch,
    positions: Sequence[int],
    *,
    warmup: int,
    rounds: int,
    repeats: int,
    seed: int,
    log: Log,
) -> dict[str, Row]:
    """Time every executor on the same calls at one batch.

    Args:
        executors: name -> step executor.
        positions: decode positions to time (each ``repeats`` times per runtime).
        warmup: untimed loop steps per runtime after the prefill.
        rounds: turns per runtime; the positions are split between them.
    Returns:
        name -> :class:`Row`; a runtime that raised has only ``error`` set.
    """
    inputs = make_inputs(cfg, batch.images, seed)
    opts, noise = batch.options(seed), NoiseStream(seed)
    out = {n: Row(n, batch.images, batch.rows, batch.cfg) for n in executors}
    clocks = {n: ForwardClock(ex) for n, ex in executors.items()}
    records = {n: _Record() for n in executors}
    live = list(executors)

    def guarded(name: str, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn``; a runtime that raises is dropped from this batch with the reason."""
        if name not in live:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing runtime is a row, not a crash
            out[name] = Row(name, batch.images, batch.rows, batch.cfg, error=f"failed during {what}: {reason(e)}")
            live.remove(name)
            log(f"{name}: {out[name].error}")

    def setup(name: str) -> None:
        ex = executors[name]
        pre = time_calls(lambda: loop_prefill(ex, inputs.class_ids, opts, noise), repeats=3, warmup=1)
        out[name].prefill_ms = 1e3 * statistics.median(pre)
        for p in positions[:warmup]:
            loop_step(ex, inputs.tokens[p], p, opts, noise)

    def turn(name: str, chunk: list[int]) -> None:
        clock, rec = clocks[name], records[name]
        loop_step(clock, inputs.tokens[chunk[0]], chunk[0], opts, noise)      # untimed: pool wake-up
        for _ in range(repeats):
            for p in chunk:
                t0 = time.perf_counter()
                logits, drawn = loop_step(clock, inputs.tokens[p], p, opts, noise)
                rec.step[p].append(time.perf_counter() - t0)
                rec.forward[p].append(clock.seconds)
                rec.logits[p], rec.drawn[p] = logits.clone(), drawn          # logits may be a reused buffer

    def images_time(name: str) -> None:
        ex = executors[name]
        ex.decode_image(inputs.holistic_ids[:1], inputs.patch_ids[:1])     # warm-up, one image
        (seconds,) = time_calls(lambda: ex.decode_image(inputs.holistic_ids, inputs.patch_ids), repeats=1)
        out[name].decode_image_ms = 1e3 * seconds

    for name in list(live):
        guarded(name, "start/prefill/warm-up", lambda: setup(name))
    for r in range(rounds):
        chunk = list(positions[r::rounds])
        if not chunk or not live:
            continue
        order = live[r % len(live):] + live[: r % len(live)]
        for name in order:
            guarded(name, "decode", lambda: turn(name, chunk))
        log(f"batch {batch.label}: round {r + 1}/{rounds} done")
    for name in list(live):
        guarded(name, "decode_image", lambda: images_time(name))
    for name in live:
        records[name].fill(out[name])
        if EAGER in live and name != EAGER:
            records[name].compare(records[EAGER], out[name])
    return out
