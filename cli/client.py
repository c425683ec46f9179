"""`hita client`: ask a running `hita serve` for images and write them as PNG files.

Images go out in requests of ``--per-request`` images, several at once (the server batches them
in flight); request ``k`` carries ``row_offset`` = the index of its first image, so the files equal
what ``hita generate`` writes offline for the same classes and options (same names too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hita.cli.common import (
    CFG_INTERVAL_OPT, CFG_SCALE_OPT, SEED_OPT, TEMPERATURE_OPT, TOP_K_OPT, TOP_P_OPT, fail, user_errors,
)


@user_errors
def client(
    classes: Annotated[str, typer.Option(help="Class ids, e.g. 1,2,5-7.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the PNGs.")] = Path("out/client"),
    url: Annotated[str, typer.Option(help="host:port of the server (HTTP 8000 or gRPC 8001 by default).")] = "127.0.0.1:8000",
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    per_class: Annotated[int, typer.Option(min=1, max=100000, help="Images per class id.")] = 1,
    per_request: Annotated[int, typer.Option(min=1, max=4096, help="Images per request (the server has a limit).")] = 4,
    parallel: Annotated[int, typer.Option(min=1, max=256, help="Requests in flight at once.")] = 4,
    cfg_scale: CFG_SCALE_OPT = 1.5,
    cfg_interval: CFG_INTERVAL_OPT = -1,
    temperature: TEMPERATURE_OPT = 1.0,
    top_k: TOP_K_OPT = 0,
    top_p: TOP_P_OPT = 1.0,
    seed: SEED_OPT = 0,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also save the tokens (tokens.json).")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for a request's images.")] = 600.0,
) -> None:
    """Generate images on a running `hita serve` (HTTP or gRPC) and save one PNG per image."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import closing

    from hita.jobs.generate import check_output_dir, parse_classes
    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import ServerRefused, connect, generate
    from hita.util.files import atomic_write
    from hita.util.images import save_pngs

    opts = SamplingOptions(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
    ids = parse_classes(classes, 2**62, per_class)  # the server checks the ids against its model
    out = check_output_dir(out, create=True)
    connect(url, protocol, timeout).close()         # a bad --url or --protocol fails here, once

    def one(a: int):
        chunk = ids[a:a + per_request]
        with closing(connect(url, protocol, timeout)) as conn:   # no idle connection left behind
            result = generate(conn, chunk, opts, protocol=protocol, return_tokens=tokens, row_offset=a,
                              timeout=timeout)
        names = [f"{i:04d}_class{c}.png" for i, c in enumerate(chunk, start=a)]
        return save_pngs(result.images, out, names), result.tokens

    try:
        with ThreadPoolExecutor(parallel) as pool:
            parts = list(pool.map(one, range(0, len(ids), per_request)))
    except ServerRefused as e:
        fail(f"the server at {url} refused: {e}" + ("; retry later" if e.retry else ""), 1)
    if tokens:
        toks = [row.tolist() for _, t in parts for row in t]
        atomic_write(out / "tokens.json", lambda tmp: Path(tmp).write_text(json.dumps(
            {"class_ids": ids, "options": vars(opts), "tokens": toks})))
    typer.echo(f"wrote {sum(len(f) for f, _ in parts)} PNGs to {out} ({url}, {protocol})")


def register(app: typer.Typer) -> None:
    app.command("client")(client)
