"""Decode-step benchmark: per-token time and images/s of each runtime, against eager PyTorch and
against the roofline floor of the machine it runs on (``python benchmarks/decode.py --help``).

One run: writes seeded random-weight checkpoints of a GPT preset and its tokenizer, builds every
requested runtime from them through the runtime factory (exports by the export driver, reused from
``--workdir`` while their manifest matches); measures the machine's read bandwidth and matmul rate;
then, per batch, times one token of the shared loop (``decode_one_token`` + ``sample``) at ``--steps``
positions, every runtime on the same calls, in interleaved rounds, and the tokenizer decoder once;
measures the rates again and takes the best of both for the floor. How each part is measured lives
in ``benchmarks/benchlib``; this script says what to measure and prints it. Column meanings:
``benchmarks/README.md``.

Runtimes: ``torch`` (eager, the reference), ``onnxruntime`` (the plain ONNX export),
``onnxruntime-gqa`` (the ``--attention gqa`` export: GroupQueryAttention over the filled cache prefix
in place, one head half per step), ``aoti`` (the CPU default export: attention over the filled prefix,
one head half, frozen oneDNN-packed weights), ``cpp`` (the C++ host over the same packages). The
floor charges the full 2V head for every runtime, so a graph that reads one half can come in a little
under it (about 11 % of a 2-row step's bytes at GPT-B).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchlib.floor import bandwidth_buffer_bytes, floor_ms
from benchlib.host import HostProcess
from benchlib.machine import OtherLoad, describe_machine, loadavg, usable_cores
from benchlib.models import write_checkpoints
from benchlib.report import format_table, write_json
from benchlib.results import BenchResult, Row
from benchlib.runtimes import EAGER, RUNTIMES, Context, build_all, reason
from benchlib.steps import time_batch
from benchlib.workload import Batch, make_batches, spread_positions
from hita.config import GPTConfig
from hita.util.log import Log


def _measure_batch(built: Mapping[str, Any], ctx: Context, batch: Batch, positions: list[int],
                   timing: Mapping[str, int]) -> dict[str, Row]:
    """Rows of every built runtime at one batch, each with the other processes' CPU share meanwhile."""
    cfg = ctx.checkpoints.gpt_cfg
    steppers = {n: e for n, e in built.items() if not isinstance(e, HostProcess)}
    load = OtherLoad()
    rows = time_batch(steppers, cfg, batch, positions, seed=ctx.seed, log=ctx.log, **timing) if steppers else {}
    for row in rows.values():
        row.other_load = load.share()
    for name, host in built.items():
        if isinstance(host, HostProcess):
            ctx.log(f"{name}: one whole generation at batch {batch.label} ...")
            load = OtherLoad()
            try:
                rows[name] = host.measure(cfg, batch, positions, ctx.seed)
            except Exception as e:  # noqa: BLE001 - a failing host is a row, not a crash
                rows[name] = Row(name, batch.images, batch.rows, batch.cfg, error=f"failed: {reason(e)}")
            rows[name].other_load = load.share()
    return rows


