"""The C++ host (``hita-host`` over the AOTI packages), measured as its own process.

It cannot be driven step by step from Python, so it runs one whole generation per batch and reports
its own per-step times; the benchmark reads them at the same positions as the Python rows. Its
``step_ms`` is a whole loop step (package call, logits to the CPU, CFG mix and draw), which is what
the Python rows time too; its ``forward_ms`` (package call + logits copy) is the forward-only figure.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hita.config import GPTConfig

from .results import Row
from .runtimes import Context, attempt, exported
from .stats import Summary
from .workload import Batch, make_inputs


@dataclass
class HostProcess:
    """A built ``hita-host``, the AOTI folder it runs and where its PNGs go."""

    name: str
    binary: Path
    artifacts: Path
    threads: int
    png_dir: Path
    run_host: Callable[..., Any]

    def measure(self, cfg: GPTConfig, batch: Batch, positions: Sequence[int], seed: int) -> Row:
        ids = make_inputs(cfg, batch.images, seed).class_ids.tolist()
        run = self.run_host(self.binary, self.artifacts, ids, batch.options(seed), self.png_dir, threads=self.threads)
        steps, forward = list(run.step_ms), list(run.forward_ms)           # one entry per pos, index pos - 1
        if len(steps) != cfg.seq_len - 1:
            raise RuntimeError(f"hita-host reported {len(steps)} step times, expected {cfg.seq_len - 1}")
        at = {p: steps[p - 1] for p in positions}
        step = Summary.of(list(at.values()))
        return Row(
            self.name, batch.images, batch.rows, batch.cfg,
            note="own process, one whole generation; host-timed steps (incl. its draw) at the same positions",
            step_ms=step.median, step_ms_min=step.min, step_ms_p90=step.p90,
            forward_ms=statistics.median([forward[p - 1] for p in positions]) if len(forward) == len(steps) else None,
            prefill_ms=run.prefill_ms, decode_image_ms=run.decode_image_ms, per_position_ms=at,
        )


def build_host_process(ctx: Context) -> HostProcess:
    """Build ``hita-host`` with ``hita.jobs.build_cpp.build_host`` (first: it is the cheaper failure),
    then export or reuse the AOTI packages it runs.

    Raises:
        Unavailable: the build module does not import (it may be mid-rework), the build fails (no
            CMake, compiler or libtorch headers, or broken sources), or the AOTI export fails.
    """
    def build():
        from hita.jobs.build_cpp import build_host, run_host

        return build_host(ctx.workdir / "cpp-build", progress=lambda s: ctx.log(f"cpp: {s}")), run_host

    t0 = time.perf_counter()
    built, run_host = attempt("C++ host build failed", build)
    ctx.log(f"cpp: hita-host ready in {time.perf_counter() - t0:.0f} s ({built.binary})")
    return HostProcess("cpp", built.binary, exported(ctx, "aoti"), ctx.threads, ctx.workdir / "cpp-png", run_host)
