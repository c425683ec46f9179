"""The ``hita`` model for Triton's Python backend: requests in, one scheduler, responses out of order.

Why the model runs inside Triton's Python-backend process and answers through response senders:
``execute`` only checks each request and hands it to the :class:`~hita.serving.scheduler.Scheduler`
then returns at once; the scheduler thread sends each response when its images are done. Triton
therefore keeps passing new requests in while others decode, over plain HTTP and gRPC (a decoupled
model would have been refused over HTTP), and requests of different ages share steps.

Threads: ``execute`` (Triton's thread) only reads inputs and queues work; every other call into
Triton (responses, cancellation probes, metrics, logs) runs on the scheduler's thread, because the
Python backend crashed the server when two threads updated metrics at once.

Each request gets exactly one response: the images (and tokens on request), or an error whose code
says who should act: ``INVALID_ARG`` (fix the request; the message names the field),
``UNAVAILABLE`` (overloaded or stopping: retry), ``CANCELLED`` (the client left; its rows were freed
at the next step). Readiness is Triton's: the model is ready once :meth:`TritonPythonModel.initialize`
has built the executor (Triton opens its endpoints only then).

Draining goes through two files in the model's folder, because Triton's SIGTERM would not wait for
requests whose ``execute`` has returned: whoever wants to stop the server (``hita serve`` on SIGTERM,
a Kubernetes ``preStop`` hook around a stock ``tritonserver``) creates ``drain``; the model then
answers new requests ``UNAVAILABLE`` ("shutting down"), finishes and answers every accepted one and
creates ``drained``; after that the server can be stopped without losing an answer.

Metrics (on Triton's metrics port, next to its own ``nv_*`` ones): ``hita_queue_requests``,
``hita_running_requests``, ``hita_running_rows`` (gauges) and ``hita_steps_total``,
``hita_rows_stepped_total``, ``hita_images_total``, ``hita_requests_refused_total``,
``hita_requests_joined_running_total`` (counters).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

from .protocol import DRAIN_FILE, DRAINED_FILE, INPUTS, MODEL_NAME
from .repository import ServingSettings
from .requests import RequestError, parse_request
from .scheduler import Cancelled, Job, Overloaded, Scheduler

__all__ = ["TritonPythonModel", "build_executor"]


def build_executor(settings: ServingSettings, base: Path, device: str):
    """The step executor the settings describe; relative paths are relative to ``base``."""
    import torch

    from hita.runtimes.factory import make_executor

    def path(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    if settings.runtime != "torch":
        # Torch only samples here (tens of small ops per step): one thread. Its default pool on all
        # cores, beside the runtime's own threads, made each softmax wait for a descheduled thread
        # (measured: 4 ms instead of 0.1 ms on 2 busy cores).
        torch.set_num_threads(1)
    elif settings.threads:
        torch.set_num_threads(settings.threads)
    pin = settings.expect_manifest_sha256 or None
    if settings.runtime == "torch":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.precision]
        return make_executor("torch", gpt=path(settings.gpt), tokenizer=path(settings.tokenizer), device=device,
                             dtype=dtype, pos128=settings.pos128)
    if settings.runtime == "onnxruntime" and settings.threads:
        from hita.runtimes.onnxrt import OrtExecutor

        return OrtExecutor(path(settings.artifacts), threads=settings.threads, expect_manifest_sha256=pin)
    return make_executor(settings.runtime, artifacts=path(settings.artifacts), device=device,
                         expect_manifest_sha256=pin)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (RequestError, Overloaded, Cancelled)):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _code(e: BaseException) -> int:
    err = pb_utils.TritonError
    if isinstance(e, RequestError):
        return err.INVALID_ARG
    if isinstance(e, Overloaded):
        return err.UNAVAILABLE
    if isinstance(e, Cancelled):
        return getattr(err, "CANCELLED", err.UNAVAILABLE)
    return err.INTERNAL


class _Metrics:
    """Scheduler state as Triton custom metrics, refreshed at most every ``every`` seconds."""

    GAUGES = (("hita_queue_requests", "requests waiting for rows"),
              ("hita_running_requests", "requests decoding"),
              ("hita_running_rows", "rows in the running batch (CFG rows count)"))
    COUNTERS = (("hita_steps_total", "steps", "decode steps run"),
                ("hita_rows_stepped_total", "rows_stepped", "rows summed over steps (divide by steps: mean batch)"),
                ("hita_images_total", "images", "images generated"),
                ("hita_requests_refused_total", "refused", "requests refused as overload"),
                ("hita_requests_joined_running_total", "joined_running", "requests that joined a running batch"))

    def __init__(self, labels: dict[str, str], every: float = 0.1):
        fam = pb_utils.MetricFamily
        # The families must outlive their metrics (the backend refuses updates otherwise): keep both.
        self.families = [fam(name=n, description=d, kind=fam.GAUGE) for n, d in self.GAUGES]
        self.families += [fam(name=n, description=d, kind=fam.COUNTER) for n, _, d in self.COUNTERS]
        metrics = [f.Metric(labels=labels) for f in self.families]
        self.gauges = dict(zip((n for n, _ in self.GAUGES), metrics))
        self.counters = dict(zip((k for _, k, _ in self.COUNTERS), metrics[len(self.GAUGES):]))
        self.sent = {k: 0 for k in self.counters}
        self.every, self.last = every, 0.0

    def update(self, sched: Scheduler, force: bool = False) -> None:
        """Refresh; never raises (metrics must not break serving: a request whose ``execute``
        raised after it was queued would be answered twice)."""
        try:
            self._update(sched, force)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"hita: metrics update failed ({type(e).__name__}: {e})")

    def _update(self, sched: Scheduler, force: bool) -> None:
        now = time.monotonic()
        load = sched.load()
        idle = not any(load.values())             # going idle: publish now, no later step would
        if not (force or idle) and now - self.last < self.every:
            return
        self.last = now
        for name, value in zip(self.gauges, (load["queued"], load["requests"], load["rows"])):
            self.gauges[name].set(value)
        for key, metric in self.counters.items():
            value = sched.stats[key]
            if value > self.sent[key]:
                metric.increment(value - self.sent[key])
                self.sent[key] = value


class TritonPythonModel:
    """Triton Python-backend model (see the module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.settings = ServingSettings.from_params(params).require_files()
        base = Path(args["model_repository"]) / args["model_version"]
        device = self.settings.device
        if device.startswith("cuda") and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.executor = build_executor(self.settings, base, device)
        self.metrics = _Metrics({"model": config.get("name", MODEL_NAME), "runtime": self.executor.name})
        self.scheduler = Scheduler(
            self.executor, max_rows=self.settings.max_rows, queue_limit=self.settings.queue_limit,
            in_flight=None if self.settings.in_flight == "auto" else False,
            log=pb_utils.Logger.log_error, on_step=self.metrics.update,
        ).start()
        mode = "in-flight batching" if self.scheduler.in_flight else "batches start together (no per-row positions)"
        pb_utils.Logger.log_info(f"hita: {self.executor.name} on {self.executor.device}, "
                                 f"{self.scheduler.capacity} rows per step, {mode}")
        self.control = Path(args["model_repository"])
        for name in (DRAIN_FILE, DRAINED_FILE):
            (self.control / name).unlink(missing_ok=True)   # left by an earlier run
        self._closed = threading.Event()
        threading.Thread(target=self._watch_drain, name="hita-drain", daemon=True).start()

    def _watch_drain(self) -> None:
        """Wait for the ``drain`` file; then drain the scheduler and report ``drained``. Every call
        into Triton goes through the scheduler thread (see :meth:`Scheduler.call_soon`)."""
        log = pb_utils.Logger.log_info
        while not self._closed.wait(0.2):
            if (self.control / DRAIN_FILE).exists():
                self.scheduler.refuse_new()
                self.scheduler.call_soon(lambda: log("hita: draining: new requests are refused, accepted ones finish"))
                self.scheduler.wait_idle(self.settings.drain_timeout)

                def drained() -> None:
                    self.metrics.update(self.scheduler, force=True)
                    log("hita: drained")
                    (self.control / DRAINED_FILE).touch()

                self.scheduler.call_soon(drained)
                return

    def execute(self, requests: list) -> None:
        for request in requests:
            self._accept(request)
        return None  # every response goes out through its request's response sender

    def _accept(self, request) -> None:
        sender = request.get_response_sender()
        try:
            tensors = {}
            for t in INPUTS:
                value = pb_utils.get_input_tensor_by_name(request, t.name)
                tensors[t.name] = None if value is None else value.as_numpy().copy()  # shm is reused
            req = parse_request(tensors, self.executor.gpt_config.num_classes, self.settings.max_images)
            wanted = set(request.requested_output_names())

            def on_done(result, error, sender=sender, req=req, wanted=wanted) -> None:
                self._respond(sender, req.return_tokens, wanted, result, error)

            self.scheduler.submit(Job(req, on_done, request.is_cancelled))
        except Exception as e:  # noqa: BLE001 - every refusal is an answer, never a crash of the model
            self.scheduler.call_soon(lambda sender=sender, e=e: self._respond(sender, False, set(), None, e))

    def _respond(self, sender, return_tokens: bool, wanted: set, result, error) -> None:
        if error is not None:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(_one_line(error), _code(error)))
        else:
            outputs = [pb_utils.Tensor("images", result.images)]
            if return_tokens:
                outputs.append(pb_utils.Tensor("tokens", result.tokens))
            outputs = [o for o in outputs if not wanted or o.name() in wanted]
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self._closed.set()
        self.scheduler.stop(drain=True, timeout=self.settings.drain_timeout)
        self.metrics.update(self.scheduler, force=True)
