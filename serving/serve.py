"""``hita serve`` as a library call: pick the model files, write the repository, run Triton until told to stop.

Everything a user can get wrong is checked here, in this process, before Triton starts (ports,
runtime and model arguments, the artifacts' manifest, the Triton install), so mistakes cost one
line instead of a server log. SIGTERM and Ctrl-C are passed on to Triton as SIGTERM: it stops
taking requests, finishes the accepted ones (up to ``exit_timeout`` seconds), unloads and exits.
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .launcher import TritonServer, find_triton
from .repository import ENGINE_OF_RUNTIME, ServingSettings, write_repository

__all__ = ["ServeOptions", "resolve_settings", "serve"]


@dataclass(frozen=True)
class ServeOptions:
    """``hita serve``'s options (see ``hita serve --help``)."""

    settings: ServingSettings
    workdir: Path = Path("out/serve")
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout: int = 60
    load_timeout: float = 600.0


def check_ports(*ports: int) -> None:
    """Each port in 1..65535 and all different."""
    for p in ports:
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} must be in 1..65535")
    if len(set(ports)) != len(ports):
        raise ValueError(f"the HTTP, gRPC and metrics ports must differ, got {list(ports)}")


def resolve_settings(settings: ServingSettings, gpt: Path | None, tokenizer: Path | None, workdir: Path,
                     log: Callable[[str], None]) -> ServingSettings:
    """Fill in the model files: checkpoints for the torch runtime (default: the embedded model), a
    per-row ONNX export for ``onnxruntime`` without ``--artifacts`` (of the given checkpoints or the
    embedded model; cached in ``workdir``), and a verified manifest for every artifacts folder."""
    from hita.export.manifest import load_manifest
    from hita.jobs.sources import resolve_checkpoints

    if settings.runtime == "torch" or (settings.runtime == "onnxruntime" and not settings.artifacts):
        gpt, tokenizer, _ = resolve_checkpoints(gpt, tokenizer)
        if settings.runtime == "torch":
            return replace(settings, gpt=str(Path(gpt).resolve()), tokenizer=str(Path(tokenizer).resolve()))
        from .artifacts import serving_onnx

        attention = "plain" if settings.device.startswith("cuda") else "gqa"
        art = serving_onnx(workdir / f"artifacts-onnx-{attention}", gpt, tokenizer, max_batch=max(16, settings.max_rows),
                           attention=attention, log=log)
        return replace(settings, artifacts=str(art.resolve()))
    if gpt is not None or tokenizer is not None:
        raise ValueError(f"--runtime {settings.runtime} serves --artifacts; --gpt/--tokenizer are for the torch "
                         "runtime (or onnxruntime without --artifacts, which exports them)")
    engine = ENGINE_OF_RUNTIME[settings.runtime]
    load_manifest(settings.artifacts, expect_engine=engine, verify_files=False,
                  expect_sha256=settings.expect_manifest_sha256 or None)
    return replace(settings, artifacts=str(Path(settings.artifacts).resolve()))


def serve(
    options: ServeOptions,
    gpt: Path | None = None,
    tokenizer: Path | None = None,
    log: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Run the server until SIGTERM / SIGINT (or ``stop`` is set); returns Triton's exit code.

    Raises:
        ServerError: Triton exited or never became ready (its own first error line).
        TritonMissing, ValueError, ArtifactError: refused before the server starts.
    """
    check_ports(options.http_port, options.grpc_port, options.metrics_port)
    find_triton()                                        # one line now rather than a failed start later
    work = Path(options.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = replace(resolve_settings(options.settings, gpt, tokenizer, work, log), drain_timeout=options.exit_timeout)
    repo = write_repository(work / "repository", settings)
    server = TritonServer(repo, work, host=options.host, http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, exit_timeout=options.exit_timeout)
    stop = stop or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        server.start()
        log(f"loading the {settings.runtime} model in Triton (log: {server.log_path})")
        server.wait_ready(options.load_timeout)
        log(f"serving model 'hita' ({settings.runtime}) on http://{server.http_url} (HTTP), {server.grpc_url} "
            f"(gRPC), {server.metrics_url} (metrics); SIGTERM or Ctrl-C drains and stops")
        while server.process.poll() is None and not stop.wait(0.5):
            pass
        if server.process.poll() is not None:
            code = server.process.returncode
            log(f"tritonserver exited by itself with code {code}: {server.first_error()}")
            return code or 1
        log(f"draining: finishing accepted requests (up to {options.exit_timeout} s), then stopping")
        return server.stop()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
