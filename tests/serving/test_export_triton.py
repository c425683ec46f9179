"""`hita export --engine triton`: a standalone model repository that a stock tritonserver serves.

The repository is served by the bundled ``tritonserver`` binary as it is (only the environment fix
of :mod:`hita.serving.launcher` in between), which is what a GPU fleet runs.
"""
from __future__ import annotations

from contextlib import closing

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hita.cli.app import app


def test_export_engine_triton_writes_a_repository_that_a_stock_tritonserver_serves(skip_without_triton, tmp_path):
    from hita.export.manifest import load_manifest
    from hita.export.spec import DECODE_STEP, has_row_positions
    from hita.runtimes.loop import generate_images, to_uint8
    from hita.runtimes.onnxrt import OrtExecutor
    from hita.runtimes.sampling import SamplingOptions
    from hita.serving.client import connect, generate
    from hita.serving.launcher import TritonServer, free_ports

    repo = tmp_path / "repo"
    res = CliRunner().invoke(app, ["export", "--engine", "triton", "--out", str(repo), "--max-batch", "8"])
    assert res.exit_code == 0, res.output
    assert "tritonserver --model-repository" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]            # no staging folders left
    artifacts = repo / "hita" / "1" / "artifacts"
    m = load_manifest(artifacts, expect_engine="onnx")
    assert has_row_positions(m.signature(DECODE_STEP))                       # in-flight batching possible
    config = (repo / "hita" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and '"onnxruntime"' in config and '"artifacts"' in config
    assert 'key: "max_rows" value: { string_value: "8" }' in config

    opts = SamplingOptions(cfg_scale=3.0, seed=5)
    images, result = generate_images(OrtExecutor(artifacts), torch.tensor([2, 7]), opts)
    http, grpc, prom = free_ports(3)
    with TritonServer(repo, tmp_path / "work", http_port=http, grpc_port=grpc, metrics_port=prom) as srv:
        srv.wait_ready(300)
        with closing(connect(srv.http_url, "http")) as client:
            got = generate(client, [2, 7], opts, protocol="http", return_tokens=True)
    assert srv.process.returncode == 0, srv.first_error()
    assert np.array_equal(got.images, to_uint8(images).numpy())
    assert np.array_equal(got.tokens, result.tokens.numpy())


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--precision does not apply to --engine triton"),
    (["--from-onnx", "x"], "--from-onnx does not apply to --engine triton"),
    (["--device", "tpu"], "--device for --engine triton is where the server runs the model"),
])
def test_export_engine_triton_refuses_options_of_other_engines_in_one_line(tmp_path, args, message):
    res = CliRunner().invoke(app, ["export", "--engine", "triton", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_export_engine_triton_never_writes_over_files_or_serves_a_foreign_folder(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["export", "--engine", "triton", "--out", str(tmp_path / "full")])
    assert res.exit_code == 2 and "is not an empty folder" in res.output
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    res = CliRunner().invoke(app, ["export", "--engine", "triton", "--out", str(tmp_path / "r"),
                                   "--from-artifacts", str(tmp_path / "full")])
    assert res.exit_code == 2 and "manifest" in res.output, res.output
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["export", "--engine", "onnx", "--out", str(tmp_path / "r"),
                                   "--from-artifacts", str(tmp_path / "full")])
    assert res.exit_code == 2 and "use it with --engine triton" in res.output
