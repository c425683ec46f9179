"""A real Triton server over a standalone model repository (ONNX Runtime, in-flight batching).

The repository is written by ``hita serve --export-repository`` and served by the bundled
``tritonserver`` binary as it is (no hita launcher code path in between but the environment fix),
which is what a GPU fleet would run. Requests go over HTTP and gRPC with ``tritonclient``.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hita.serving.client import server_metrics as metrics
from hita.serving.launcher import free_ports

pytestmark = pytest.mark.usefixtures("skip_without_triton")

MAX_ROWS, QUEUE_LIMIT, MAX_IMAGES = 8, 2, 4


@pytest.fixture(scope="module")
def server(rows_onnx, tmp_path_factory):
    from typer.testing import CliRunner

    from hita.cli.app import app
    from hita.serving.launcher import TritonServer

    repo = tmp_path_factory.mktemp("triton") / "repository"
    res = CliRunner().invoke(app, [
        "serve", "--runtime", "onnxruntime", "--artifacts", str(rows_onnx[0]), "--export-repository", str(repo),
        "--max-rows", str(MAX_ROWS), "--queue-limit", str(QUEUE_LIMIT), "--max-images", str(MAX_IMAGES)])
    assert res.exit_code == 0, res.output
    assert (repo / "hita" / "1" / "artifacts" / "manifest.json").is_file()
    http, grpc, prom = free_ports(3)
    srv = TritonServer(repo, repo.parent / "work", http_port=http, grpc_port=grpc, metrics_port=prom).start()
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.first_error()


@pytest.fixture(scope="module")
def offline(rows_onnx):
    """The same export run offline through the same loop: what the server must return."""
    from hita.runtimes.loop import generate_images, to_uint8
    from hita.runtimes.onnxrt import OrtExecutor

    ex = OrtExecutor(rows_onnx[0])

    def run(ids, opts, row_offset=0):
        images, result = generate_images(ex, torch.tensor(ids), opts, row_offset=row_offset)
        return to_uint8(images).numpy(), result.tokens.numpy()

    return run


def _client(server, protocol):
    from hita.serving.client import connect

    return connect(server.http_url if protocol == "http" else server.grpc_url, protocol)


def _generate(server, protocol, ids, opts, **kw):
    from contextlib import closing

    from hita.serving.client import generate

    with closing(_client(server, protocol)) as client:   # idle keep-alive connections delay shutdown
        return generate(client, ids, opts, protocol=protocol, **kw)


def test_endpoints_listen_on_loopback_only_and_report_ready(server):
    import tritonclient.grpc as tg

    assert server.ready()
    assert tg.InferenceServerClient(server.grpc_url).is_model_ready("hita")
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":                                            # LISTEN
                addr, port = local.split(":")
                listening.add((addr, int(port, 16)))
    # /proc spells 127.0.0.1 as 0100007F, and as an IPv4-mapped IPv6 address (gRPC binds that way).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addrs = {a for a, p in listening if p == port}
        assert addrs and addrs <= loopback, f"port {port} listens on {addrs}"
    assert "hita_running_rows" in metrics(server.metrics_url)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_images_and_tokens_equal_offline_generation(server, offline, protocol):
    from hita.runtimes.sampling import SamplingOptions

    opts = SamplingOptions(cfg_scale=3.0, top_k=100, seed=11)
    pixels, tokens = offline([4, 4, 9], opts)
    got = _generate(server, protocol, [4, 4, 9], opts, return_tokens=True)
    assert got.images.dtype == np.uint8 and got.images.shape == (3, 32, 32, 3)
    assert np.array_equal(got.images, pixels) and np.array_equal(got.tokens, tokens)
    # Images 1..2 of that job, asked for alone with row_offset=1, are the same images.
    part = _generate(server, protocol, [4, 9], opts, row_offset=1)
    assert np.array_equal(part.images, pixels[1:]) and part.tokens is None


def test_a_request_that_joins_a_busy_batch_gets_the_images_it_gets_alone(server, offline, wait_for):
    """A request sent while another is decoding joins the running batch and still gets the images
    it gets alone. The batch is kept busy by back-to-back requests until the joiner is answered, so
    the join happens however fast the machine runs a tiny 80-step request."""
    import threading

    import tritonclient.grpc as tg

    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import request_inputs

    x_ids, x_opts = [2, 6], SamplingOptions(cfg_scale=2.0, temperature=0.9, seed=21)
    alone = _generate(server, "http", x_ids, x_opts)
    before = metrics(server.metrics_url)
    stop, errors = threading.Event(), []

    def keep_busy() -> None:
        busy = tg.InferenceServerClient(server.grpc_url)
        try:
            while not stop.is_set():
                busy.infer("hita", request_inputs(tg, [1, 8], SamplingOptions(cfg_scale=3.0, seed=22), False, 0))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)
        finally:
            busy.close()

    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        wait_for(lambda: metrics(server.metrics_url)["hita_steps_total"] >= before["hita_steps_total"] + 3,
                 "the busy requests to start decoding")
        joined = _generate(server, "http", x_ids, x_opts)
    finally:
        stop.set()
        worker.join()
    assert errors == []
    after = metrics(server.metrics_url)
    assert after["hita_requests_joined_running_total"] > before["hita_requests_joined_running_total"]
    assert np.array_equal(joined.images, alone.images)
    assert np.array_equal(alone.images, offline(x_ids, x_opts)[0])


def test_bad_requests_get_an_error_naming_the_field_while_others_flow(server, offline, wait_for):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import request_inputs

    good_opts = SamplingOptions(cfg_scale=2.0, seed=31)
    good, done = tg.InferenceServerClient(server.grpc_url), []
    good.async_infer("hita", request_inputs(tg, [0, 5], good_opts, False, 0), callback=lambda result, error: done.append(result))
    client = th.InferenceServerClient(server.http_url)

    def send(**tensors):
        inputs = []
        for name, (array, dtype) in tensors.items():
            t = th.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        with pytest.raises(InferenceServerException) as err:
            client.infer("hita", inputs)
        return err.value

    ids = (np.array([1], dtype=np.int64), "INT64")
    cases = {
        "class_ids": dict(class_ids=(np.array([3, 10], dtype=np.int64), "INT64")),           # out of range
        "top_p": dict(class_ids=ids, top_p=(np.array([0.0]), "FP64")),
        "cfg_scale": dict(class_ids=ids, cfg_scale=(np.array([0.5]), "FP64")),
        "temperature": dict(class_ids=ids, temperature=(np.array([-1.0]), "FP64")),
        "top_k": dict(class_ids=ids, top_k=(np.array([-2], dtype=np.int64), "INT64")),
        "'class_ids'": dict(class_ids=(np.array([1.0], dtype=np.float32), "FP32")),          # Triton: dtype
        "'seed'": dict(class_ids=ids, seed=(np.array([1, 2], dtype=np.uint64), "UINT64")),   # Triton: shape
    }
    for field, tensors in cases.items():
        e = send(**tensors)
        assert field in e.message(), (field, e.message())
        assert "\n" not in e.message().strip()
    too_many = send(class_ids=(np.zeros(MAX_IMAGES + 1, dtype=np.int64), "INT64"))
    assert too_many.message().startswith("class_ids:") and too_many.status() == "400"
    client.close()
    wait_for(lambda: done, "the good request's answer")
    assert np.array_equal(done[0].as_numpy("images"), offline([0, 5], good_opts)[0])
    assert server.ready()


def test_overload_is_refused_with_a_clear_retryable_error(server):
    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import ServerRefused

    full = SamplingOptions(cfg_scale=2.0, seed=41)                   # 4 images x 2 rows = every row of a step

    def one(i):
        try:
            _generate(server, "grpc", [i % 10] * MAX_IMAGES, full)
            return "ok"
        except ServerRefused as e:
            assert e.retry and "overloaded" in str(e) and f"queue limit {QUEUE_LIMIT}" in str(e), str(e)
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    assert outcomes.count("refused") >= 1 and outcomes.count("ok") >= 1
    assert metrics(server.metrics_url)["hita_requests_refused_total"] >= outcomes.count("refused")
    assert server.ready()


CLIENT = textwrap.dedent("""
    import sys, threading, numpy as np, tritonclient.grpc as tg
    c = tg.InferenceServerClient(sys.argv[1])
    t = tg.InferInput("class_ids", [4], "INT64"); t.set_data_from_numpy(np.arange(4, dtype=np.int64))
    for _ in range(3):                          # three requests: one runs, two wait in the queue
        c.async_infer("hita", [t], callback=lambda *a: None)
    threading.Event().wait()                    # until killed
