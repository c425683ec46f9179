"""TensorRT: static checks that run everywhere, and real engine tests where TensorRT and a GPU exist.

TensorRT cannot be installed on CPU machines, so its API use is checked against its published
surface instead of being mocked:

- mypy type-checks every TensorRT call against ``tensorrt-stubs`` (10.13; installed by ``.ci/run``
  with ``pip install --no-deps --target .venv/static-checks``; the stub file has five signatures that
  are not valid Python, repaired in a temporary copy before mypy reads it);
- every TensorRT name our code uses exists in the TensorRT 10.16 *and* 11.1 Python APIs (the pybind
  sources in ``../shared/vendor/tensorrt``), so nothing removed in 11 (``EXPLICIT_BATCH``,
  ``supports_model``) can slip in; names in no version at all are mypy's to catch.

``pytest -m tensorrt`` runs the real suite: build the tiny model's engines, validate them against
eager, generate the same tokens as eager, refuse an engine built for another GPU.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hita.cli.app import app
from hita.export.spec import DynamicDim
from hita.export.tensorrt import TensorRTOptions, batch_profiles

ROOT = Path(__file__).resolve().parents[2]
TRT_MODULES = [ROOT / "export" / "tensorrt.py", ROOT / "export" / "trt_engine.py", ROOT / "runtimes" / "tensorrt.py",
               ROOT / "hita" / "util" / "gpu.py"]
STUBS = Path(os.environ.get("HITA_TENSORRT_STUBS", ROOT / ".venv" / "static-checks"))
VENDOR = Path(os.environ.get("HITA_TENSORRT_VENDOR", ROOT.parent / "shared" / "vendor" / "tensorrt"))
STUBS_FIX = ("pip install --no-deps --target .venv/static-checks tensorrt-stubs==10.13.0.35.1 "
             "nvidia-cuda-runtime-cu12 (what .ci/run does)")


# -- the API surface, statically -------------------------------------------------------------------


def _repaired_stubs(dest: Path) -> Path:
    """Copy the stubs, replacing the few signatures that are not valid Python (a parameter named
    ``in``, a non-default parameter after defaults) by ``(self, *args, **kwargs)``."""
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(STUBS / pkg, dest / pkg)
    pyi = dest / "tensorrt_bindings" / "tensorrt.pyi"
    lines = []
    for line in pyi.read_text().splitlines():
        s = line.strip()
        if s.startswith("def ") and s.endswith(":"):
            try:
                ast.parse(s + " ...")
            except SyntaxError:
                line = re.sub(r"\(.*\)", "(self, *args, **kwargs)", line, count=1)
        lines.append(line)
    pyi.write_text("\n".join(lines) + "\n")
    return dest


def _mypy(paths: list[Path], tmp_path: Path) -> subprocess.CompletedProcess:
    if not (STUBS / "tensorrt" / "__init__.pyi").is_file():
        pytest.skip(f"tensorrt-stubs not found in {STUBS}: {STUBS_FIX}")
    stubs = _repaired_stubs(tmp_path / "stubs")
    cfg = tmp_path / "mypy.ini"
    cfg.write_text("[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
                   "[mypy-tensorrt_bindings.*]\nignore_errors = True\n[mypy-tensorrt.*]\nignore_errors = True\n")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), "--no-error-summary",
                           "--cache-dir", str(tmp_path / "cache"), *map(str, paths)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_tensorrt_calls_type_check_against_the_stubs(tmp_path):
    res = _mypy(TRT_MODULES, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr


def test_mypy_catches_a_wrong_tensorrt_call(tmp_path):
    """The check above can fail: a misspelt method and a wrong argument type are reported."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n"
                   "b = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "n = b.create_network_v2(0)\n"
                   "c = b.create_builder_config()\n"
                   "c.builder_optimization_level = 'high'\n")
    res = _mypy([bad], tmp_path)
    assert 'has no attribute "create_network_v2"' in res.stdout, res.stdout
    assert "bad_trt.py:5: error: Incompatible types in assignment" in res.stdout, res.stdout


def _pybind_names(version: str) -> set[str]:
    src = VENDOR / version / "python" / "src"
    if not src.is_dir():
        pytest.skip(f"TensorRT {version} API sources not found at {src} (set HITA_TENSORRT_VENDOR)")
    names: set[str] = set()
    for f in src.rglob("*.cpp"):
        names |= set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', f.read_text(errors="replace")))
    return names


def _stub_names() -> set[str]:
    pyi = STUBS / "tensorrt_bindings" / "tensorrt.pyi"
    if not pyi.is_file():
        return set()
    # Defined names only (classes, methods, properties, enum members), not words of the docstrings.
    found = re.findall(r"^\s*(?:def|class)\s+([A-Za-z_]\w*)|^\s*([A-Za-z_]\w*)\s*[:=]", pyi.read_text(), re.M)
    return {a or b for a, b in found}


def _used_attributes(paths: list[Path]) -> set[str]:
    out: set[str] = set()
    for p in paths:
        out |= {n.attr for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute)}
    return out


