"""Run the ``tritonserver`` that the ``nvidia-pytriton`` wheel bundles, for this interpreter.

The wheel ships the real Triton Inference Server binary, its Python backend and one backend "stub"
per Python version; we use those files, not PyTriton's Python API (the model must run inside the
stub to answer HTTP requests out of order, see :mod:`hita.serving.triton_model`). Three things make
the stub run our model in *this* environment, each learnt the hard way:

- ``LD_LIBRARY_PATH`` starts with this interpreter's ``LIBDIR``: the stub links ``libpython3.X.so``
  and would otherwise load the system's build of the same version, whose objects differ (model load
  then fails with ``'_thread.RLock' object has no attribute '_recursion_count'``).
- ``PATH`` starts with this interpreter's folder: the embedded interpreter finds its ``sys.prefix``
  through ``python3`` on ``PATH``, so a virtual environment's site-packages (hita, torch) are seen.
- numpy below 2: the backend's tensor bridge is built against numpy 1 and hands over empty arrays
  under numpy 2 (refused up front, in one line).

Stopping drains. Triton's own SIGTERM handling would not: it counts a request as in flight only
until ``execute`` returns, which for our model is at once, so it would close the endpoints and
unload the model while the scheduler still decodes accepted requests (their answers would be
lost). :meth:`TritonServer.stop` therefore first asks the model to drain through a file in its
folder (``drain``; see :mod:`hita.serving.triton_model`): it refuses new requests as unavailable,
finishes and answers the accepted ones over the still-open endpoints and writes ``drained``. Only
then does Triton get SIGTERM (and a short exit timeout: nothing is left to wait for). The server
runs in its own session, so a Ctrl-C in the terminal reaches ``hita serve`` only, which drains.

Nothing here imports ``pytriton``: the wheel is only located (``importlib.util.find_spec``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .protocol import DRAIN_FILE, DRAINED_FILE, MODEL_NAME as MODEL

__all__ = ["TritonMissing", "ServerError", "TritonInstall", "find_triton", "TritonServer", "free_ports"]

EXIT_AFTER_DRAIN = 5  # Triton's own exit timeout: after our drain only idle keep-alive connections remain
INSTALL_HINT = "pip install nvidia-pytriton (it bundles tritonserver and its Python backend; pulls numpy<2)"


class TritonMissing(ValueError):
    """This environment cannot run the bundled Triton server (missing wheel, stub or numpy 1)."""


class ServerError(RuntimeError):
    """The server exited or never became ready; the message carries its own first error line."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's files are.

    Fields:
        root: the wheel's ``tritonserver`` folder (``bin/``, ``backends/``, ``python_backend_stubs/``).
        libs: the wheel's bundled shared libraries (``nvidia_pytriton.libs``).
        stub: the Python-backend stub built for this interpreter's ``major.minor``.
    """

    root: Path
    libs: Path
    stub: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"


def find_triton() -> TritonInstall:
    """Locate the bundled server for this interpreter.

    Raises:
        TritonMissing: no ``nvidia-pytriton``, no stub for this Python version, or numpy >= 2.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonMissing(f"Triton Inference Server is not installed in {sys.prefix}; {INSTALL_HINT}")
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = pkg / "tritonserver"
    libs = pkg.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        libs = root / "external_libs"          # an editable install of pytriton keeps them here
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonMissing(f"{root}: the nvidia-pytriton install has no tritonserver binary; {INSTALL_HINT}")
    if not stub.is_file():
        raise TritonMissing(f"nvidia-pytriton has no Python-backend stub for Python {version}; "
                            "serve from Python 3.8 - 3.13")
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonMissing(f"Triton's Python backend needs numpy < 2 and this environment has numpy "
                            f"{numpy.__version__}; pip install 'numpy<2'")
    return TritonInstall(root, libs, stub)


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size or dst.stat().st_mtime < src.stat().st_mtime:
        shutil.copy2(src, dst)


def prepare_backends(install: TritonInstall, workdir: str | Path) -> Path:
    """A ``backends`` folder for ``--backend-directory``: the wheel's Python backend with this
    interpreter's stub next to it (the server looks for the stub there). Returns the folder."""
    python = Path(workdir) / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (install.root / "backends" / "python").iterdir():
        if f.is_file():
            _copy_if_changed(f, python / f.name)
    _copy_if_changed(install.stub, python / "triton_python_backend_stub")
    return python.parent


