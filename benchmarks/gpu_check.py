"""The CUDA checks the issues name, in one prepared run for a session that is lent a GPU.

    python benchmarks/gpu_check.py --out DIR            # on the GPU machine; about 3-6 minutes on one H200
    python benchmarks/gpu_check.py --out DIR --device cpu --quick   # the same code paths, as a smoke test

Sections (each records its figures or the reason it was skipped; one failing section does not stop
the others):

1. ``device_sampling``: the loop's device-side sampler (CFG mix, temperature, top-k/top-p, inverse-CDF
   draw from the shared noise stream) against the host path on the same logits: token agreement.
2. ``cuda_graph_decode``: the torch executor replaying its decode step as one CUDA graph gives the
   same logits and tokens as eager, fp32 and bf16 (tiny preset and a full-size random GPT).
3. ``bf16_parity``: bf16 against fp32 eager on the same GPU: teacher-forced logit error and free-run
   token agreement under the shared noise (what bf16 costs; no threshold is implied).
4. ``timings``: ms per decode token (one loop step including sampling on the device) for eager and
   CUDA graphs, fp32 and bf16, at 1 image + CFG (2 rows) and 8 images + CFG (16 rows), beside the
   roofline floor measured in the same run: max(bytes read ÷ copy bandwidth, FLOPs ÷ GEMM rate).

Writes ``DIR/gpu_check.json`` (atomically) and prints a table. Figures go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from hita.config import GPTConfig
from hita.export.testing import tiny_models
from hita.models.gpt import HitaGPT
from hita.runtimes.loop import decode_one_token, generate_tokens, prefill, teacher_forced
from hita.runtimes.sampling import NoiseStream, SamplingOptions, sample
from hita.runtimes.torch_eager import TorchExecutor
from hita.util.files import atomic_write


def _random_gpt(preset: str, seed: int = 0) -> HitaGPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gpt = HitaGPT(GPTConfig.from_name(preset))
        with torch.no_grad():
            gpt.output.weight.normal_(0.0, 0.02)
    return gpt.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_sampling(device: torch.device, quick: bool) -> dict[str, Any]:
    """Same float32 logits, sampled on the device and on the host, for many option sets."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA (on the CPU both paths are the same code)"}
    g = torch.Generator().manual_seed(0)
    rows, vocab = (64, 4096) if quick else (256, 16384)
    agree, total = 0, 0
    cases = [SamplingOptions(seed=s, top_k=k, top_p=p, temperature=t)
             for s in range(3) for k in (0, 50) for p in (1.0, 0.9) for t in (0.7, 1.0)]
    for opts in cases:
        logits = torch.randn(rows, vocab, generator=g) * 3
        u = NoiseStream(opts.seed).uniform(step=5, rows=rows)
        host = sample(logits, opts, u)
        dev = sample(logits.to(device), opts, u).cpu()
        agree += int((host == dev).sum())
        total += rows
    return {"cases": len(cases), "draws": total, "token_agreement": agree / total}


def cuda_graph_decode(device: torch.device, quick: bool, preset: str) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    out: dict[str, Any] = {}
    models = {"tiny": lambda: tiny_models(0)[0]}
    if not quick:
        models[preset] = lambda: _random_gpt(preset)
    opts = SamplingOptions(cfg_scale=2.0, top_k=100, seed=11)
    for name, make in models.items():
        for dtype in (torch.float32, torch.bfloat16):
            eager = generate_tokens(TorchExecutor(make(), device=device, dtype=dtype), [1, 2, 3], opts,
                                    record_logits=True)
            graphed = generate_tokens(TorchExecutor(make(), device=device, dtype=dtype, cuda_graphs=True),
                                      [1, 2, 3], opts, record_logits=True)
            out[f"{name}/{str(dtype).split('.')[-1]}"] = {
                "logits_max_abs_diff": float((graphed.logits - eager.logits).abs().max()),
                "tokens_equal": bool(torch.equal(graphed.tokens, eager.tokens)),
            }
    return out


