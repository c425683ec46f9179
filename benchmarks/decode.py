"""Decode-step benchmark: time per decode step and images/s of each runtime, against eager PyTorch and
against the roofline floor of the machine it runs on.

What one run does (``python benchmarks/decode.py --help`` for the options):

1. Builds one random-weight GPT (seeded; the zero-initialised output head is re-drawn so the logits
   are not all zero) and, for every requested runtime, an executor over it: eager PyTorch directly,
   ONNX Runtime / AOTInductor through a fresh export (cached in ``--workdir`` by a hash of the
   configs, seed and tool versions), the C++ host ``hita-host`` (built with CMake) over the AOTI
   packages. A runtime that is missing, fails to export, build or load, or fails while running
   becomes a table row that says why; nothing is estimated in its place.
2. Measures the machine right before timing: read bandwidth (the better of a large ``tensor.sum``
   and a large GEMV, each the median of several repetitions) and the fp32 matmul rate
   (``torch.mm`` on the preset's layer shapes with 512 rows, median GFLOP/s of the best shape),
   both with the benchmark's thread count.
3. For every batch (``8`` means 8 images with CFG: 16 rows), starts every executor, times the prefill,
   then feeds all executors the same tokens at ``--steps`` positions spread over the sequence
   (holistic and patch positions, so both heads). Runtimes take turns in rounds so that load from
   other processes hits all of them alike; the first step of each turn is not timed (it absorbs the
   wake-up of the previous runtime's thread pool). Because every executor sees the same calls, their
   logits must agree: the largest difference to eager is reported as a sanity check. The C++ host
   runs as its own process over one whole generation and reports its own per-step times, which are
   read at the same positions. The CPU share used by *other* processes meanwhile is recorded
   (``/proc/stat``), as the noise indicator of a shared machine.
4. Computes, per timed position, the roofline floor ``max(bytes / bandwidth, flops / matmul rate)``
   where ``bytes`` are all weights one decode step reads (every layer, the full 2V head that the
   decode graph computes, the gathered embedding rows) plus the KV cache up to that position, and
   ``flops = 2 * matmul params * rows + attention``.

Reported per runtime and batch: median ms per decode step, speed-up over eager (eager ms / runtime
ms), the floor (mean over the timed positions), runtime ms / floor, and images/s =
``images / ((seq_len - 1) * step + prefill + decode_image)``. The tokenizer decoder is timed only for
the ``tiny`` preset (a real matching tokenizer preset exists there); for larger presets images/s
counts the GPT only (prefill + decode steps) and the table says so. Host-side sampling (CFG mixing,
top-k/top-p, the draw) is not included.

Large presets export against a small stand-in tokenizer with the GPT's token layout (the exporters
always write a decoder graph; the stand-in keeps that cheap). It is never timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from hita.config import GPTConfig, TokenizerConfig

RUNTIMES = ("torch", "onnxruntime", "aoti", "cpp")
DEFAULT_RUNTIMES = ("torch", "onnxruntime")
EAGER = "torch"

Log = Callable[[str], None]


class Unavailable(Exception):
    """A runtime cannot be benchmarked here; the message says why (shown in the table)."""


# ----------------------------------------------------------------------------------------------
# Machine: description, bandwidth, matmul rate
# ----------------------------------------------------------------------------------------------


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


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(mib: int = 512, reps: int = 7) -> dict[str, float]:
    """Read bandwidth in GB/s (1e9 bytes/s) from streaming a ``mib`` MiB float32 buffer.

    Two ways, each the median of ``reps`` after one warm-up: ``x.sum()`` and a GEMV ``W @ v`` (the
    access pattern of a decode step at batch 1). ``read_gbs`` is the better of the two.
    """
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32)
    nbytes = x.numel() * 4
    x.sum()
    t_sum = _median_seconds(x.sum, reps)
    w = x.view(-1, 1024)                                                     # [n/1024, 1024]
    v = torch.ones(1024, dtype=torch.float32)
    torch.mv(w, v)
    t_mv = _median_seconds(lambda: torch.mv(w, v), reps)
    sum_gbs, mv_gbs = nbytes / t_sum / 1e9, nbytes / t_mv / 1e9
    return {"sum_gbs": sum_gbs, "gemv_gbs": mv_gbs, "read_gbs": max(sum_gbs, mv_gbs), "buffer_mib": mib}


def measure_matmul_rate(cfg: GPTConfig, rows: int = 512, reps: int = 5) -> dict[str, Any]:
    """fp32 ``torch.mm`` rate in GFLOP/s on the GPT's layer shapes with ``rows`` rows (enough rows
    to be compute-bound). Median over ``reps`` per shape; the best shape is the rate."""
    d, f = cfg.dim, cfg.ffn_hidden
    shapes = {"qkv": (d, 3 * d), "ffn_up": (d, f), "ffn_down": (f, d)}
    rates = {}
    for name, (k, n) in shapes.items():
        a, b = torch.randn(rows, k), torch.randn(k, n)
        torch.mm(a, b)
        t = _median_seconds(functools.partial(torch.mm, a, b), reps)
        rates[name] = 2 * rows * k * n / t / 1e9
    return {"gflops": max(rates.values()), "per_shape_gflops": rates, "rows": rows}


@dataclass
class Machine:
    """Where the numbers were measured."""

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
    matmul: dict[str, Any] = field(default_factory=dict)
    load_after: tuple[float, float, float] | None = None
    other_load: float | None = None  # CPU share of other processes during the two measurements

    def line(self) -> str:
        load = "" if self.load_before is None else f"; load avg before {self.load_before[0]:.2f}"
        if self.load_after is not None:
            load += f", after {self.load_after[0]:.2f}"
        if self.other_load is not None:
            load += f"; other processes used {100 * self.other_load:.0f}% of the CPU while measuring"
        return (
            f"{self.cpu} ({self.isa}{', L3 ' + self.l3 if self.l3 else ''}), {self.cores} usable cores, "
            f"{self.threads} threads; torch {self.torch}, onnxruntime {self.onnxruntime or 'not installed'}, "
            f"Python {self.python}; read bandwidth {self.bandwidth['read_gbs']:.1f} GB/s "
            f"(sum {self.bandwidth['sum_gbs']:.1f}, GEMV {self.bandwidth['gemv_gbs']:.1f}), "
            f"fp32 matmul {self.matmul['gflops']:.1f} GFLOP/s{load}"
        )


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between construction and
    :meth:`share` (``/proc/stat`` busy time minus this process's own CPU time), 0..1 of all cores.
    ``None`` where ``/proc/stat`` is unreadable."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.self0 = time.perf_counter(), _busy_seconds(), _self_seconds()

    def share(self) -> float | None:
        busy = _busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (busy - self.busy0) - (_self_seconds() - self.self0)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


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
        load_before=_loadavg(),
    )


# ----------------------------------------------------------------------------------------------
# Roofline: bytes and FLOPs of one decode step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """What one decode step of ``rows`` rows at position ``pos`` must read and compute."""

    weight_bytes: int
    kv_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def floor_s(self, read_gbs: float, gflops: float) -> float:
        return max(self.bytes / (read_gbs * 1e9), self.flops / (gflops * 1e9))


def matmul_params(cfg: GPTConfig) -> int:
    """Weights multiplied per row in one decode step: every layer's projections + the 2V head."""
    d = cfg.dim
    per_layer = 4 * d * d + 3 * d * cfg.ffn_hidden  # wqkv (3d*d) + wo (d*d) + w1, w3, w2
    return cfg.n_layer * per_layer + 2 * cfg.vocab_size * d


