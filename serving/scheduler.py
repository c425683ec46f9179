"""In-flight batching: one thread owns one step executor and runs every admitted request's rows.

Why one owner: an executor holds one KV cache and runs one step at a time. Requests arrive at any
moment from Triton's threads; the scheduler queues them and, at each step boundary, lets newcomers
join the running batch (a prefill for them, a decode step for the rest) and drops rows whose
request finished or whose client went away. A request therefore starts within one step of a free
row instead of waiting for a whole batch to finish, and the batch stays full under load.

Rows: a request of ``n`` images takes ``n`` rows, ``2n`` with guidance (``[cond n ; null n]``,
kept together so the loop's :func:`~hita.runtimes.loop.guided_logits` mixes each pair). Each row
decodes at its own request's position (executors with ``row_positions``). Executors without
per-row positions get the fallback: newcomers join only at sequence start, when the batch is empty.

Sampling is the decode loop's (:func:`~hita.runtimes.loop.guided_logits`,
:func:`~hita.runtimes.loop.sample_rows`, :func:`~hita.runtimes.loop.to_uint8`), with each request's
own options and noise (seed, step, ``row_offset`` + image index). A request's images are
therefore what ``generate_images(executor, class_ids, opts, row_offset=...)`` makes offline, whether it ran alone
or beside others (up to the executor's batch-size rounding: bit-identical on ONNX Runtime here).

Admission: a request that needs more rows than a step holds is refused at once (naming
``class_ids``); when ``queue_limit`` requests already wait, a newcomer gets :class:`Overloaded`
instead of a place (no unbounded memory); :meth:`Scheduler.stop` drains what was accepted.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hita.runtimes.executor import StepExecutor
from hita.runtimes.loop import draw_tokens, guided_logits, sample_rows, to_uint8
from hita.runtimes.sampling import NoiseStream

from .requests import GenerationRequest, RequestError

__all__ = ["Overloaded", "Cancelled", "Job", "JobResult", "Scheduler"]


class Overloaded(RuntimeError):
    """The queue is full or the server is stopping: retry later or elsewhere."""


class Cancelled(RuntimeError):
    """The client went away before its images were done."""


@dataclass(frozen=True)
class JobResult:
    """A finished request: uint8 ``images [n, H, W, 3]``, int64 ``tokens [n, L]``, timings."""

    images: np.ndarray
    tokens: np.ndarray
    queued_s: float
    run_s: float


@dataclass(eq=False)
class Job:
    """A request inside the scheduler.

    Args:
        request: the checked request.
        on_done: called once from the scheduler thread with ``(result, None)`` or ``(None, error)``.
        is_cancelled: polled while the job waits or runs (at most every ``cancel_poll_s``); ``True``
            drops its rows and answers :class:`Cancelled`.
    """

    request: GenerationRequest
    on_done: Callable[[JobResult | None, BaseException | None], None]
    is_cancelled: Callable[[], bool] = lambda: False
    t: int = 0                                   # next sequence index to draw
    tokens: torch.Tensor | None = None           # int64 [n, L] on the sampling device
    noise: NoiseStream | None = None             # the request's noise stream (its seed)
    finite: torch.Tensor | None = None           # NaN guard on a GPU (no sync per step)
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    polled: float = 0.0
    answered: bool = False

    @property
    def rows(self) -> int:
        return self.request.rows


class Scheduler:
    """Runs requests through one executor with in-flight batching (see the module docstring).

    Args:
        executor: the step executor; the scheduler is its only user once started.
        max_rows: rows one step may hold (CFG rows count); capped by ``executor.max_rows``.
        queue_limit: requests that may wait for rows; more are refused with :class:`Overloaded`.
        in_flight: join at any step boundary (default: whenever the executor has
            ``row_positions``); ``False`` forces joining at sequence start only.
        cancel_poll_s: how often each job's ``is_cancelled`` is asked (it may cost an IPC call).
        log: one-line messages (errors the scheduler survives).
        on_step: called from the scheduler thread after every step boundary (metrics, tests that
            need to act at an exact step).
    """

    def __init__(
        self,
        executor: StepExecutor,
        *,
        max_rows: int = 16,
        queue_limit: int = 64,
        in_flight: bool | None = None,
        cancel_poll_s: float = 0.05,
        log: Callable[[str], None] = lambda line: None,
        on_step: Callable[["Scheduler"], None] | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {queue_limit}")
        self.executor = executor
        self.capacity = min(max_rows, executor.max_rows or max_rows)
        self.queue_limit = queue_limit
        self.in_flight = executor.row_positions if in_flight is None else bool(in_flight)
        if self.in_flight and not executor.row_positions:
            raise ValueError(f"{executor.name} has no per-row positions; in-flight batching needs them")
        self.cancel_poll_s = cancel_poll_s
        self.log = log
        self.on_step = on_step
        self.seq_len = executor.gpt_config.seq_len
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []             # row order of the executor's batch
        self._calls: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._refusing = False                   # draining: accepted jobs go on, new ones are refused
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters since start: steps run, rows summed over steps (rows_stepped / steps = mean batch),
        # images and requests finished, requests refused, requests that joined a running batch.
        self.stats = {"steps": 0, "rows_stepped": 0, "images": 0, "requests": 0, "refused": 0, "joined_running": 0}

    # -- public --------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Start the thread (on an empty batch: whatever the executor ran before is dropped)."""
        if self.in_flight:
            self.executor.keep_rows(torch.zeros(0, dtype=torch.int64))
        self._thread = threading.Thread(target=self._run, name="hita-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once.

        Raises:
            RequestError: the request needs more rows than one step holds (names ``class_ids``).
            Overloaded: ``queue_limit`` jobs are already waiting, or the scheduler is stopping.
        """
        if job.rows > self.capacity:
            cfg = " (guidance doubles them)" if job.request.opts.use_cfg else ""
            per = self.capacity // (2 if job.request.opts.use_cfg else 1)
            raise RequestError("class_ids", f"{job.request.images} images need {job.rows} rows{cfg} but a step "
                                            f"holds {self.capacity}; send at most {per} images per request")
        with self._cond:
            if self._stopping or self._refusing:
                self.stats["refused"] += 1
                raise Overloaded("server is shutting down and takes no new requests; retry on another instance")
            if len(self._queue) >= self.queue_limit:
                self.stats["refused"] += 1
                raise Overloaded(f"server overloaded: {len(self._queue)} requests are already waiting "
                                 f"(queue limit {self.queue_limit}); retry later")
            self._queue.append(job)
            self._cond.notify_all()

    def refuse_new(self) -> None:
        """From now on :meth:`submit` refuses with :class:`Overloaded` ("shutting down"); accepted
        jobs go on and the thread keeps running (a drain: see :meth:`wait_idle`)."""
        with self._cond:
            self._refusing = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job waits or runs; returns whether that happened within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._active, timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the scheduler thread at its next turn (inline once the thread has ended).

        Why: a serving framework's API may not be safe to call from two threads at once (Triton's
        Python backend crashed when metrics were updated from two); everything that talks to it
        (answers, cancellation probes, metrics) can thus run on this one thread.
        """
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                self._calls.append(fn)
                self._cond.notify_all()
                return
        fn()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new jobs; finish the accepted ones (``drain``), or answer the queued ones with an
        error and finish only the running ones; then end the thread. Waits at most ``timeout``
        seconds; jobs still queued then are answered with an error."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._fail_queue(Overloaded("server stopped before this request started"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    self._fail_queue(Overloaded("server stopped before this request started"))
                self.log("scheduler: still running at the stop timeout; unfinished requests were answered")

    def load(self) -> dict[str, int]:
        """Queue length and rows in use, for metrics and tests."""
        with self._cond:
            # Finished or answered rows leave at the next step; they no longer count.
            live = [j for j in self._active if not j.answered and j.t < self.seq_len]
            return {"queued": len(self._queue), "rows": sum(j.rows for j in live), "requests": len(live)}

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._active and not self._calls and not self._stopping:
                    self._cond.notify_all()                  # wakes wait_idle()
                    self._cond.wait()
                calls, self._calls = list(self._calls), deque()
            for fn in calls:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - a failing call must not stop the scheduler
                    self.log(f"scheduler: a queued call failed ({type(e).__name__}: {e})")
            with self._cond:
                if self._stopping and not self._queue and not self._active and not self._calls:
                    self._cond.notify_all()
                    return
                if not self._queue and not self._active:
                    continue
                newcomers = self._admit()
            try:
                self._boundary(newcomers)
            except Exception as e:  # noqa: BLE001 - an executor failure ends its batch, not the server
                self.log(f"scheduler: step failed ({type(e).__name__}: {e}); its requests were answered with the error")
                for job in self._active + newcomers:
                    self._answer(job, None, e)
                self._active = []
                self._reset_rows()

    def _admit(self) -> list[Job]:
        """Pop queued jobs (FIFO) that fit the free rows; fallback mode only into an empty batch."""
        if not self.in_flight and self._active:
            return []
        free = self.capacity - sum(j.rows for j in self._active)
        out = []
        while self._queue and self._queue[0].rows <= free:
            job = self._queue.popleft()
            free -= job.rows
            out.append(job)
        return out

    def _boundary(self, newcomers: list[Job]) -> None:
        """One step boundary: drop cancelled and finished rows, decode the running rows, prefill
        the newcomers, finish what is complete."""
        ex = self.executor
        self._drop_gone(newcomers)
        newcomers = [j for j in newcomers if not j.answered]
        running = [j for j in self._active if j.t < self.seq_len]
        if running:
            fed, pos = [], []
            for job in running:
                prev = job.tokens[:, job.t - 1]                                   # [n]
                fed.append(torch.cat([prev, prev]) if job.request.opts.use_cfg else prev)
                pos.append(torch.full((job.rows,), job.t, dtype=torch.int64))
            tokens = torch.cat(fed).to(ex.device)                                 # [B]
            positions = torch.cat(pos) if self.in_flight else running[0].t        # [B] or one int
            raw = ex.decode(tokens, positions)                                    # [B, V]
            self._sample(running, raw)
        if newcomers:
            ids = []
            for job in newcomers:
                c = job.request.class_ids
                ids.append(torch.cat([c, torch.full_like(c, ex.gpt_config.null_class)])
                           if job.request.opts.use_cfg else c)
            class_ids = torch.cat(ids)                                            # [B_new]
            if self.in_flight:
                raw = ex.add_rows(class_ids)
            else:
                ex.start(int(class_ids.shape[0]))
                raw = ex.prefill(class_ids)
            now = time.monotonic()
            if running:
                self.stats["joined_running"] += len(newcomers)
            for job in newcomers:
                job.started = now
                job.noise = NoiseStream(job.request.opts.seed)
                job.tokens = torch.empty(job.request.images, self.seq_len, dtype=torch.int64, device=ex.device)
                job.finite = torch.ones((), dtype=torch.bool, device=ex.device)
            self._active += newcomers
            self._sample(newcomers, raw)
        if running or newcomers:
            self.stats["steps"] += 1
            self.stats["rows_stepped"] += sum(j.rows for j in running + newcomers)
        done = [(job, *self._complete(job)) for job in running + newcomers
                if job.t == self.seq_len and not job.answered]
        if self.on_step is not None:
            self.on_step(self)            # before the answers: a client that has its images sees them counted
        for job, result, error in done:
            self._answer(job, result, error)

    def _sample(self, jobs: list[Job], raw: torch.Tensor) -> None:
        """Draw token ``t`` of each job from its rows of the step's logits, with the loop's functions.

        Jobs whose options agree (all but the seed) are drawn in one call: rows are independent, so
        each gets exactly its own tokens, and the per-call cost is paid once per group, not per job.
        """
        groups: dict[tuple, list[tuple[Job, torch.Tensor]]] = {}
        row = 0
        for job in jobs:
            part = raw[row: row + job.rows]                                        # [rows, V]
            row += job.rows
            if job.answered:                                                      # cancelled, rows still running
                continue
            o = job.request.opts                                                  # guidance is per job, here:
            logits = guided_logits(part, o, step=job.t - 1, host=False)           # [n, V]
            groups.setdefault((o.temperature, o.top_k, o.top_p), []).append((job, logits))
        for items in groups.values():
            opts = items[0][0].request.opts
            logits = torch.cat([lg for _, lg in items]) if len(items) > 1 else items[0][1]   # [sum n, V]
            u = torch.cat([job.noise.uniform(job.t, job.request.images, job.request.row_offset) for job, _ in items])
            try:
                drawn = sample_rows(logits, opts, u)                              # [sum n]
            except FloatingPointError:
                self._sample_alone(items)                                         # fail only the bad job
                continue
            at = 0
            for job, lg in items:
                if lg.device.type != "cpu":
                    job.finite &= torch.isfinite(lg).any(dim=-1).all()
                job.tokens[:, job.t] = drawn[at: at + job.request.images]
                at += job.request.images
        for job in jobs:
            job.t += 1

    def _sample_alone(self, items: list[tuple[Job, torch.Tensor]]) -> None:
        for job, logits in items:
            try:
                job.tokens[:, job.t] = draw_tokens(logits, job.request.opts, job.noise, job.t, job.request.row_offset)
            except FloatingPointError as e:
                self._answer(job, None, e)

    def _complete(self, job: Job) -> tuple[JobResult | None, BaseException | None]:
        """Decode a finished job's images (its own decoder batch, as offline) -> (result, error)."""
        try:
            if not bool(job.finite):
                raise FloatingPointError(f"{self.executor.name} returned NaN or infinite logits for this request")
            tokens = job.tokens.cpu()                                             # [n, L]
            nh = self.executor.gpt_config.n_holistic
            images = self.executor.decode_image(tokens[:, :nh], tokens[:, nh:])  # [n, 3, H, W]
            pixels = to_uint8(images.detach().to("cpu", torch.float32)).numpy()  # [n, H, W, 3]
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            return None, e
        self.stats["images"] += job.request.images
        self.stats["requests"] += 1
        return JobResult(pixels, tokens.numpy(), job.started - job.submitted, time.monotonic() - job.started), None

    def _drop_gone(self, newcomers: list[Job]) -> None:
        """Answer cancelled jobs and remove finished or cancelled rows from the executor's batch."""
        now = time.monotonic()
        for job in self._active + newcomers:
            if not job.answered and now - job.polled >= self.cancel_poll_s:
                job.polled = now
                if self._cancelled(job):
                    self._answer(job, None, Cancelled("the client cancelled or disconnected"))
        with self._cond:
            for job in list(self._queue):
                if now - job.polled >= self.cancel_poll_s:
                    job.polled = now
                    if self._cancelled(job):
                        self._queue.remove(job)
                        self._answer(job, None, Cancelled("the client cancelled or disconnected"))
        gone = [j for j in self._active if j.answered]
        if not gone:
            return
        if self.in_flight:
            keep, row = [], 0
            for job in self._active:
                if not job.answered:
                    keep.extend(range(row, row + job.rows))
                row += job.rows
            self.executor.keep_rows(torch.tensor(keep, dtype=torch.int64))
            self._active = [j for j in self._active if not j.answered]
        elif all(j.answered for j in self._active):
            self._active = []                     # the whole batch left: stop computing it

    def _cancelled(self, job: Job) -> bool:
        try:
            return bool(job.is_cancelled())
        except Exception:  # noqa: BLE001 - a broken probe means the request is gone
            return True

    def _answer(self, job: Job, result: JobResult | None, error: BaseException | None) -> None:
        if job.answered:
            return
        job.answered = True
        try:
            job.on_done(result, error)
        except Exception as e:  # noqa: BLE001 - a client that cannot be answered must not stop the others
            self.log(f"scheduler: answering a request failed ({type(e).__name__}: {e})")

    def _fail_queue(self, error: BaseException) -> None:
        while self._queue:
            self._answer(self._queue.popleft(), None, error)

    def _reset_rows(self) -> None:
        if self.in_flight:
            try:
                self.executor.keep_rows(torch.zeros(0, dtype=torch.int64))
            except Exception:  # noqa: BLE001 - the next add_rows starts from scratch anyway
                pass
