"""Load test of ``hita serve``: in-flight batching against one-request-at-a-time, same load, one run.

``python benchmarks/serve.py --help``. For each mode the script starts a real Triton server on
loopback ports (the repository ``hita serve`` writes, the same ONNX export for both modes), then
replays one fixed load: ``--requests`` requests whose arrival times are a Poisson process of
``--rate`` requests/s (seeded), sent by ``--clients`` concurrent tritonclient clients (gRPC). A
request that arrives while every client is busy waits for a free one, as it would behind a real
client pool. Each request asks for ``--images`` images of class ``i % classes`` with seed ``i``.

Modes:

- ``in-flight``: ``--max-rows`` rows per step; requests join the running batch at the next step.
- ``one-at-a-time``: the server runs one request at a time (rows per step = one request's rows,
  newcomers only at sequence start): what serving the model without batching gives.

Printed per mode: requests answered and failed, images/s (images answered / time from the first
send to the last answer), latency percentiles (send -> answer) and response time (arrival ->
answer, which adds waiting for a client), and the mean rows per decode step from the server's
metrics. Then the ratio of images/s, and whether every request got the same tokens in both modes
and (for ``--check-offline`` requests) the tokens of offline generation.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Outcome:
    index: int
    arrival: float
    sent: float = 0.0
    done: float = 0.0
    error: str = ""
    tokens: list | None = None


@dataclass
class ModeResult:
    mode: str
    requests: int
    answered: int
    failed: int
    images_per_s: float
    latency_ms: dict
    response_ms: dict
    mean_rows_per_step: float
    seconds: float
    errors: list = field(default_factory=list)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1)}


def _model_files(args, work: Path) -> tuple[Path, Path]:
    """Checkpoints to serve: given, random weights of ``--preset``, or the embedded model."""
    if args.gpt and args.tokenizer:
        return Path(args.gpt), Path(args.tokenizer)
    if args.preset:
        from hita.checkpoint import save_model
        from hita.config import GPTConfig, TokenizerConfig
        from hita.models.gpt import HitaGPT
        from hita.models.tokenizer import HitaTokenizer

        gpt_file, tok_file = work / f"{args.preset}-gpt.safetensors", work / f"{args.tokenizer_preset}-tok.safetensors"
        if not (gpt_file.is_file() and tok_file.is_file()):
            torch.manual_seed(0)
            gpt = HitaGPT(GPTConfig.from_name(args.preset))
            torch.nn.init.normal_(gpt.output.weight, std=0.02)   # the head starts at zero (spec 4.5)
            tok = HitaTokenizer(TokenizerConfig.from_name(args.tokenizer_preset))
            save_model(gpt, gpt.cfg, gpt_file)
            save_model(tok, tok.cfg, tok_file)
        return gpt_file, tok_file
    from hita.assets import default_model

    d = default_model()
    return d.gpt, d.tokenizer


def _run_load(server, args, opts_of, arrivals: list[float]) -> list[Outcome]:
    """Replay the arrivals through ``args.clients`` gRPC clients; returns one outcome per request."""
    from hita.serving.client import ServerRefused, connect, generate

    todo: queue.Queue = queue.Queue()
    start = time.monotonic() + 0.5
    outcomes = [Outcome(i, start + t) for i, t in enumerate(arrivals)]
    for o in outcomes:
        todo.put(o)
    deadline = start + args.max_seconds

    def client_loop():
        conn = connect(server.grpc_url, "grpc")
        try:
            while True:
                try:
                    o = todo.get_nowait()
                except queue.Empty:
                    return
                wait = o.arrival - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() > deadline:
                    o.error = "not sent: --max-seconds reached"
                    continue
                o.sent = time.monotonic()
                try:
                    r = generate(conn, [o.index % args.classes] * args.images, opts_of(o.index), protocol="grpc",
                                 return_tokens=True)
                    o.tokens = r.tokens.tolist()
                except ServerRefused as e:
                    o.error = str(e)
                o.done = time.monotonic()
        finally:
            conn.close()

    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def _serve_mode(mode: str, model: dict, args, work: Path, opts_of, arrivals, log) -> tuple[ModeResult, list]:
    from hita.serving.client import server_metrics
    from hita.serving.launcher import TritonServer, free_ports
    from hita.serving.repository import ServingSettings, write_repository

    rows_per_request = args.images * (2 if args.cfg_scale > 1 else 1)
    settings = ServingSettings(
        runtime=args.runtime, **model, queue_limit=max(64, args.requests),
        max_images=args.images, threads=args.threads,
        max_rows=args.max_rows if mode == "in-flight" else rows_per_request,
        in_flight="auto" if mode == "in-flight" else "off")
    repo = write_repository(work / mode / "repository", settings)
    http, grpc, prom = free_ports(3)
    server = TritonServer(repo, work / mode, http_port=http, grpc_port=grpc, metrics_port=prom).start()
    try:
        server.wait_ready(600)
        from hita.serving.client import connect, generate

        warm = connect(server.grpc_url, "grpc")
        generate(warm, [0] * args.images, opts_of(0), protocol="grpc")   # first-call costs out of the numbers
        warm.close()
        before = server_metrics(server.metrics_url)
        log(f"{mode}: {len(arrivals)} requests, {args.clients} clients, Poisson {args.rate}/s ...")
        outcomes = _run_load(server, args, opts_of, arrivals)
        after = server_metrics(server.metrics_url)
    finally:
        code = server.stop()
    if code:
        log(f"{mode}: tritonserver exited with code {code}: {server.first_error()}")
    ok = [o for o in outcomes if not o.error]
    sent = [o for o in outcomes if o.sent]
    span = max(o.done for o in ok) - min(o.sent for o in sent) if ok else float("nan")
    steps = after["hita_steps_total"] - before["hita_steps_total"]
    rows = after["hita_rows_stepped_total"] - before["hita_rows_stepped_total"]
    result = ModeResult(
        mode=mode, requests=len(outcomes), answered=len(ok), failed=len(outcomes) - len(ok),
        images_per_s=round(len(ok) * args.images / span, 3) if ok else 0.0,
        latency_ms=_percentiles([o.done - o.sent for o in ok]),
        response_ms=_percentiles([o.done - o.arrival for o in ok]),
        mean_rows_per_step=round(rows / steps, 2) if steps else 0.0, seconds=round(span, 1),
        errors=sorted({o.error for o in outcomes if o.error})[:5])
    return result, outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="executor in the server (torch: the checkpoints, eager)")
    p.add_argument("--artifacts", type=Path, help="a per-row ONNX export to serve (default: export the model)")
    p.add_argument("--gpt", type=Path, help="GPT checkpoint (with --tokenizer); default: the embedded model")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--preset", help="serve random weights of this GPT preset (e.g. GPT-B) instead")
    p.add_argument("--tokenizer-preset", default="hita-v", help="tokenizer preset paired with --preset")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=200, help="requests per mode")
    p.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--classes", type=int, default=10, help="request i asks for class i %% classes")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--max-rows", type=int, default=16, help="rows per step, in-flight mode")
    p.add_argument("--threads", type=int, default=0, help="executor threads in the server (0 = default)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long, per mode")
    p.add_argument("--check-offline", type=int, default=4, help="requests whose tokens are checked offline")
    p.add_argument("--modes", default="in-flight,one-at-a-time")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--workdir", type=Path, default=Path("out/bench-serve"))
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.artifacts import serving_onnx

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gpt_file, tok_file = _model_files(args, work)
    if args.runtime == "torch":
        model = {"gpt": str(Path(gpt_file).resolve()), "tokenizer": str(Path(tok_file).resolve())}
    else:
        artifacts = args.artifacts or serving_onnx(work / "artifacts-onnx", gpt_file, tok_file,
                                                   max_batch=max(16, args.max_rows), log=log)
        model = {"artifacts": str(Path(artifacts).resolve())}
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests)).tolist()

    def opts_of(i: int) -> SamplingOptions:
        return SamplingOptions(cfg_scale=args.cfg_scale, seed=i)

    results, tokens = [], {}
    for mode in args.modes.split(","):
        r, outcomes = _serve_mode(mode, model, args, work, opts_of, arrivals, log)
        results.append(r)
        tokens[mode] = {o.index: o.tokens for o in outcomes if o.tokens is not None}
    print(f"{'mode':<14} {'answered':>8} {'failed':>6} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'resp p99':>9} {'rows/step':>9}")
    for r in results:
        lat, resp = r.latency_ms, r.response_ms
        print(f"{r.mode:<14} {r.answered:>8} {r.failed:>6} {r.images_per_s:>9.3f} {lat.get('p50', 0):>8.0f} "
              f"{lat.get('p95', 0):>8.0f} {lat.get('p99', 0):>8.0f} {resp.get('p99', 0):>9.0f} {r.mean_rows_per_step:>9.2f}")
        for e in r.errors:
            print(f"  {r.mode} error: {e}")
    summary: dict = {"results": [asdict(r) for r in results], "args": {k: str(v) for k, v in vars(args).items()}}
    if len(results) == 2 and results[1].images_per_s:
        summary["speedup"] = round(results[0].images_per_s / results[1].images_per_s, 2)
        common = set(tokens[results[0].mode]) & set(tokens[results[1].mode])
        same = all(tokens[results[0].mode][i] == tokens[results[1].mode][i] for i in common)
        summary["same_tokens_both_modes"] = {"requests": len(common), "identical": same}
        print(f"in-flight / one-at-a-time images/s: {summary['speedup']}x; tokens identical in both modes for "
              f"{len(common)} requests: {same}")
    if args.check_offline:
        from hita.runtimes.factory import make_executor
        from hita.runtimes.loop import generate_tokens

        ex = make_executor(args.runtime, **{k: Path(v) for k, v in model.items()})
        first = tokens[results[0].mode]
        checked = sorted(first)[: args.check_offline]
        ok = all(generate_tokens(ex, [i % args.classes] * args.images, opts_of(i)).tokens.tolist() == first[i]
                 for i in checked)
        summary["offline_check"] = {"requests": len(checked), "identical": ok}
        print(f"tokens of {len(checked)} served requests equal offline generation: {ok}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