def step_cost(cfg: GPTConfig, rows: int, pos: int, elem_bytes: int = 4) -> StepCost:
    """Bytes read and FLOPs of ``HitaGPT.decode`` for ``rows`` rows at position ``pos``.

    Weights: all matmul weights (read once for all rows), the 2 RMSNorm vectors per layer and the
    final one, the gathered rows of both input tables (the graph embeds with both and selects) and
    one ``slot_pos`` row. KV: keys and values of positions ``0..pos`` in every layer (the ideal; the
    static-cache graphs read all ``cache_len`` slots under a mask). FLOPs: ``2 * params * rows`` for
    the matmuls plus ``4 * dim * (pos + 1)`` per row and layer for scores and the weighted sum.
    """
    d, L = cfg.dim, cfg.n_layer
    weights = matmul_params(cfg) + (2 * L + 1) * d + 2 * rows * d + d
    kv = 2 * L * rows * d * (pos + 1)
    flops = 2 * matmul_params(cfg) * rows + 4 * L * rows * d * (pos + 1)
    return StepCost(weights * elem_bytes, kv * elem_bytes, flops)


def spread_positions(cfg: GPTConfig, n: int) -> list[int]:
    """``n`` decode positions spread evenly over ``1 .. seq_len - 1`` (holistic and patch)."""
    last = cfg.seq_len - 1
    if n >= last:
        return list(range(1, last + 1))
    if n == 1:
        return [(1 + last) // 2]
    return sorted({round(1 + i * (last - 1) / (n - 1)) for i in range(n)})


# ----------------------------------------------------------------------------------------------
# Models and executors
# ----------------------------------------------------------------------------------------------


def tokenizer_config_for(gpt_cfg: GPTConfig) -> tuple[TokenizerConfig, bool]:
    """The tokenizer config to pair with ``gpt_cfg`` and whether it is a real preset.

    ``tiny`` pairs with the ``tiny`` tokenizer (timed). Other presets get a small stand-in with the
    GPT's token layout (vocab, holistic count, grid), only because the exporters always write a
    decoder graph; it is never timed.
    """
    if gpt_cfg.name == "tiny":
        return TokenizerConfig.from_name("tiny"), True
    base = TokenizerConfig.from_name("tiny")
    stand_in = dataclasses.replace(
        base,
        name=f"bench-stand-in-{gpt_cfg.name}",
        codebook_size=gpt_cfg.vocab_size,
        n_holistic=gpt_cfg.n_holistic,
        image_size=gpt_cfg.grid * base.downsample,
    )
    return stand_in, False


def build_models(gpt_cfg: GPTConfig, tok_cfg: TokenizerConfig, seed: int):
    """Seeded random GPT (eval, fp32) and tokenizer. The output head, zero at init, is re-drawn."""
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        gpt = HitaGPT(gpt_cfg).eval()
        torch.nn.init.normal_(gpt.output.weight, mean=0.0, std=0.02)
        tok = HitaTokenizer(tok_cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return gpt, tok


def export_key(engine: str, gpt_cfg: GPTConfig, tok_cfg: TokenizerConfig, seed: int) -> str:
    """Folder name for a cached export: engine + short hash of everything the artifacts depend on."""
    body = {
        "engine": engine,
        "gpt": gpt_cfg.to_dict(),
        "tokenizer": tok_cfg.to_dict(),
        "seed": seed,
        "init": "normal-head",
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "hita": _version("hita"),
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return f"{engine}-{gpt_cfg.name}-{digest}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240]}" if text else type(e).__name__


def _import(module: str, attr: str):
    """``module.attr``, or :class:`Unavailable` naming what is missing."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise Unavailable(f"{module} does not exist in this checkout") from None
        raise Unavailable(f"import {module} failed: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        raise Unavailable(f"import {module} failed: {_first_line(e)}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Unavailable(f"{module} has no {attr}") from None


@dataclass
class Context:
    """What runtime builders get."""

    gpt: Any
    tokenizer: Any
    seed: int
    threads: int
    workdir: Path
    log: Log


def _cached_export(ctx: Context, engine: str, export: Callable[[Path], Any], expect: str) -> Path:
    """Export into ``workdir/<key>`` unless a valid export with that key is there already."""
    from hita.export.manifest import load_manifest

    out = ctx.workdir / export_key(engine, ctx.gpt.cfg, ctx.tokenizer.cfg, ctx.seed)
    if out.is_dir():
        try:
            m = load_manifest(out, expect_engine=expect, verify_files=False)
            if m.gpt_cfg == ctx.gpt.cfg and m.tokenizer_cfg == ctx.tokenizer.cfg:
                ctx.log(f"{engine}: reusing the export in {out}")
                return out
            ctx.log(f"{engine}: {out} holds other configs; exporting again")
        except Exception as e:  # noqa: BLE001 - a broken cache is simply rebuilt
            ctx.log(f"{engine}: cached export unusable ({_first_line(e)}); exporting again")
    t0 = time.perf_counter()
    try:
        export(out)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"export failed: {_first_line(e)}") from None
    ctx.log(f"{engine}: exported in {time.perf_counter() - t0:.0f} s to {out}")
    return out


def build_torch(ctx: Context):
    from hita.runtimes.torch_eager import TorchExecutor

    tok = ctx.tokenizer if ctx.tokenizer.cfg.name == ctx.gpt.cfg.name == "tiny" else None
    return TorchExecutor(ctx.gpt, tok)


def build_onnxruntime(ctx: Context):
    ort_executor = _import("hita.runtimes.onnxrt", "OrtExecutor")
    export_onnx = _import("hita.export.onnx", "export_onnx")
    out = _cached_export(
        ctx, "onnx",
        lambda d: export_onnx(ctx.gpt, ctx.tokenizer, d, progress=lambda s: ctx.log(f"onnx: {s}")),
        "onnx",
    )
    try:
        return ort_executor(out, threads=ctx.threads)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"OrtExecutor failed to load: {_first_line(e)}") from None


def _aoti_artifacts(ctx: Context) -> Path:
    export_aoti = _import("hita.export.aoti", "export_aoti")
    return _cached_export(
        ctx, "aoti",
        lambda d: export_aoti(ctx.gpt, ctx.tokenizer, d, device="cpu", progress=lambda s: ctx.log(f"aoti: {s}")),
        "aoti",
    )


def build_aoti(ctx: Context):
    aoti_executor = _import("hita.runtimes.aoti", "AotiExecutor")
    out = _aoti_artifacts(ctx)
    try:
        return aoti_executor(out, device="cpu")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"AotiExecutor failed to load: {_first_line(e)}") from None


@dataclass
class HostProcess:
    """A runtime measured as its own process over one whole generation: the C++ host
    (``hita-host`` over the AOTI packages). It reports its own per-step times: forward-only when
    the host reports them (``forward_ms``), else whole steps including its draw (CFG mixing +
    sampling), which the executor rows exclude (``includes_draw``)."""

    name: str
    binary: Path
    artifacts: Path
    threads: int
    png_dir: Path | None  # None: no tokenizer decode (``--no-images``)
    run_host: Callable[..., Any]
    includes_draw: bool = False

    def measure(self, cfg: GPTConfig, images: int, use_cfg: bool, positions: Sequence[int], seed: int) -> Row:
        from hita.runtimes.sampling import SamplingOptions

        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, cfg.num_classes, (images,), generator=gen).tolist()
        opts = SamplingOptions(cfg_scale=1.5 if use_cfg else 1.0, seed=seed)
        run = self.run_host(self.binary, self.artifacts, ids, opts, self.png_dir, threads=self.threads)
        # One entry per decode step (index pos - 1). Prefer the forward-only times, when the host
        # reports them, so the row compares with the executor rows (no draw); else whole steps.
        forward = getattr(run, "forward_ms", None) or run.report.get("forward_ms")
        steps = [float(x) for x in forward] if forward else run.step_ms
        self.includes_draw = not forward
        if len(steps) != cfg.seq_len - 1:
            raise RuntimeError(f"hita-host reported {len(steps)} step times, expected {cfg.seq_len - 1}")
        at = {p: steps[p - 1] for p in positions}
        ts = sorted(at.values())
        what = "whole steps incl. the host's draw" if self.includes_draw else "forward + logits copy"
        return Row(
            self.name, images, 2 * images if use_cfg else images, use_cfg,
            note=f"own process, one whole generation; host-timed {what} at the same positions",
            step_ms=statistics.median(ts), step_ms_min=ts[0], step_ms_p90=ts[min(len(ts) - 1, int(0.9 * len(ts)))],
            prefill_ms=run.prefill_ms, decode_image_ms=run.decode_image_ms if self.png_dir is not None else None,
            per_position_ms=at,
        )


def build_cpp(ctx: Context):
    build_host = _import("hita.jobs.build_cpp", "build_host")
    run_host = _import("hita.jobs.build_cpp", "run_host")
    out = _aoti_artifacts(ctx)
    t0 = time.perf_counter()
    try:
        built = build_host(ctx.workdir / "cpp-build", progress=lambda s: ctx.log(f"cpp: {s}"))
    except Exception as e:  # noqa: BLE001 - no cmake / compiler / libtorch headers: a row, not a crash
        raise Unavailable(f"C++ host build failed: {_first_line(e)}") from None
    ctx.log(f"cpp: hita-host ready in {time.perf_counter() - t0:.0f} s ({built.binary})")
    timed_images = ctx.tokenizer.cfg.name == ctx.gpt.cfg.name == "tiny"
    png_dir = ctx.workdir / "cpp-png" if timed_images else None
    return HostProcess("cpp", built.binary, out, ctx.threads, png_dir, run_host)


BUILDERS: dict[str, Callable[[Context], Any]] = {
    "torch": build_torch,
    "onnxruntime": build_onnxruntime,
    "aoti": build_aoti,
    "cpp": build_cpp,
}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: a runtime at one batch, measured or unavailable."""

    runtime: str
    images: int
    rows: int
    cfg: bool
    error: str | None = None
    step_ms: float | None = None  # median over the timed positions
    step_ms_min: float | None = None
    step_ms_p90: float | None = None
    prefill_ms: float | None = None
    decode_image_ms: float | None = None  # None: not timed
    floor_ms: float | None = None  # mean roofline floor over the timed positions
    speedup_vs_eager: float | None = None  # eager ms / this ms
    x_floor: float | None = None  # this ms / floor ms
    images_per_s: float | None = None
    max_abs_diff_vs_eager: float | None = None
    other_load: float | None = None  # CPU share of other processes while this batch was timed
    note: str | None = None  # how this row was measured, when it differs from the others
    per_position_ms: dict[int, float] = field(default_factory=dict)


def _step(ex, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    return ex.decode(tokens, pos).detach().to("cpu", torch.float32)  # [B, V], what the loop does


def time_batch(
    executors: Mapping[str, Any],
    cfg: GPTConfig,
    images: int,
    cfg_rows: bool,
    positions: Sequence[int],
    warmup: int,
    rounds: int,
    seed: int,
    decode_images: bool,
    log: Log,
) -> dict[str, Row]:
    """Time every executor on the same calls at one batch; see the module docstring."""
    rows = 2 * images if cfg_rows else images
    gen = torch.Generator().manual_seed(seed)
    class_ids = torch.randint(0, cfg.num_classes, (images,), generator=gen)
    if cfg_rows:
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, cfg.null_class)])  # [2n]
    tok_for = {p: torch.randint(0, cfg.vocab_size, (images,), generator=gen) for p in range(1, cfg.seq_len)}
    if cfg_rows:
        tok_for = {p: torch.cat([t, t]) for p, t in tok_for.items()}  # same token to both halves
    h_ids = torch.randint(0, cfg.vocab_size, (images, cfg.n_holistic), generator=gen)
    p_ids = torch.randint(0, cfg.vocab_size, (images, cfg.n_patch), generator=gen)
    out = {n: Row(n, images, rows, cfg_rows) for n in executors}
    times: dict[str, dict[int, float]] = {n: {} for n in executors}
    logits_at: dict[str, dict[int, torch.Tensor]] = {n: {} for n in executors}
    live = list(executors)

    def guarded(name: str, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn``; a runtime that raises is dropped from this batch with the reason."""
        if name not in live:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing runtime is a row, not a crash
            out[name].error = f"failed during {what}: {_first_line(e)}"
            live.remove(name)
            log(f"{name}: {out[name].error}")

    def setup(name: str) -> None:
        ex = executors[name]
        ex.start(rows)
        ex.prefill(class_ids)  # warm-up
        pre = []
        for _ in range(3):
            t0 = time.perf_counter()
            ex.prefill(class_ids).detach().to("cpu", torch.float32)
            pre.append(time.perf_counter() - t0)
        out[name].prefill_ms = 1e3 * statistics.median(pre)
        for p in positions[: max(0, warmup)]:  # warm-up steps (not timed)
            _step(ex, tok_for[p], p)

    def turn(name: str, chunk: list[int]) -> None:
        ex = executors[name]
        _step(ex, tok_for[chunk[0]], chunk[0])  # untimed: wakes this runtime's thread pool
        for p in chunk:
            t0 = time.perf_counter()
            logits = _step(ex, tok_for[p], p)
            times[name][p] = time.perf_counter() - t0
            logits_at[name][p] = logits.clone()  # the logits may be a reused output buffer

    def images_time(name: str) -> None:
        ex = executors[name]
        ex.decode_image(h_ids, p_ids)  # warm-up
        out[name].decode_image_ms = 1e3 * _median_seconds(lambda: ex.decode_image(h_ids, p_ids), 3)

    for name in list(live):
        guarded(name, "start/prefill/warm-up", functools.partial(setup, name))
    # Rounds: each runtime in turn takes a slice of the positions; the order rotates per round.
    for r in range(rounds):
        chunk = list(positions[r::rounds])
        if not chunk or not live:
            continue
        order = live[r % len(live):] + live[: r % len(live)]
        for name in order:
            guarded(name, "decode", functools.partial(turn, name, chunk))
        log(f"batch {images}{'+CFG' if cfg_rows else ''}: round {r + 1}/{rounds} done")
    if decode_images:
        for name in list(live):
            guarded(name, "decode_image", functools.partial(images_time, name))
    for name in live:
        row, ts = out[name], sorted(times[name].values())
        row.step_ms = 1e3 * statistics.median(ts)
        row.step_ms_min = 1e3 * ts[0]
        row.step_ms_p90 = 1e3 * ts[min(len(ts) - 1, int(0.9 * len(ts)))]
        row.per_position_ms = {p: 1e3 * t for p, t in sorted(times[name].items())}
        if EAGER in live and name != EAGER:
            ref = logits_at[EAGER]
            row.max_abs_diff_vs_eager = max(float((t - ref[p]).abs().max()) for p, t in logits_at[name].items())
    for name in executors:
        if name not in live:
            out[name].prefill_ms = out[name].decode_image_ms = None
    return out


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    preset: str
    tokenizer: str
    tokenizer_timed: bool
    seq_len: int
    positions: list[int]
    machine: Machine
    rows: list[Row]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_batch(b: int | str) -> tuple[int, bool]:
    """``1`` -> (1 image, no CFG); ``8`` -> (8 images, CFG: 16 rows). Batches above 1 use CFG, as
    in class-conditional generation; ``"8nocfg"`` forces no CFG, ``"1cfg"`` forces CFG."""
    s = str(b).strip().lower()
    use: bool | None = None
    for suffix, forced in (("nocfg", False), ("cfg", True)):
        if s.endswith(suffix):
            s, use = s[: -len(suffix)], forced
            break
    try:
        n = int(s)
    except ValueError:
        raise ValueError(f"cannot read batch {b!r}; use a number of images such as 1 or 8 (or 8nocfg, 1cfg)") from None
    if n < 1:
        raise ValueError(f"batch {b!r} must be at least 1 image")
    return n, (n > 1) if use is None else use


def run_benchmark(
    preset: str = "GPT-B",
    batches: Iterable[int | str] = (1, 8),
    runtimes: Iterable[str] = DEFAULT_RUNTIMES,
    steps: int = 24,
    warmup: int = 3,
    rounds: int = 4,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    bandwidth_mib: int = 512,
    builders: Mapping[str, Callable[[Context], Any]] | None = None,
    log: Log = lambda s: None,
) -> BenchResult:
    """Run the benchmark and return every row (see the module docstring).

    Args:
        preset: GPT preset name (``GPT-B``, ``tiny``, ...).
        batches: images per batch; ``1`` runs 1 row, ``n > 1`` runs ``n`` images with CFG (``2n`` rows).
        runtimes: names from :data:`RUNTIMES` (or ``builders``); ``torch`` is the eager reference.
        steps: timed decode steps per runtime and batch, at positions spread over the sequence.
        warmup: untimed decode steps per runtime and batch before timing.
        rounds: turns per runtime and batch (the positions are split between them).
        threads: intra-op threads for every runtime and the machine measurements (default: all
            usable cores).
        workdir: where exports go (cached by :func:`export_key`); default a temporary folder removed
            at the end.
        seed: weights, class ids and tokens.
        bandwidth_mib: buffer size for the bandwidth measurement (well above the L3 cache).
        builders: runtime name -> builder, to add or replace runtimes (tests).
        log: progress lines.
    """
    t_start = time.perf_counter()
    gpt_cfg = GPTConfig.from_name(preset)
    tok_cfg, tok_timed = tokenizer_config_for(gpt_cfg)
    threads = threads or usable_cores()
    all_builders = {**BUILDERS, **(builders or {})}
    runtimes = list(dict.fromkeys(runtimes))
    unknown = [r for r in runtimes if r not in all_builders]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; choose from {', '.join(all_builders)}")
    batch_specs = [_parse_batch(b) for b in batches]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    positions = spread_positions(gpt_cfg, steps)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = None
    try:
        machine = describe_machine(threads)
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="hita-bench-")
            workdir = tmp.name
        wd = Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        gpt, tok = build_models(gpt_cfg, tok_cfg, seed)
        ctx = Context(gpt, tok, seed, threads, wd, log)
        executors: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name in runtimes:
            log(f"{name}: building ...")
            try:
                executors[name] = all_builders[name](ctx)
            except Unavailable as e:
                errors[name] = str(e)
            except Exception as e:  # noqa: BLE001 - a broken runtime is a row, not a crash
                errors[name] = f"failed to build: {_first_line(e)}"
            if name in errors:
                log(f"{name}: unavailable: {errors[name]}")

        # Measured after the exports (minutes), right before the timing it is compared with.
        log("measuring memory bandwidth and matmul rate ...")
        load = OtherLoad()
        machine.bandwidth = measure_bandwidth(bandwidth_mib)
        machine.matmul = measure_matmul_rate(gpt_cfg)
        machine.other_load = load.share()
        log(machine.line())

        rows: list[Row] = []
        for images, use_cfg in batch_specs:
            n_rows = 2 * images if use_cfg else images
            steppers = {n: e for n, e in executors.items() if not isinstance(e, HostProcess)}
            load = OtherLoad()
            measured = time_batch(
                steppers, gpt_cfg, images, use_cfg, positions, warmup, rounds, seed,
                decode_images=tok_timed, log=log,
            ) if steppers else {}
            other = load.share()
            for row in measured.values():
                row.other_load = other
            for name, host in executors.items():
                if isinstance(host, HostProcess):
                    log(f"{name}: one whole generation at batch {images}{'+CFG' if use_cfg else ''} ...")
                    load = OtherLoad()
                    try:
                        measured[name] = host.measure(gpt_cfg, images, use_cfg, positions, seed)
                    except Exception as e:  # noqa: BLE001
                        measured[name] = Row(name, images, n_rows, use_cfg, error=f"failed: {_first_line(e)}")
                    measured[name].other_load = load.share()
            floors = [step_cost(gpt_cfg, n_rows, p).floor_s(machine.bandwidth["read_gbs"], machine.matmul["gflops"])
                      for p in positions]
            floor_ms = 1e3 * statistics.fmean(floors)
            eager = measured.get(EAGER)
            for name in runtimes:
                row = measured.get(name) or Row(name, images, n_rows, use_cfg, error=errors.get(name, "not run"))
                if row.step_ms is not None:
                    row.floor_ms = floor_ms
                    row.x_floor = row.step_ms / floor_ms
                    if eager is not None and eager.step_ms is not None:
                        row.speedup_vs_eager = eager.step_ms / row.step_ms
                    total_ms = (gpt_cfg.seq_len - 1) * row.step_ms + row.prefill_ms + (row.decode_image_ms or 0.0)
                    row.images_per_s = images / (total_ms / 1e3)
                rows.append(row)
        machine.load_after = _loadavg()
        return BenchResult(
            preset=gpt_cfg.name, tokenizer=tok_cfg.name, tokenizer_timed=tok_timed, seq_len=gpt_cfg.seq_len,
            positions=positions, machine=machine, rows=rows, seconds=time.perf_counter() - t_start,
        )
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = ("runtime", "batch (rows)", "ms/step", "× eager", "floor ms", "× floor", "images/s")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table_rows(result: BenchResult) -> list[tuple[str, ...]]:
    """The table as strings, one tuple per row (``HEADER`` order)."""
    out = []
    for r in result.rows:
        batch = f"{r.images}{'+CFG' if r.cfg else ''} ({r.rows})"
        if r.error is not None:
            out.append((r.runtime, batch, f"unavailable: {r.error}", "", "", "", ""))
            continue
        out.append((
            r.runtime, batch, _fmt(r.step_ms, ".2f"), _fmt(r.speedup_vs_eager, ".2f"), _fmt(r.floor_ms, ".2f"),
            _fmt(r.x_floor, ".2f"), _fmt(r.images_per_s, ".3g"),
        ))
    return out


def format_table(result: BenchResult) -> str:
    """Markdown table plus the machine line and the notes a reader needs."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    m = result.machine
    lines += [
        "",
        (
            f"GPT {result.preset} (random weights, fp32), seq_len {result.seq_len}; {len(result.positions)} timed "
            f"steps per row at positions {result.positions[0]}..{result.positions[-1]}; median ms/step."
        ),
        f"Machine: {m.line()}.",
        "images/s = images / ((seq_len - 1) x step + prefill"
        + (" + tokenizer decode)." if result.tokenizer_timed else "); tokenizer decoder not included (GPT only)."),
    ]
    loads: dict[str, list[str]] = {}
    for r in result.rows:
        if r.other_load is not None:
            part = f"{100 * r.other_load:.0f}%" + (f" ({r.runtime} run)" if r.note else "")
            batch = loads.setdefault(f"{r.images}{'+CFG' if r.cfg else ''}", [])
            if part not in batch:
                batch.append(part)
    if loads:
        lines.append(
            "CPU used by other processes while timing (share of all cores; noise indicator): "
            + ", ".join(f"batch {b}: {', '.join(v)}" for b, v in loads.items()) + "."
        )
    notes = dict.fromkeys(f"{r.runtime}: {r.note}" for r in result.rows if r.note)
    if notes:
        lines.append("Measured differently: " + "; ".join(notes) + ".")
    diffs = [f"{r.runtime} {r.images}{'+CFG' if r.cfg else ''}: {r.max_abs_diff_vs_eager:.1e}"
             for r in result.rows if r.max_abs_diff_vs_eager is not None]
    if diffs:
        lines.append("Max |logits - eager| over the timed steps: " + ", ".join(diffs) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/decode.py",
        description="Per-step decode time and images/s of each hita runtime vs eager PyTorch and the roofline floor.",
    )
    p.add_argument("--preset", default="GPT-B", choices=list(GPTConfig.PRESETS), help="GPT preset (default GPT-B)")
    p.add_argument("--batches", default="1,8",
                   help="images per batch, comma-separated; n > 1 runs with CFG (2n rows); default 1,8")
    p.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                   help=f"comma-separated, from {', '.join(RUNTIMES)} (default {','.join(DEFAULT_RUNTIMES)})")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per runtime and batch (default 24)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="turns per runtime and batch (default 4)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0, help="weights, class ids and tokens (default 0)")
    p.add_argument("--bandwidth-mib", type=int, default=512,
                   help="buffer for the bandwidth measurement, well above the L3 cache (default 512)")
    p.add_argument("--workdir", default=None, help="folder for exports, reused across runs (default: a temp dir)")
    p.add_argument("--json", dest="json_path", default=None, help="also write every number to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log: Log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        result = run_benchmark(
            preset=args.preset, batches=_csv(args.batches), runtimes=_csv(args.runtimes), steps=args.steps,
            warmup=args.warmup, rounds=args.rounds, threads=args.threads, workdir=args.workdir,
            seed=args.seed, bandwidth_mib=args.bandwidth_mib, log=log,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
