"""Build and run the C++ host (``runtimes/cpp``) against the libtorch of the installed torch wheel.

:func:`build_host` runs CMake with ``torch.utils.cmake_prefix_path`` (the wheel's ``TorchConfig``)
and returns the path of ``hita-host``; the same as the one documented command::

    cmake -S runtimes/cpp -B build/cpp \\
        -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \\
        && cmake --build build/cpp -j

Besides cmake and a C++ compiler the host needs ``apt-get install nlohmann-json3-dev libstb-dev
libcli11-dev libssl-dev``; when one is missing, :class:`CppBuildError` is that one line.

:func:`run_host` runs the binary on an AOTI artifacts folder with the loop's
:class:`~hita.runtimes.sampling.SamplingOptions` and reads back its JSON report (tokens, per-step
milliseconds, PNG paths). The host draws the same tokens as ``generate_tokens`` over
:class:`~hita.runtimes.aoti.AotiExecutor` for the same folder, ids and options.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import hita.runtimes
from hita.runtimes.sampling import SamplingOptions
from hita.util.files import claim_folder
from hita.util.log import Log, logger

__all__ = [
    "BINARY_NAME",
    "SOURCE_DIR",
    "BuildResult",
    "CppBuildError",
    "HostRun",
    "HostRunError",
    "build_host",
    "run_host",
    "torch_cmake_prefix",
]

SOURCE_DIR = Path(hita.runtimes.__file__).resolve().parent / "cpp"
BINARY_NAME = "hita-host"

class CppBuildError(RuntimeError):
    """CMake or the compiler failed, or a build tool is missing; the message says which and why."""

class HostRunError(RuntimeError):
    """``hita-host`` exited non-zero. ``returncode`` 2 = refused input or artifacts (the message is its
    one-line ``error:``), 1 = another failure."""

    def __init__(self, message: str, returncode: int, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr

@dataclass(frozen=True)
class BuildResult:
    """Fields: binary (``hita-host``), library (``libhita_host.so``), build_dir, cxx_standard (17 or
    20: the one that compiled), seconds (configure + build wall time)."""

    binary: Path
    library: Path
    build_dir: Path
    cxx_standard: int
    seconds: float

@dataclass(frozen=True)
class HostRun:
    """What one ``hita-host`` run produced. Unpacks as ``tokens, seconds = run_host(...)``.

    Fields:
        tokens: int64 ``[n, n_holistic + n_patch]``.
        seconds: generation time measured by the host (prefill, every step with its draw, decoding
            to pixels), without process start and package loading.
        wall_seconds: the whole subprocess, loading included.
        prefill_ms, step_ms, decode_image_ms: the host's timings (``step_ms`` one per decode step:
            package call, logits to the CPU, CFG mix and draw).
        forward_ms: per decode step, the package call and the copy of its logits to the CPU only
            (what ``benchmarks/decode.py`` times for the Python executors).
        pngs: written PNG files (empty with ``images=False``).
        report: the raw JSON report.
    """

    tokens: torch.Tensor
    seconds: float
    wall_seconds: float
    prefill_ms: float
    step_ms: list[float]
    forward_ms: list[float]
    decode_image_ms: float
    pngs: list[Path] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter((self.tokens, self.seconds))

    @property
    def mean_step_ms(self) -> float:
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0

def torch_cmake_prefix() -> str:
    """``torch.utils.cmake_prefix_path``: the folder holding the wheel's ``Torch/TorchConfig.cmake``."""
    return torch.utils.cmake_prefix_path

def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

class _MissingDependency(CppBuildError):
    """CMake found no copy of a library the host needs; a newer C++ standard will not help."""

def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        # runtimes/cpp/CMakeLists.txt names a missing library and its apt package on one line.
        missing = next((ln.strip() for ln in output.splitlines() if ln.strip().startswith("hita-host: ")), None)
        if missing is not None:
            raise _MissingDependency(missing.removeprefix("hita-host: "))
        raise CppBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...\n{_tail(output)}")
    return proc

