"""The machine the numbers come from: what it is, how fast it reads memory and multiplies matrices
(measured in the same run as the timings they are compared with), and how busy other processes keep it.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from hita.config import GPTConfig

from .stats import best_seconds


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _l3_cache() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Rates
# ----------------------------------------------------------------------------------------------


def measure_bandwidth(nbytes: int, reps: int = 9) -> dict[str, float]:
    """Read bandwidth in GB/s (1e9 bytes/s) from streaming a float32 buffer of about ``nbytes``.

    Size it like the working set the floor is for: a decode step's bytes. A model far larger than
    the last-level cache then gets the DRAM rate, and one that fits in it gets the cache's rate. Three
    access patterns, each the fastest of ``reps`` calls after one warm-up: ``x.sum()``, a GEMV
    ``W @ v``, and ``F.linear`` of one row (what a decode step does with each weight at batch 1).
    ``read_gbs``, the best of them, is what the floor uses.
    """
    x = torch.ones(max(1, -(-nbytes // 4096)) * 1024, dtype=torch.float32)  # whole rows of 1024
    w = x.view(-1, 1024)                                                      # [n / 1024, 1024]
    v = torch.ones(1024, dtype=torch.float32)                                 # [1024]
    row = torch.ones(1, 1024, dtype=torch.float32)                            # [1, 1024]
    size = x.numel() * 4
    calls = {"sum_gbs": x.sum, "gemv_gbs": lambda: torch.mv(w, v), "linear_gbs": lambda: F.linear(row, w)}
    rates = {name: size / best_seconds(fn, reps) / 1e9 for name, fn in calls.items()}
    return {"read_gbs": max(rates.values()), **rates, "buffer_mib": size / 2**20}


def measure_matmul_rate(cfg: GPTConfig, rows: int = 512, reps: int = 5) -> dict[str, float]:
    """fp32 ``torch.mm`` rate in GFLOP/s on the GPT's layer shapes with ``rows`` rows (enough rows to
    be compute-bound, so this is the rate a decode step could reach on its FLOPs). Fastest of
    ``reps`` calls per shape; ``gflops``, the best shape, is what the floor uses."""
    d, f = cfg.dim, cfg.ffn_hidden
    shapes = {"qkv": (d, 3 * d), "ffn_up": (d, f), "ffn_down": (f, d)}
    rates = {}
    for name, (k, n) in shapes.items():
        a, b = torch.randn(rows, k), torch.randn(k, n)                        # [rows, k], [k, n]
        rates[f"{name}_gflops"] = 2 * rows * k * n / best_seconds(functools.partial(torch.mm, a, b), reps) / 1e9
    return {"gflops": max(rates.values()), **rates, "rows": rows}


def _best(old: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Per key, the higher of two rate measurements (sizes and row counts are the same in both)."""
    return {k: max(v, old.get(k, v)) for k, v in new.items()}


# ----------------------------------------------------------------------------------------------
# Other processes
# ----------------------------------------------------------------------------------------------


def _busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _self_seconds() -> float:
    t = os.times()  # this process and its finished children (the C++ host)
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used between construction and
    :meth:`share` (``/proc/stat`` busy time minus this process's own CPU time), 0..1 of all cores.

    Why: on a shared machine the thread pools of every runtime wait at barriers for a thread that
    lost its core, so a few percent of foreign load can inflate a step several times. This number
    lets a reader recognise such a row. ``None`` where ``/proc/stat`` is unreadable.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.self0 = time.perf_counter(), _busy_seconds(), _self_seconds()

    def share(self) -> float | None:
        busy = _busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (busy - self.busy0) - (_self_seconds() - self.self0)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------------------------
# Description
# ----------------------------------------------------------------------------------------------


@dataclass
class Machine:
    """Where the numbers were measured (rates filled in by :meth:`measure`)."""

    cpu: str
    cores: int
    threads: int
    isa: str
    l3: str | None
    torch: str
    onnxruntime: str | None
    python: str
    load_before: tuple[float, float, float] | None
    bandwidth: dict[str, float] = field(default_factory=dict)
    matmul: dict[str, float] = field(default_factory=dict)
    load_after: tuple[float, float, float] | None = None
    rate_loads: list[float | None] = field(default_factory=list)  # other processes' CPU share per measure()

    def measure(self, cfg: GPTConfig, buffer_bytes: int) -> None:
        """Measure the read bandwidth (over ``buffer_bytes``) and the matmul rate now, keeping the
        best of this and any earlier call. Called right before and right after the timings: the
        floor needs what the machine *can* do, and on a shared machine one of the two is often
        the quieter."""
        load = OtherLoad()
        self.bandwidth = _best(self.bandwidth, measure_bandwidth(buffer_bytes))
        self.matmul = _best(self.matmul, measure_matmul_rate(cfg))
        self.rate_loads.append(load.share())

    def line(self) -> str:
        load = "" if self.load_before is None else f"; load avg before {self.load_before[0]:.2f}"
        if self.load_after is not None:
            load += f", after {self.load_after[0]:.2f}"
        shares = [f"{100 * s:.0f}%" for s in self.rate_loads if s is not None]
        if shares:
            load += f"; other processes used {' / '.join(shares)} of the CPU while the rates were measured"
        bw = self.bandwidth
        return (
            f"{self.cpu} ({self.isa}{', L3 ' + self.l3 if self.l3 else ''}), {self.cores} usable cores, "
            f"{self.threads} threads; torch {self.torch}, onnxruntime {self.onnxruntime or 'not installed'}, "
            f"Python {self.python}; read bandwidth {bw['read_gbs']:.1f} GB/s (best of sum {bw['sum_gbs']:.1f}, "
            f"GEMV {bw['gemv_gbs']:.1f}, linear {bw['linear_gbs']:.1f}, over {bw['buffer_mib']:.0f} MiB), "
            f"fp32 matmul {self.matmul['gflops']:.1f} GFLOP/s{load}"
        )


def describe_machine(threads: int) -> Machine:
    return Machine(
        cpu=_cpu_model(),
        cores=usable_cores(),
        threads=threads,
        isa=torch.backends.cpu.get_cpu_capability(),
        l3=_l3_cache(),
        torch=torch.__version__,
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        python=platform.python_version(),
        load_before=loadavg(),
    )
