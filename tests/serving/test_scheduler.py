"""The in-flight scheduler over the real eager executor and the embedded model (no server).

Steps are driven from the scheduler's own ``on_step`` hook, so "B arrives while A is at step 10" is
exact, not a matter of timing.
"""
from __future__ import annotations

import threading

import pytest
import torch

from hita.runtimes.loop import generate_images, to_uint8
from hita.runtimes.sampling import SamplingOptions
from hita.serving.requests import GenerationRequest, RequestError
from hita.serving.scheduler import Cancelled, Job, Overloaded, Scheduler


@pytest.fixture(scope="module")
def ex():
    from hita.assets import default_model
    from hita.runtimes.factory import make_executor

    d = default_model()
    return make_executor("torch", gpt=d.gpt, tokenizer=d.tokenizer)


def offline(ex, ids, opts):
    """What `hita generate` / generate_images makes for this request: uint8 images and tokens."""
    images, result = generate_images(ex, torch.tensor(ids), opts)
    return to_uint8(images).numpy(), result.tokens.numpy()


class Collector:
    """Submits jobs and keeps their answers."""

    def __init__(self):
        self.results, self.errors, self.done = {}, {}, threading.Event()
        self.expected = 0

    def job(self, name, ids, opts, is_cancelled=lambda: False):
        self.expected += 1

        def on_done(result, error):
            (self.results if error is None else self.errors)[name] = result if error is None else error
            if len(self.results) + len(self.errors) == self.expected:
                self.done.set()

        return Job(GenerationRequest(torch.tensor(ids), opts), on_done, is_cancelled)


A = ([1, 5], SamplingOptions(cfg_scale=3.0, seed=1))
X = ([3, 7], SamplingOptions(cfg_scale=2.0, top_k=50, seed=5))
C = ([9], SamplingOptions(cfg_scale=1.0, temperature=0.8, seed=2))
D = ([0, 4, 4], SamplingOptions(cfg_scale=1.5, seed=8))      # A's sampling options: drawn in A's call


def run(ex, in_flight, at_step):
    """A starts alone; X arrives when the scheduler has run ``at_step[0]`` steps, C at
    ``at_step[1]``, D at ``at_step[2]``."""
    col = Collector()
    late = {at_step[0]: ("X", X), at_step[1]: ("C", C), at_step[2]: ("D", D)}

    def on_step(s):
        if s.stats["steps"] in late:
            name, (ids, opts) = late.pop(s.stats["steps"])
            s.submit(col.job(name, ids, opts))

    sched = Scheduler(ex, max_rows=20, in_flight=in_flight, on_step=on_step).start()
    sched.submit(col.job("A", *A))
    assert col.done.wait(300) and not col.errors, col.errors
    sched.stop()
    return col.results, sched.stats


def test_requests_that_join_a_running_batch_get_their_offline_images(ex):
    results, stats = run(ex, in_flight=True, at_step=(10, 30, 31))
    assert stats["joined_running"] == 3                       # X, C and D joined A mid-sequence
    assert stats["rows_stepped"] > stats["steps"] * 4         # steps really ran several requests' rows
    for name, (ids, opts) in (("A", A), ("X", X), ("C", C), ("D", D)):
        pixels, tokens = offline(ex, ids, opts)
        assert (results[name].tokens == tokens).all(), name
        assert (results[name].images == pixels).all(), name
    assert results["X"].images.shape == (2, 32, 32, 3) and results["X"].images.dtype.name == "uint8"


def test_without_row_positions_newcomers_wait_for_sequence_start(ex):
    results, stats = run(ex, in_flight=False, at_step=(10, 11, 12))
    assert stats["joined_running"] == 0
    assert stats["steps"] == 2 * ex.gpt_config.seq_len       # A alone, then X, C and D together
    pixels, tokens = offline(ex, *X)
    assert (results["X"].tokens == tokens).all() and (results["X"].images == pixels).all()


def test_a_cancelled_request_leaves_and_frees_its_rows(ex):
    col, gone, rows_after = Collector(), threading.Event(), []

    def on_step(s):
        if s.stats["steps"] == 5:
            gone.set()                                        # the client of "gone" disconnects now
        if s.stats["steps"] == 7:
            rows_after.append(s.load()["rows"])

    sched = Scheduler(ex, max_rows=16, on_step=on_step, cancel_poll_s=0).start()
    sched.submit(col.job("gone", [2, 2, 2], SamplingOptions(cfg_scale=2.0, seed=3), is_cancelled=gone.is_set))
    sched.submit(col.job("A", *A))
    assert col.done.wait(300)
    sched.stop()
    assert isinstance(col.errors["gone"], Cancelled)
    assert rows_after == [4]                                  # only A's 2 images x (cond + null) remain
    pixels, _ = offline(ex, *A)
    assert (col.results["A"].images == pixels).all()


def test_admission_refuses_oversized_requests_and_a_full_queue(ex):
    sched = Scheduler(ex, max_rows=8, queue_limit=2)          # not started: nothing leaves the queue
    col = Collector()
    with pytest.raises(RequestError, match=r"^class_ids: 5 images need 10 rows .* send at most 4 images"):
        sched.submit(col.job("big", [0] * 5, SamplingOptions(cfg_scale=2.0)))
    sched.submit(col.job("q1", *A))
    sched.submit(col.job("q2", *A))
    with pytest.raises(Overloaded, match=r"overloaded: 2 requests are already waiting \(queue limit 2\)"):
        sched.submit(col.job("q3", *A))
    sched.stop(drain=False)
    assert sorted(col.errors) == ["q1", "q2"] and all(isinstance(e, Overloaded) for e in col.errors.values())
    with pytest.raises(Overloaded, match="shutting down"):
        sched.submit(col.job("late", *A))


def test_stop_drains_accepted_requests(ex):
    col = Collector()
    sched = Scheduler(ex, max_rows=4).start()
    for name in ("d1", "d2", "d3"):                           # 4 rows each: they run one after another
        sched.submit(col.job(name, *A))
    sched.stop(drain=True)
    assert sorted(col.results) == ["d1", "d2", "d3"] and not col.errors
