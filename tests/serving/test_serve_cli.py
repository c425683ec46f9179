"""`hita serve` and `hita client` as a user runs them: a real server process, signals, PNG files.

The server runs the torch runtime on the embedded model (no export needed); `hita client` output
must be byte-identical to `hita generate` offline; SIGTERM must finish an accepted request.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hita.cli.app import app
from hita.serving.client import server_metrics
from hita.serving.launcher import free_ports

pytestmark = pytest.mark.usefixtures("skip_without_triton")

HITA = [sys.executable, "-m", "hita.cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`hita serve --runtime torch` in its own process; yields (process, ports, stderr file)."""
    work = tmp_path_factory.mktemp("serve")
    http, grpc, prom = free_ports(3)
    err = open(work / "stderr.txt", "w+")
    proc = subprocess.Popen(HITA + ["serve", "--runtime", "torch", "--workdir", str(work), "--http-port", str(http),
                                    "--grpc-port", str(grpc), "--metrics-port", str(prom), "--max-rows", "16",
                                    "--threads", "1"],  # as the tests run torch: same kernels, same bits
                            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HITA_NO_PROGRESS": "1"})
    try:
        yield proc, (http, grpc, prom), err, work
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        err.close()


def _log(err) -> str:
    err.seek(0)
    return err.read()


def _wait_serving(served, wait_for):
    proc, _, err, _ = served
    wait_for(lambda: "serving model 'hita'" in _log(err) or proc.poll() is not None, "the server to be ready", 300)
    assert proc.poll() is None, _log(err)


def test_hita_client_writes_the_pngs_hita_generate_writes(served, wait_for, tmp_path):
    """Requests of 3 images sent 3 at a time share steps on the server, yet give the tokens of one
    offline run of all 8 images and, decoded in the same groups of 3, the same PNG bytes (eager
    PyTorch's decoder may round a pixel differently for another decode batch size)."""
    import json

    import torch

    from hita.assets import default_model
    from hita.runtimes.factory import make_executor
    from hita.runtimes.loop import generate_tokens
    from hita.runtimes.sampling import SamplingOptions

    _wait_serving(served, wait_for)
    _, (http, grpc, _), _, _ = served
    runner = CliRunner()
    common = ["--classes", "0-3", "--per-class", "2", "--cfg-scale", "2.5", "--seed", "7"]
    res = runner.invoke(app, ["client", "--url", f"127.0.0.1:{grpc}", "--protocol", "grpc", "--per-request", "3",
                              "--parallel", "3", "--tokens", "--out", str(tmp_path / "served"), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "--runtime", "torch", "--batch-size", "3", "--out", str(tmp_path / "offline"),
                              *common])
    assert res.exit_code == 0, res.output
    d = default_model()
    offline = generate_tokens(make_executor("torch", gpt=d.gpt, tokenizer=d.tokenizer), [0, 0, 1, 1, 2, 2, 3, 3],
                              SamplingOptions(cfg_scale=2.5, seed=7)).tokens
    served_tokens = json.loads((tmp_path / "served" / "tokens.json").read_text())["tokens"]
    assert torch.equal(torch.tensor(served_tokens), offline)
    served_files = sorted(p.name for p in (tmp_path / "served").glob("*.png"))
    assert len(served_files) == 8
    for name in served_files:
        assert (tmp_path / "served" / name).read_bytes() == (tmp_path / "offline" / name).read_bytes(), name
    bad = runner.invoke(app, ["client", "--url", f"127.0.0.1:{http}", "--classes", "42", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "class_ids: class id 42 out of range [0, 10)" in bad.output


def test_sigterm_finishes_accepted_requests_then_exits(served, wait_for):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import request_inputs

    _wait_serving(served, wait_for)
    proc, (http, grpc, prom), err, work = served
    url = f"http://127.0.0.1:{prom}/metrics"
    before = server_metrics(url)
    done = []
    tg.InferenceServerClient(f"127.0.0.1:{grpc}").async_infer(
        "hita", request_inputs(tg, [3] * 8, SamplingOptions(cfg_scale=2.0, seed=9), False, 0),
        callback=lambda result, error: done.append((result, error)))
    wait_for(lambda: server_metrics(url)["hita_steps_total"] >= before["hita_steps_total"] + 3,
             "the request to start decoding")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "hita: draining" in (work / "tritonserver.log").read_text(), "the model to start draining")
    late = th.InferenceServerClient(f"127.0.0.1:{http}")
    # Refused either by the draining model (503, "shutting down") or, once the model has finished
    # and Triton is stopping (a loaded machine gets there first), by the closed endpoint.
    with pytest.raises(Exception, match="shutting down|Connection refused") as refused:
        late.infer("hita", request_inputs(th, [1], SamplingOptions(), False, 0))
    if "shutting down" in str(refused.value):
        assert "503" in str(refused.value.status())
    late.close()
    wait_for(lambda: done, "the accepted request's answer")
    result, error = done[0]
    assert error is None and result.as_numpy("images").shape == (8, 32, 32, 3)
    assert proc.wait(120) == 0, _log(err)
    assert "draining" in _log(err)


def test_a_model_that_fails_to_load_is_never_ready_and_fails_in_one_line(rows_onnx, tmp_path):
    """A decode graph damaged after export (same size, so the quick pre-check passes) stops the model
    from loading inside Triton: the endpoints never report ready and `hita serve` exits 1 with the
    model's own reason on one line."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(rows_onnx[0], art)
    blob = bytearray((art / "decode_step.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (art / "decode_step.onnx").write_bytes(bytes(blob))
    http, grpc, prom = free_ports(3)
    res = subprocess.run(HITA + ["serve", "--artifacts", str(art), "--workdir", str(tmp_path / "w"),
                                 "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(prom)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HITA_NO_PROGRESS": "1"})
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "decode_step.onnx" in errors[0] and "sha256" in errors[0], res.stderr
    assert "serving model" not in res.stderr
