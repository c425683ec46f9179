"""An independent comparator: Polygraphy's own CLI runs ``decode_step.onnx`` on inputs saved from
our executor mid-generation; its outputs must equal what our IO-bound executor computed.

This catches mistakes our own harness could share with itself (binding the wrong cache set,
feeding a stale token or position, reading logits from the wrong buffer).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hita.export.spec import kv_names
from hita.runtimes.onnxrt import OrtExecutor

pytest.importorskip("polygraphy")


def _polygraphy() -> str:
    exe = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    if not Path(exe).exists():
        pytest.skip("the polygraphy command is not installed")
    return exe


def test_polygraphy_run_matches_our_executor(onnx_dir, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    ex = OrtExecutor(onnx_dir, threads=1)  # default binding (in place on CPU)
    cfg = ex.gpt_config
    ex.start(2)
    logits = ex.prefill(torch.tensor([4, cfg.null_class]))
    target = cfg.n_holistic + 2  # a patch position, past the pos128 branch
    for pos in range(1, target):
        logits = ex.decode(logits.argmax(-1), pos)
    token = logits.argmax(-1)
    feed = {"token": token.numpy().copy(), "position": np.array([target], dtype=np.int64)}
    feed.update({n: t.numpy().copy() for n, t in zip(kv_names("past_key_values", cfg.n_layer), ex.kv_cache())})
    save_json([feed], str(tmp_path / "inputs.json"))

    ours = [ex.decode(token, target).numpy().copy()] + [t.numpy().copy() for t in ex.kv_cache()]

    subprocess.run(
        [_polygraphy(), "run", str(onnx_dir / "decode_step.onnx"), "--onnxrt",
         "--load-inputs", str(tmp_path / "inputs.json"), "--save-outputs", str(tmp_path / "out.json")],
        check=True, capture_output=True, text=True,
    )
    results = RunResults.load(str(tmp_path / "out.json"))
    ((_, iterations),) = list(results.items())
    theirs = iterations[0]
    names = ["logits"] + kv_names("present", cfg.n_layer)
    for name, mine in zip(names, ours):
        np.testing.assert_allclose(theirs[name], mine, rtol=0, atol=1e-5, err_msg=name)