def _not_tensorrt_names() -> set[str]:
    """Attribute names that belong to Python, torch or hita itself (the receivers are untyped in an
    AST, so a name like ``precision`` or ``append`` that TensorRT also happens to define is ours)."""
    import pathlib

    out: set[str] = set()
    for t in (list, dict, str, tuple, set, bytes, int, pathlib.Path, torch.Tensor, torch.dtype, torch.device,
              torch.cuda.Stream, torch.cuda.CUDAGraph):
        out |= set(dir(t))
    for folder in ("hita", "export", "runtimes", "cli", "jobs"):
        for f in (ROOT / folder).rglob("*.py"):
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                    out.add(n.name)
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                    out.add(n.target.id)
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                    out.add(n.attr)
    return out


def _missing(used: set[str], old: set[str], new: set[str], stubs: set[str]) -> set[str]:
    """Names that are TensorRT's in some version we know but absent from one of the targets."""
    tensorrt_names = old | new | stubs
    return {n for n in used if n in tensorrt_names and not n.startswith("__") and not (n in old and n in new)}


def test_every_tensorrt_name_exists_in_10_16_and_11_1():
    old, new, stubs = _pybind_names("10.16"), _pybind_names("11.1"), _stub_names()
    used = _used_attributes(TRT_MODULES)
    # The names the builder and runtime depend on are really found in both (not vacuously true).
    for name in ("create_network", "STRONGLY_TYPED", "parse_from_file", "set_memory_pool_limit",
                 "builder_optimization_level", "create_timing_cache", "set_tensor_address", "execute_async_v3",
                 "set_optimization_profile_async", "get_aliased_input_tensor", "get_tensor_profile_shape"):
        assert name in used and name in old and name in new, name
    assert _missing(used - _not_tensorrt_names(), old, new, stubs) == set()
    # ... and the check flags what TensorRT 11 removed (a name in no version at all is mypy's to catch).
    assert _missing({"EXPLICIT_BATCH", "supports_model"}, old, new, stubs) == {"EXPLICIT_BATCH", "supports_model"}


# -- what runs without TensorRT ----------------------------------------------------------------------


def test_batch_profiles_cover_the_range_without_gaps():
    dim = DynamicDim("batch", 1, 4, 16, example=2, check=3)
    assert batch_profiles(dim, (2, 8)) == [(1, 2, 2), (3, 8, 8), (9, 16, 16)]
    assert batch_profiles(dim, ()) == [(1, 16, 16)]
    assert batch_profiles(dim, (16, 40)) == [(1, 16, 16)]


@pytest.mark.parametrize("bad, message", [
    ({"workspace_mib": 1}, "workspace"), ({"optimization_level": 6}, "optimization level"),
    ({"hardware_compat": "turing+"}, "hardware compatibility"), ({"kv_write": "inplace"}, "kv_write"),
])
def test_options_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        TensorRTOptions(**bad)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the message on machines without TensorRT")
def test_cli_without_tensorrt_says_what_is_missing_and_writes_nothing(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        if hasattr(tensorrt, "Builder"):
            pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "engines"
    res = CliRunner().invoke(app, ["export", "--engine", "trt", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "TensorRT's Python bindings are not installed" in res.output and "Traceback" not in res.output
    assert not out.exists()


# -- the real thing (pytest -m tensorrt on a GPU with TensorRT) --------------------------------------


@pytest.fixture(scope="module")
def trt_dir(tmp_path_factory):
    from hita.export.tensorrt import export_tensorrt
    from hita.export.testing import tiny_models

    g, t = tiny_models(0)
    return export_tensorrt(g, t, tmp_path_factory.mktemp("trt") / "engines", progress=False,
                           options=TensorRTOptions(timing_cache=""))


@pytest.mark.tensorrt
def test_engines_match_eager_and_alias_the_cache(trt_dir):
    from hita.export.manifest import load_manifest

    m = load_manifest(trt_dir, expect_engine="tensorrt")
    assert m.options["validated"] and m.options["kv_cache"] == "inplace"
    assert m.graphs["decode_step"]["aliased_outputs"], "TensorScatter should update the cache in place"
    assert m.versions["compute_capability"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_tokens_equal_eager(trt_dir, cuda_graphs):
    from hita.export.testing import tiny_models
    from hita.runtimes.loop import generate_tokens
    from hita.runtimes.sampling import SamplingOptions
    from hita.runtimes.tensorrt import TensorRTExecutor
    from hita.runtimes.torch_eager import TorchExecutor

    g, t = tiny_models(0)
    opts = SamplingOptions(seed=3, top_k=50)
    ex = TensorRTExecutor(trt_dir, cuda_graphs=cuda_graphs)
    want = generate_tokens(TorchExecutor(g.cuda(), t.cuda(), device="cuda"), [0, 3, 7], opts).tokens
    got = generate_tokens(ex, [0, 3, 7], opts).tokens
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.tensorrt
def test_refuses_an_engine_built_for_another_gpu(trt_dir, tmp_path):
    from hita.export.errors import ArtifactError
    from hita.export.testing import reissue_manifest
    from hita.runtimes.tensorrt import TensorRTExecutor

    copy = tmp_path / "copy"
    shutil.copytree(trt_dir, copy)
    versions = {**__import__("json").loads((copy / "manifest.json").read_text())["versions"], "compute_capability": "1.0"}
    reissue_manifest(copy, versions=versions)
    with pytest.raises(ArtifactError, match="compute capability 1.0.*hita export --engine tensorrt --from-onnx"):
        TensorRTExecutor(copy)