def bf16_parity(device: torch.device, quick: bool, preset: str) -> dict[str, Any]:
    gpt_name = "tiny" if quick else preset
    make = (lambda: tiny_models(0)[0]) if quick else (lambda: _random_gpt(preset))
    ids = [0, 1, 2, 3]
    opts = SamplingOptions(seed=3, top_k=0)
    ref = generate_tokens(TorchExecutor(make(), device=device), ids, opts)
    nh = make().cfg.n_holistic
    h, p = ref.tokens[:, :nh], ref.tokens[:, nh:]
    tf32 = teacher_forced(TorchExecutor(make(), device=device), ids, h, p)
    tf16 = teacher_forced(TorchExecutor(make(), device=device, dtype=torch.bfloat16), ids, h, p)
    free16 = generate_tokens(TorchExecutor(make(), device=device, dtype=torch.bfloat16), ids, opts)
    top1 = (tf32.argmax(-1) == tf16.argmax(-1)).float().mean()
    return {"model": gpt_name, "teacher_forced_max_abs_logit_diff": float((tf32 - tf16).abs().max()),
            "teacher_forced_top1_agreement": float(top1),
            "free_run_token_agreement": float((free16.tokens == ref.tokens).float().mean())}


def _floor_rates(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write counted as read) and dense GEMM rate (FLOP/s) here."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync(device)
    bw = 2 * n * 10 / (time.perf_counter() - t0)
    m = 8192 if device.type == "cuda" else 1024
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, y = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    x @ y
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        x @ y
    _sync(device)
    return {"bandwidth_Bps": bw, "matmul_flops": 2 * m**3 * 5 / (time.perf_counter() - t0)}


def _time_steps(ex: TorchExecutor, images: int, opts: SamplingOptions, steps: int) -> float:
    """Median ms of one loop token (decode + CFG mix + device sampling) over ``steps`` positions."""
    ids = torch.arange(images) % ex.gpt_config.num_classes
    logits = prefill(ex, ids, opts, host=False)
    noise = NoiseStream(opts.seed)
    tok = sample(logits, opts, noise.uniform(0, images), check=False)
    times = []
    for pos in range(1, steps + 1):
        _sync(ex.device)
        t0 = time.perf_counter()
        logits = decode_one_token(ex, tok, pos, opts, host=False)
        tok = sample(logits, opts, noise.uniform(pos, images), check=False)
        _sync(ex.device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[3:])  # the first steps include capture and warm-up
    return 1000 * times[len(times) // 2]


def timings(device: torch.device, quick: bool, preset: str) -> dict[str, Any]:
    name = "tiny" if quick else preset
    gpt = tiny_models(0)[0] if quick else _random_gpt(preset)
    cfg = gpt.cfg
    rates = _floor_rates(device)
    steps = 20 if quick else 60
    opts = SamplingOptions(cfg_scale=2.0, top_k=100, seed=0)
    out: dict[str, Any] = {"model": name, **rates, "rows": {}}
    modes = [("eager", False)] + ([("cuda_graphs", True)] if device.type == "cuda" else [])
    for images in (1, 8):
        rows = 2 * images
        entry: dict[str, Any] = {}
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).split(".")[-1]
            weights = sum(p.numel() for p in gpt.parameters()) * dtype.itemsize
            kv = 2 * cfg.n_layer * rows * cfg.n_head * cfg.cache_len * cfg.head_dim * dtype.itemsize
            flops = 2 * sum(p.numel() for p in gpt.parameters()) * rows
            floor = 1000 * max((weights + kv) / rates["bandwidth_Bps"], flops / rates["matmul_flops"])
            entry[f"floor_ms/{dname}"] = floor
            for mode, graphs in modes:
                ex = TorchExecutor(_random_gpt(preset) if not quick else tiny_models(0)[0], device=device,
                                   dtype=dtype, cuda_graphs=graphs)
                ms = _time_steps(ex, images, opts, steps)
                entry[f"{mode}/{dname}_ms"] = ms
                entry[f"{mode}/{dname}_x_floor"] = ms / floor
                del ex
        out["rows"][str(rows)] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="GPT-B", help="full-size GPT preset (random weights)")
    ap.add_argument("--quick", action="store_true", help="tiny model only (a smoke test of the code paths)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                              "device": str(device), "quick": args.quick}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                         "memory_GiB": round(props.total_memory / 2**30, 1)}
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "device_sampling": lambda: device_sampling(device, args.quick),
        "cuda_graph_decode": lambda: cuda_graph_decode(device, args.quick, args.preset),
        "bf16_parity": lambda: bf16_parity(device, args.quick, args.preset),
        "timings": lambda: timings(device, args.quick, args.preset),
    }
    failed = 0
    for name, run in sections.items():
        t0 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            report[name] = run()
        except Exception as e:  # noqa: BLE001 - record it and go on: one device session, every figure counts
            failed += 1
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: report[name]}, indent=1, default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(args.out / "gpu_check.json", lambda tmp: Path(tmp).write_text(text))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