def server_env(install: TritonInstall) -> dict[str, str]:
    """The environment the server and its stubs need (see the module docstring)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launching process dies, so no server outlives it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """One ``tritonserver`` process over a model repository.

    Args:
        repository: the model repository folder.
        workdir: where the prepared backends and the server log go.
        host: address of the HTTP, gRPC and metrics endpoints (loopback unless told otherwise).
        http_port, grpc_port, metrics_port: the three ports.
        exit_timeout: seconds :meth:`stop` lets the model finish accepted requests.
        log_verbose: Triton's ``--log-verbose`` level.
    """

    def __init__(self, repository: str | Path, workdir: str | Path, *, host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 exit_timeout: int = 60, log_verbose: int = 0) -> None:
        self.install = find_triton()
        self.repository, self.workdir = Path(repository), Path(workdir)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.exit_timeout, self.log_verbose = exit_timeout, log_verbose
        self.log_path = self.workdir / "tritonserver.log"
        self.control = self.repository / MODEL   # where the model looks for the drain file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        backends = prepare_backends(self.install, self.workdir)
        return [
            str(self.install.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={EXIT_AFTER_DRAIN}", f"--log-verbose={self.log_verbose}",
            "--disable-auto-complete-config", "--strict-readiness=true",
        ]

    def start(self) -> "TritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(cmd, env=server_env(self.install), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                            start_new_session=True)
        finally:
            log.close()
        return self

    def ready(self) -> bool:
        """``GET /v2/health/ready`` answers 200 (the model is loaded and the server not stopping)."""
        return self._get(f"http://{self.http_url}/v2/health/ready")

    def _get(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server is ready.

        Raises:
            ServerError: it exited first (with its first error line) or ``timeout`` passed.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: {self.first_error()}")
            if self.ready() and self._get(self.metrics_url):   # the metrics port opens a moment later
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver did not become ready within {timeout:.0f} s; see {self.log_path}")

    def first_error(self) -> str:
        """The most telling line of the server log: a model load failure, else the first error."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"no log at {self.log_path}"
        harmless = ("CudaDriverHelper", "NVML", "DCGM", "GPU metrics")   # no GPU here: expected noise
        for key in ("failed to load", "Signal (11)", "error: ", "E1", "E0"):
            for line in lines:
                if key in line and not any(h in line for h in harmless):
                    if key == "Signal (11)":
                        return f"tritonserver crashed (segmentation fault); see {self.log_path}"
                    text = line.split("] ", 1)[-1].strip().strip('"')
                    return text.split(" version 1: ", 1)[-1] if "failed to load" in text else text
        return f"no error line in {self.log_path}"

    def drain(self) -> bool:
        """Ask the model to finish the accepted requests and refuse new ones (``drain`` file), and
        wait until it says ``drained`` (or ``exit_timeout`` passes, or the server dies). Returns
        whether it drained."""
        (self.control / DRAIN_FILE).touch()
        end = time.monotonic() + self.exit_timeout
        while time.monotonic() < end and self.process is not None and self.process.poll() is None:
            if (self.control / DRAINED_FILE).exists():
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float | None = None) -> int:
        """Drain (see :meth:`drain`), then SIGTERM; kill only past ``timeout`` (default: the exit
        timeout plus a margin). Returns the server's exit code."""
        if self.process is None:
            return 0
        drained = False
        if self.process.poll() is None and self.ready():
            drained = self.drain()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout if timeout is not None else self.exit_timeout + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reap_stubs()
        if code and drained and "Exit timeout expired" in self.log_path.read_text(errors="replace"):
            # Every request was answered; Triton only gave up waiting for idle keep-alive connections.
            return 0
        return code

    def _reap_stubs(self) -> None:
        """Kill what is left of the server's session (its Python-backend stubs outlive a server that
        crashed or was killed); the session is the one :meth:`start` created for it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _url_host(host: str) -> str:
    """An address as URLs write it: IPv6 in brackets; the wildcard as loopback for our own probes."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (servers run side by side in tests and the
    load test; another process could still take one before the server binds it)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