def _our_cmake_build(folder: Path) -> bool:
    """A CMake build folder of this project's host (from before run markers existed)."""
    try:
        cache = (folder / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return False
    return "CMAKE_PROJECT_NAME:STATIC=hita_host" in cache


def build_host(
    out_dir: str | Path = "build/cpp",
    *,
    cxx_standard: int = 17,
    fallback_cxx20: bool = True,
    build_type: str = "Release",
    jobs: int | None = None,
    progress: bool | Log = True,
) -> BuildResult:
    """Configure and build ``hita-host`` (and ``libhita_host``) in ``out_dir``.

    Rebuilding an up-to-date folder only re-checks timestamps (a second or two), so callers may
    call this every time. When the C++17 build fails and ``fallback_cxx20`` is set, the folder is
    reconfigured with ``-DHITA_CXX_STANDARD=20`` and built again; the result says which standard
    compiled.

    Args:
        out_dir: CMake build folder (created).
        cxx_standard: 17 (default) or 20.
        fallback_cxx20: retry with C++20 when the C++17 build fails.
        build_type: CMake build type.
        jobs: parallel compile jobs (default: CPU count, at most 4).
        progress: print one line per phase to stderr, or a callable that takes each line.
    Returns:
        :class:`BuildResult`.
    Raises:
        CppBuildError: cmake, a C++ compiler or a library is missing (for a library the message is
            one line naming the apt packages), or configuring/compiling failed (the message ends
            with the tail of the tool's output).
    """
    if cxx_standard not in (17, 20):
        raise ValueError(f"cxx_standard must be 17 or 20, got {cxx_standard}")
    log = logger(progress)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise CppBuildError("cmake not found on PATH; install it (apt-get install cmake, or pip install cmake)")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise CppBuildError("no C++ compiler found (g++ or clang++); install one (apt-get install g++)")
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise CppBuildError(f"{SOURCE_DIR}: the C++ sources are missing from this installation")
    out = claim_folder(Path(out_dir).absolute(), "build-cpp", "--out", owned=_our_cmake_build)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    standards = [cxx_standard] + ([20] if fallback_cxx20 and cxx_standard == 17 else [])
    for i, std in enumerate(standards):
        try:
            _run([cmake, "-S", str(SOURCE_DIR), "-B", str(out), f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix()}",
                  f"-DCMAKE_BUILD_TYPE={build_type}", f"-DHITA_CXX_STANDARD={std}"], "cmake configure")
            _run([cmake, "--build", str(out), "-j", str(jobs)], f"C++{std} build")
            break
        except CppBuildError as e:
            if i + 1 == len(standards) or isinstance(e, _MissingDependency):
                raise
            log(f"C++{std} build failed; retrying with C++{standards[i + 1]}: {str(e).splitlines()[0]}")
    seconds = time.perf_counter() - t0
    binary, library = out / BINARY_NAME, out / "libhita_host.so"
    if not binary.is_file():
        raise CppBuildError(f"{binary}: the build finished but produced no binary")
    return BuildResult(binary, library, out, std, seconds)

def _flags(opts: SamplingOptions) -> list[str]:
    return [
        "--cfg-scale", repr(float(opts.cfg_scale)),
        "--cfg-interval", str(int(opts.cfg_interval)),
        "--temperature", repr(float(opts.temperature)),
        "--top-k", str(int(opts.top_k)),
        "--top-p", repr(float(opts.top_p)),
        "--seed", str(int(opts.seed)),
    ]

def run_host(
    binary: str | Path,
    artifacts: str | Path,
    class_ids: Sequence[int],
    options: SamplingOptions,
    out_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    row_offset: int = 0,
    threads: int | None = None,
    timeout: float | None = None,
    expect_manifest_sha256: str | None = None,
) -> HostRun:
    """Run ``hita-host`` once and parse its ``--json`` report.

    Args:
        binary: path of ``hita-host`` (from :func:`build_host`).
        artifacts: an AOTI artifacts folder (manifest format 2).
        class_ids: one id per image.
        options: sampling options (the same object the Python loop takes).
        out_dir: folder for the PNGs; ``None`` = tokens only (``--no-images``).
        device: ``"cpu"`` or ``"cuda[:i]"``.
        row_offset: global index of the first image in the noise stream.
        threads: intra-op threads (``None`` = libtorch's default).
        timeout: seconds before the run is killed.
        expect_manifest_sha256: pin: the host refuses any ``manifest.json`` whose sha256 differs
            (:func:`hita.export.manifest.manifest_sha256` of the reviewed export). Required for
            AOTI folders when ``HITA_REQUIRE_PINNED=1`` is set.
    Returns:
        :class:`HostRun` (``tokens, seconds = run_host(...)`` also works).
    Raises:
        HostRunError: the host exited non-zero; the message is its one-line error.
    """
    ids = ",".join(str(int(c)) for c in class_ids)
    cmd = [str(binary), "--artifacts", str(artifacts), "--classes", ids, "--device", device, "--json",
           "--row-offset", str(int(row_offset)), *_flags(options)]
    cmd += ["--out", str(out_dir)] if out_dir is not None else ["--no-images"]
    if threads:
        cmd += ["--threads", str(int(threads))]
    if expect_manifest_sha256 is not None:
        cmd += ["--expect-manifest-sha256", expect_manifest_sha256]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        msg = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "no output")
        raise HostRunError(f"hita-host exited {proc.returncode}: {msg.removeprefix('error: ')}", proc.returncode, proc.stderr)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return HostRun(
        tokens=torch.tensor(report["tokens"], dtype=torch.int64),
        seconds=float(report["seconds"]),
        wall_seconds=wall,
        prefill_ms=float(report["prefill_ms"]),
        step_ms=[float(x) for x in report["step_ms"]],
        forward_ms=[float(x) for x in report["forward_ms"]],
        decode_image_ms=float(report["decode_image_ms"]),
        pngs=[Path(p) for p in report["pngs"]],
        report=report,
    )
