"""`hita build-cpp`: build the C++ host (runtimes/cpp) against the installed torch wheel's libtorch."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from hita.cli.common import fail, user_errors


@user_errors
def build_cpp(
    out: Annotated[Path, typer.Option("--out", help="CMake build folder.")] = Path("build/cpp"),
    cxx_standard: Annotated[int, typer.Option("--cxx-standard", min=17, max=20, help="C++ standard: 17 (falls back to 20 if it fails) or 20.")] = 17,
    jobs: Annotated[int, typer.Option(min=0, help="Parallel compile jobs (0 = up to 4).")] = 0,
) -> None:
    """Build `hita-host` and libhita_host with CMake; prints the binary path."""
    from hita.jobs.build_cpp import CppBuildError, build_host

    if cxx_standard not in (17, 20):
        raise ValueError(f"--cxx-standard must be 17 or 20, got {cxx_standard}")
    try:
        res = build_host(out, cxx_standard=cxx_standard, jobs=jobs or None)
    except CppBuildError as e:
        fail(str(e))
    typer.echo(f"built {res.binary} (C++{res.cxx_standard}, {res.seconds:.1f} s); "
               f"run: {res.binary} --artifacts DIR --classes 1,2,3 --out DIR")


def register(app: typer.Typer) -> None:
    app.command("build-cpp")(build_cpp)
