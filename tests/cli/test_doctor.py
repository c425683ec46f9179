"""`hita doctor` reports this machine's real state, one line per engine and runtime."""
from __future__ import annotations

import shutil

import torch
from typer.testing import CliRunner

from hita.cli.app import app
from hita.jobs.doctor import checks
from hita.util.gpu import Unavailable, import_tensorrt


def _has_tensorrt() -> bool:
    try:
        import_tensorrt()
        return True
    except Unavailable:
        return False


def test_doctor_matches_the_machine():
    by = {c.what: c for c in checks()}
    assert by["GPU"].ok == torch.cuda.is_available()
    assert by["runtime tensorrt"].ok == (torch.cuda.is_available() and _has_tensorrt())
    assert by["runtime onnxruntime"].ok and "CPUExecutionProvider" in by["runtime onnxruntime"].detail
    assert by["build-cpp (C++ host)"].ok == bool(shutil.which("cmake") and shutil.which("g++")
                                                 and by["build-cpp (C++ host)"].detail.startswith("cmake"))
    assert all(c.fix for c in by.values() if not c.ok), "every missing piece names its fix"


def test_doctor_cli_prints_every_check():
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    for c in checks():
        assert c.what in res.output
    assert res.output.count("fix:") == sum(not c.ok for c in checks())
