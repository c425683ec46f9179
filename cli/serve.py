"""`hita serve`: the generation model on Triton Inference Server, with in-flight batching."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import Pos128, Precision, user_errors
from hita.runtimes.factory import Runtime


@user_errors
def serve(
    runtime: Annotated[Runtime, typer.Option(help="Step executor inside the server.")] = Runtime.onnxruntime,
    artifacts: Annotated[Optional[Path], typer.Option(
        help="Folder made by `hita export` (artifact runtimes). Default for onnxruntime: export the model "
             "with per-row positions into --workdir.")] = None,
    gpt: Annotated[Optional[Path], typer.Option(help="GPT checkpoint. Default: the embedded model.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer checkpoint. Default: the embedded model.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[Precision, typer.Option(help="GPT precision (torch runtime).")] = Precision.fp32,
    pos128: Annotated[Pos128, typer.Option(help="Embedding rule at position 128 (torch runtime).")] = Pos128.reference,
    host: Annotated[str, typer.Option(help="Address of all endpoints; 0.0.0.0 exposes them to the network.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    workdir: Annotated[Path, typer.Option(help="Model repository, cached export and server log.")] = Path("out/serve"),
    max_rows: Annotated[int, typer.Option(min=1, max=4096, help="Rows per step (CFG doubles an image's rows).")] = 16,
    queue_limit: Annotated[int, typer.Option(min=0, max=100000, help="Waiting requests before overload errors.")] = 64,
    max_images: Annotated[int, typer.Option(min=1, max=4096, help="Images one request may ask for.")] = 8,
    threads: Annotated[int, typer.Option(min=0, max=1024, help="Executor threads (0 = runtime default).")] = 0,
    in_flight: Annotated[bool, typer.Option(
        "--in-flight/--no-in-flight", help="Let requests join running batches (needs per-row positions).")] = True,
    exit_timeout: Annotated[int, typer.Option(min=1, max=86400, help="Seconds to finish requests after SIGTERM.")] = 60,
    expect_manifest_sha256: Annotated[Optional[str], typer.Option(
        "--expect-manifest-sha256", help="Serve only the export whose manifest.json has this sha256.")] = None,
    export_repository: Annotated[Optional[Path], typer.Option(
        "--export-repository", help="Write a standalone Triton model repository here (model files copied in) "
                                    "and exit, instead of serving.")] = None,
) -> None:
    """Serve class-conditional generation over HTTP, gRPC and metrics (Triton Inference Server)."""
    from hita.cli.common import fail
    from hita.serving.launcher import ServerError
    from hita.serving.repository import ServingSettings, check_repository_target, write_repository
    from hita.serving.serve import ServeOptions, resolve_settings, serve as run

    settings = ServingSettings(
        runtime=runtime.value, artifacts=str(artifacts) if artifacts else "", device=device,
        precision=precision.value, pos128=pos128.value, max_rows=max_rows, queue_limit=queue_limit,
        max_images=max_images, threads=threads, expect_manifest_sha256=expect_manifest_sha256 or "",
        in_flight="auto" if in_flight else "off",
    )
    if runtime is Runtime.torch and artifacts is not None:
        raise ValueError("--artifacts runs with an artifact runtime (onnxruntime, aoti, tensorrt); "
                         "the torch runtime serves --gpt/--tokenizer checkpoints")
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    if export_repository is not None:
        check_repository_target(export_repository)
        settings = resolve_settings(settings, gpt, tokenizer, workdir, log)
        write_repository(export_repository, settings, standalone=True)
        typer.echo(f"wrote Triton model repository {export_repository} (model 'hita', {runtime.value}); "
                   f"serve it with: tritonserver --model-repository {export_repository}")
        return
    try:
        code = run(ServeOptions(settings, workdir, host, http_port, grpc_port, metrics_port, exit_timeout),
                   gpt, tokenizer, log)
    except ServerError as e:
        fail(str(e), 1)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
