"""The distribution maps the top-level folders onto hita.* and lists every package."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"hita": "hita", "hita.export": "export", "hita.runtimes": "runtimes",
           "hita.calibration": "calibration", "hita.cli": "cli", "hita.jobs": "jobs", "hita.serving": "serving"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_dir_mapping_is_declared():
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == MAPPING


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, folder in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert found - listed == set(), "add these packages to pyproject.toml [tool.setuptools] packages"


@pytest.mark.parametrize("name", sorted(MAPPING))
def test_imports_from_the_mapped_folder(name):
    mod = importlib.import_module(name)
    assert Path(mod.__file__).parent == ROOT / MAPPING[name]


def test_import_hita_stays_light():
    # Backends (onnxruntime, tensorrt) must be imported lazily, only by the executor that needs them.
    code = "import sys, hita, hita.runtimes, hita.export, hita.cli.app; " \
           "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