def run_benchmark(
    preset: str = "GPT-B",
    batches: Iterable[int | str] = (1, 8),
    cfg: bool = True,
    runtimes: Iterable[str] = RUNTIMES,
    steps: int = 24,
    warmup: int = 3,
    rounds: int = 4,
    repeats: int = 3,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    log: Log = lambda s: None,
) -> BenchResult:
    """Run the benchmark and return every row; the arguments are the CLI options (see ``--help``).

    ``batches`` are image counts; with ``cfg`` each image is two GPT rows. ``workdir`` ``None``:
    checkpoints and exports go to a temporary folder removed at the end.

    Raises:
        ValueError: an unknown preset or runtime, a bad batch, or a count below 1.
    """
    t_start = time.perf_counter()
    gpt_cfg = GPTConfig.from_name(preset)
    names = list(dict.fromkeys(runtimes))
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    specs = make_batches(batches, cfg)
    if min(steps, repeats, rounds, threads or 1) < 1 or warmup < 0:
        raise ValueError(f"steps, repeats, rounds and threads must be >= 1 and warmup >= 0, got {steps}, "
                         f"{repeats}, {rounds}, {threads}, {warmup}")
    positions = spread_positions(gpt_cfg, steps)
    threads = threads or usable_cores()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scratch = tempfile.TemporaryDirectory(prefix="hita-bench-") if workdir is None else contextlib.nullcontext(workdir)
    with scratch as folder:
        try:
            machine = describe_machine(threads)
            wd = Path(folder)
            log(f"writing random-weight {preset} checkpoints ...")
            checkpoints = write_checkpoints(preset, seed, wd / f"checkpoints-{preset}-seed{seed}")
            ctx = Context(checkpoints, seed, threads, wd, max(b.rows for b in specs), log)
            built, errors = build_all(names, ctx)
            smallest = bandwidth_buffer_bytes(gpt_cfg, min(b.rows for b in specs), positions[0])
            log("measuring memory bandwidth and matmul rate ...")  # after the exports, right before timing
            machine.measure(gpt_cfg, smallest)
            log(machine.line())
            timing = {"warmup": warmup, "rounds": rounds, "repeats": repeats}
            measured = {batch: _measure_batch(built, ctx, batch, positions, timing) for batch in specs}
            log("measuring memory bandwidth and matmul rate again ...")  # the floor uses the best of both
            machine.measure(gpt_cfg, smallest)
            rows: list[Row] = []
            for batch in specs:
                floor = floor_ms(gpt_cfg, batch.rows, positions, machine.bandwidth["read_gbs"],
                                 machine.matmul["gflops"])
                for name in names:
                    row = measured[batch].get(name) or Row(name, batch.images, batch.rows, batch.cfg,
                                                           error=errors.get(name, "not run"))
                    row.add_ratios(measured[batch].get(EAGER), floor, gpt_cfg.seq_len)
                    rows.append(row)
            machine.load_after = loadavg()
        finally:
            torch.set_num_threads(old_threads)
    return BenchResult(
        preset=gpt_cfg.name, tokenizer=checkpoints.tokenizer_cfg.name, seq_len=gpt_cfg.seq_len,
        positions=positions, repeats=repeats, sampling=dataclasses.asdict(Batch(1).options(seed)),
        machine=machine, rows=rows, seconds=time.perf_counter() - t_start,
    )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/decode.py",
        description="Per-token decode time and images/s of each hita runtime vs eager PyTorch and the roofline floor.",
    )
    p.add_argument("--preset", default="GPT-B", choices=list(GPTConfig.PRESETS), help="GPT preset (default GPT-B)")
    p.add_argument("--batches", default="1,8",
                   help="images per batch, comma-separated; each image is 2 rows with CFG (default 1,8)")
    p.add_argument("--no-cfg", dest="cfg", action="store_false",
                   help="no classifier-free guidance: one row per image")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help=f"comma-separated, from {', '.join(RUNTIMES)} (default all)")
    p.add_argument("--steps", type=int, default=24, help="timed decode positions per runtime and batch (default 24)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per position; their spread is the noise (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="turns per runtime and batch (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of torch, AOTI and the C++ host; ONNX Runtime keeps its default pool "
                        "(default: all usable cores)")
    p.add_argument("--seed", type=int, default=0, help="weights, class ids, tokens and noise (default 0)")
    p.add_argument("--workdir", default=None,
                   help="folder for checkpoints, exports and the C++ build, reused across runs (default: a temp dir)")
    p.add_argument("--json", dest="json_path", default=None, help="also write every number to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log: Log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        result = run_benchmark(
            preset=args.preset, batches=_csv(args.batches), cfg=args.cfg, runtimes=_csv(args.runtimes),
            steps=args.steps, warmup=args.warmup, rounds=args.rounds, repeats=args.repeats, threads=args.threads,
            workdir=args.workdir, seed=args.seed, log=log,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_path:
        try:
            write_json(result, args.json_path)
        except OSError as e:
            print(f"error: cannot write {args.json_path}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