""")


def test_a_client_that_disconnects_frees_its_rows(server, wait_for):
    """A gRPC client killed mid-request: its requests leave (running rows freed, queued ones
    dropped) and no images are made for what had not finished. The client has three requests of
    80 steps in the server (one running, two queued), so the kill lands while work is left however
    fast the machine is. (Triton 24.10 does not report HTTP disconnects to models.)"""
    idle = lambda m: m["hita_running_rows"] == 0 and m["hita_queue_requests"] == 0  # noqa: E731
    wait_for(lambda: idle(metrics(server.metrics_url)), "the server to be idle")
    before = metrics(server.metrics_url)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.grpc_url])
    try:
        wait_for(lambda: metrics(server.metrics_url)["hita_steps_total"] >= before["hita_steps_total"] + 3,
                 "the client's first request to start decoding")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for(lambda: idle(metrics(server.metrics_url)), "the rows to be freed")
    after = metrics(server.metrics_url)
    delta = {k: after[k] - before[k] for k in after}
    accepted = 3 - delta["hita_requests_refused_total"]     # the queue limit (2) may refuse the third
    assert accepted >= 2
    assert delta["hita_images_total"] < 4 * accepted        # not every accepted request ran to the end
    assert delta["hita_steps_total"] < 80 * accepted


def test_a_plain_json_request_like_the_readme_curl_example(server):
    """What the README shows with curl: KServe v2 JSON in, JSON out (no tritonclient)."""
    import json
    import urllib.request

    body = {"inputs": [{"name": "class_ids", "shape": [2], "datatype": "INT64", "data": [7, 1]},
                       {"name": "cfg_scale", "shape": [1], "datatype": "FP64", "data": [3.0]},
                       {"name": "seed", "shape": [1], "datatype": "UINT64", "data": [42]}],
            "outputs": [{"name": "images"}]}
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/hita/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())["outputs"]
    assert [o["name"] for o in out] == ["images"]
    assert out[0]["datatype"] == "UINT8" and out[0]["shape"] == [2, 32, 32, 3] and len(out[0]["data"]) == 2 * 32 * 32 * 3
