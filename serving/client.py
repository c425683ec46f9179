"""Ask a running ``hita serve`` for images over HTTP or gRPC (``tritonclient``, imported lazily).

One call per request: :func:`generate` sends the class ids and sampling options of
:mod:`~hita.serving.protocol` and returns uint8 images (and the tokens when asked). Server refusals
come back as :class:`ServerRefused` with the server's one-line reason and a ``retry`` flag (overload
and shutdown are worth retrying; a bad field is not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hita.runtimes.sampling import SamplingOptions

from .protocol import MODEL_NAME, SAMPLING_FIELDS, input_named

__all__ = ["PROTOCOLS", "ServerRefused", "ClientResult", "generate", "connect", "request_inputs", "server_metrics"]

PROTOCOLS = ("http", "grpc")
_RETRY = ("503", "UNAVAILABLE")


class ServerRefused(RuntimeError):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, message: str, status: str = "", retry: bool = False):
        super().__init__(message)
        self.status, self.retry = status, retry


@dataclass(frozen=True)
class ClientResult:
    """uint8 ``images [n, H, W, 3]``; int64 ``tokens [n, L]`` or ``None``."""

    images: np.ndarray
    tokens: np.ndarray | None


def connect(url: str, protocol: str = "http", timeout: float = 600.0):
    """A ``tritonclient`` client for ``url`` (``host:port``, no scheme)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if "://" in url:
        raise ValueError(f"--url takes host:port without a scheme, got {url!r}")
    try:
        if protocol == "http":
            import tritonclient.http as mod

            return mod.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        import tritonclient.grpc as mod

        return mod.InferenceServerClient(url)
    except ImportError:
        raise ValueError("the client needs tritonclient: pip install 'tritonclient[http,grpc]'") from None


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as mod
    else:
        import tritonclient.grpc as mod
    return mod


def request_inputs(mod, class_ids: Sequence[int], opts: SamplingOptions, return_tokens: bool, row_offset: int) -> list:
    values = {"class_ids": np.asarray(list(class_ids), dtype=np.int64)}
    values.update({f: np.asarray([getattr(opts, f)], dtype=input_named(f).numpy) for f in SAMPLING_FIELDS})
    values["row_offset"] = np.asarray([row_offset], dtype=np.uint64)
    values["return_tokens"] = np.asarray([return_tokens], dtype=np.bool_)
    out = []
    for name, array in values.items():
        t = mod.InferInput(name, list(array.shape), input_named(name).triton)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def generate(
    client,
    class_ids: Sequence[int],
    opts: SamplingOptions,
    *,
    protocol: str = "http",
    return_tokens: bool = False,
    row_offset: int = 0,
    timeout: float | None = None,
    model: str = MODEL_NAME,
) -> ClientResult:
    """Generate one request's images on the server behind ``client`` (see :func:`connect`).

    ``row_offset``: noise row of the first image; requests for images ``a .. b`` of a larger job
    sent with ``row_offset=a`` together give that job's offline images (``hita generate``).

    Raises:
        ServerRefused: the server's error (``retry`` for overload or shutdown), or no server.
    """
    from tritonclient.utils import InferenceServerException

    mod = _module(protocol)
    outputs = [mod.InferRequestedOutput("images")] + ([mod.InferRequestedOutput("tokens")] if return_tokens else [])
    kwargs = {"client_timeout": timeout} if protocol == "grpc" and timeout else {}
    try:
        r = client.infer(model, request_inputs(mod, class_ids, opts, return_tokens, row_offset), outputs=outputs, **kwargs)
    except InferenceServerException as e:
        status = str(e.status() or "")
        raise ServerRefused(e.message() or str(e), status, any(k in status for k in _RETRY)) from None
    except (ConnectionError, OSError) as e:
        raise ServerRefused(f"cannot reach the server ({e}); is `hita serve` running at that address?",
                            retry=True) from None
    return ClientResult(r.as_numpy("images"), r.as_numpy("tokens") if return_tokens else None)


def server_metrics(metrics_url: str, prefix: str = "hita_") -> dict[str, float]:
    """The server's Prometheus metrics whose names start with ``prefix`` (name -> value; labels
    dropped: one model per server)."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {line.split("{")[0].split()[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}
