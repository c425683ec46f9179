"""The C++ host (runtimes/cpp): built with CMake against the torch wheel, run on the tiny AOTI export.

It must draw exactly the tokens of the Python loop over the same packages (same seed and options:
CFG, cfg_interval, temperature, top-k, top-p, row offset), write the decoder's pixels as PNGs, and
refuse foreign or damaged artifacts with exit code 2 and a one-line message.

The build goes to the session's base temp dir (rebuilt each CI run; about 15-40 s on 2 cores) and the
AOTI export is shared with tests/export/test_aoti.py. Skipped, with the reason, where cmake or a C++
compiler is missing.

Forged folders: ``reissue_manifest`` writes a consistent manifest.json + manifest.sha256 with other
settings (a genuine export for elsewhere, or a careful forger), so the host must check the fields
themselves; ``_forge`` does the same for content the Python Manifest refuses to build at all.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hita.export.manifest import CHECKSUM_NAME, MANIFEST_NAME, PIN_ENV, load_manifest, manifest_sha256
from hita.export.testing import reissue_manifest, tiny_models
from hita.runtimes.loop import generate_tokens, to_uint8
from hita.runtimes.sampling import SamplingOptions
from PIL import Image
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cmake") is None or not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
        reason="needs cmake and a C++ compiler to build runtimes/cpp",
    ),
]


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "hita-cpp-build"


@pytest.fixture(scope="session")
def host(cpp_build, aoti_dir):
    # ``aoti_dir`` (tests/conftest.py) started this build before exporting, so it compiled meanwhile.
    return cpp_build.result().binary


@pytest.fixture(scope="module")
def aoti(aoti_dir):
    from hita.runtimes.aoti import AotiExecutor

    return AotiExecutor(aoti_dir)


def _run(host, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


# ----------------------------------------------------------------------------------------------
# Same tokens as the Python loop
# ----------------------------------------------------------------------------------------------

OPTIONS = {
    "greedy": SamplingOptions(temperature=0.0, cfg_scale=1.0),
    "plain": SamplingOptions(cfg_scale=1.0, seed=4),
    "cfg-interval-topk-topp": SamplingOptions(cfg_scale=1.5, cfg_interval=6, top_k=40, top_p=0.9, temperature=0.9, seed=7),
    "strong-cfg-topp-max-seed": SamplingOptions(cfg_scale=3.0, top_p=0.5, temperature=1.3, seed=2**64 - 1),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_tokens_equal_python_loop(host, aoti_dir, aoti, name):
    from hita.jobs.build_cpp import run_host

    opts, ids = OPTIONS[name], [0, 3, 9]
    tokens, seconds = run_host(host, aoti_dir, ids, opts, threads=1)
    want = generate_tokens(aoti, ids, opts).tokens
    assert tokens.shape == want.shape == (3, aoti.gpt_config.seq_len)
    mism = (tokens != want).any(dim=0).nonzero().flatten().tolist()
    assert not mism, f"first differing sequence index {mism[0]}"
    assert seconds > 0


def test_row_offset_keys_the_noise_by_global_image_index(host, aoti_dir, aoti):
    from hita.jobs.build_cpp import run_host

    opts = SamplingOptions(seed=9, top_k=100)
    batch = generate_tokens(aoti, [4, 8], opts).tokens                    # images 0 and 1
    second = run_host(host, aoti_dir, [8], opts, row_offset=1, threads=1)  # image 1 alone
    assert torch.equal(second.tokens[0], batch[1])


def test_pngs_equal_python_decoder(host, aoti_dir, aoti, tmp_path):
    from hita.jobs.build_cpp import run_host

    _, tok = tiny_models(0)
    opts, ids = SamplingOptions(seed=2), [1, 5]
    run = run_host(host, aoti_dir, ids, opts, tmp_path / "png", threads=1)
    assert [p.name for p in run.pngs] == ["0000_class1.png", "0001_class5.png"]
    assert len(run.step_ms) == aoti.gpt_config.seq_len - 1 and run.prefill_ms > 0 and run.decode_image_ms > 0
    got = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in run.pngs])  # [n, H, W, 3]
    nh = aoti.gpt_config.n_holistic
    hol, patch = run.tokens[:, :nh], run.tokens[:, nh:]
    with torch.no_grad():
        eager = to_uint8(tok.decode(hol, patch))                             # [n, H, W, 3]
    assert torch.equal(got, to_uint8(aoti.decode_image(hol, patch)))         # same package: same pixels
    diff = (got.int() - eager.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01                    # eager: float noise only


# ----------------------------------------------------------------------------------------------
# Refusals: exit code 2, one line on stderr
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def copy_dir(aoti_dir, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(aoti_dir, dst)
    return dst


def _forge(folder: Path, edit) -> None:
    """``edit(raw)`` manifest.json as a dict and write a matching manifest.sha256, bypassing the
    Python Manifest's own validation (content it refuses to build), as a forger could."""
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    edit(raw)
    text = json.dumps(raw, indent=2, sort_keys=True).encode()
    (folder / MANIFEST_NAME).write_bytes(text)
    (folder / CHECKSUM_NAME).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST_NAME}\n")


def _refused(proc: subprocess.CompletedProcess, pattern: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _args(folder: Path, *more) -> tuple:
    return ("--artifacts", folder, "--classes", "1", "--no-images", *more)


def test_refuses_package_for_another_device(host, copy_dir):
    reissue_manifest(copy_dir, device="cuda")
    _refused(_run(host, *_args(copy_dir)), r"compiled for device 'cuda'")


def test_refuses_package_for_another_torch_version(host, copy_dir):
    versions = dict(load_manifest(copy_dir).versions, torch="2.11.0+cu128")
    reissue_manifest(copy_dir, versions=versions)
    _refused(_run(host, *_args(copy_dir)), r"compiled with torch 2\.11\.0\+cu128")


def test_refuses_an_engine_it_has_no_backend_for(host, copy_dir):
    reissue_manifest(copy_dir, engine="onnx")
    _refused(_run(host, *_args(copy_dir)), r"holds a 'onnx' export, which this host cannot run \(it runs aoti\)")


def test_refuses_manifest_edited_without_reissuing_its_checksum(host, copy_dir):
    raw = (copy_dir / MANIFEST_NAME).read_text()
    (copy_dir / MANIFEST_NAME).write_text(raw.replace('"device": "cpu"', '"device": "cuda"'))
    _refused(_run(host, *_args(copy_dir)), r"manifest\.json: content changed after export \(checksum mismatch\)")
    (copy_dir / MANIFEST_NAME).write_text(raw)
    (copy_dir / CHECKSUM_NAME).unlink()
    _refused(_run(host, *_args(copy_dir)), r"manifest\.sha256: missing")


def test_refuses_missing_or_changed_files(host, copy_dir):
    data = (copy_dir / "decode_step.pt2").read_bytes()
    (copy_dir / "decode_step.pt2").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    _refused(_run(host, *_args(copy_dir)), r"decode_step\.pt2: sha256 mismatch")
    (copy_dir / "decode_step.pt2").write_bytes(data)
    (copy_dir / "decoder.pt2").unlink()
    _refused(_run(host, *_args(copy_dir)), r"decoder\.pt2: missing")
    (copy_dir / MANIFEST_NAME).unlink()
    _refused(_run(host, *_args(copy_dir)), r"manifest\.json: missing")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden", "sub/decoder.pt2", CHECKSUM_NAME])
def test_refuses_file_names_that_are_not_plain(host, copy_dir, name):
    target = copy_dir / name if not name.startswith("/") else Path(name)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"payload")
    data = target.read_bytes()  # a forger records the target's true size and hash
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _forge(copy_dir, lambda m: m["files"].update({name: entry}))
    _refused(_run(host, *_args(copy_dir)), rf"artifact file name '{re.escape(name)}' must be a plain, visible file")


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(format_version=1), r"format version 1, this hita reads version 2"),
    (lambda m: m.update(extra=1), r"unknown keys \['extra'\], missing keys \[\]"),
    (lambda m: m.pop("graphs"), r"missing keys \['graphs'\]"),
    (lambda m: m["files"]["decoder.pt2"].update(size=str(m["files"]["decoder.pt2"]["size"])),
     r"files\['decoder\.pt2'\] must be"),
    (lambda m: m["gpt_config"].update(n_layer="4"), r"n_layer must be an integer >= 1"),
    (lambda m: m.update(device=["cpu"]), r"device must be a JSON str"),
    (lambda m: m["graphs"]["prefill"].update(file=7), r"file must be a JSON str"),
], ids=["version", "unknown-key", "missing-key", "size-str", "config-str", "device-list", "graph-file-int"])
def test_refuses_wrongly_typed_manifest_fields(host, copy_dir, edit, pattern):
    _forge(copy_dir, edit)
    _refused(_run(host, *_args(copy_dir)), pattern)


def test_pinned_manifest_hash(host, aoti_dir):
    from hita.jobs.build_cpp import HostRunError, run_host

    wrong = "0" * 64
    _refused(_run(host, *_args(aoti_dir, "--expect-manifest-sha256", wrong)),
             rf"manifest sha256 [0-9a-f]{{64}} does not match the pinned {wrong}; this is not the export you reviewed")
    pin = manifest_sha256(aoti_dir)
    run = run_host(host, aoti_dir, [1], SamplingOptions(), expect_manifest_sha256=f" {pin.upper()}\n")
    assert run.report["manifest_sha256"] == pin and run.report["engine"] == "aoti"
    with pytest.raises(HostRunError, match="does not match the pinned"):
        run_host(host, aoti_dir, [1], SamplingOptions(), expect_manifest_sha256=wrong)


def test_require_pinned_refuses_an_unpinned_aoti_folder(host, aoti_dir, monkeypatch):
    from hita.jobs.build_cpp import run_host

    monkeypatch.setenv(PIN_ENV, "1")  # the host inherits the environment
    _refused(_run(host, *_args(aoti_dir)),
             rf"a aoti folder contains executable code and {PIN_ENV} is set; pass --expect-manifest-sha256 HEX")
    tokens, _ = run_host(host, aoti_dir, [1], SamplingOptions(), expect_manifest_sha256=manifest_sha256(aoti_dir))
    assert tokens.shape[0] == 1
    monkeypatch.setenv(PIN_ENV, "0")  # "0" (or empty) switches the policy off, as in Python
    assert _run(host, *_args(aoti_dir)).returncode == 0


def test_refuses_bad_input(host, aoti_dir, tmp_path):
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "10"), r"class id 10 out of range \[0, 10\)")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1", "--top-p", "0"), r"top_p must lie in \(0, 1\]")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1", "--cfg-scale", "0.5"), r"cfg_scale")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1", "--seed", "-1"), r"--seed: expects a decimal")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1-x"), r"cannot read class list '1-x'")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1", "--bogus"), r"--bogus")
    _refused(_run(host, "--artifacts", aoti_dir, "--classes", "1", "--device", "tpu"), r"device must be 'cpu' or")
    _refused(_run(host, "--artifacts", tmp_path / "none", "--classes", "1"), r"no such artifacts folder")
    _refused(_run(host, "--classes", "1"), r"--artifacts")
    usage = _run(host, "--help")
    assert usage.returncode == 0 and "--expect-manifest-sha256" in usage.stdout


def test_run_host_raises_with_the_hosts_message(host, copy_dir):
    from hita.jobs.build_cpp import HostRunError, run_host

    reissue_manifest(copy_dir, device="cuda")
    with pytest.raises(HostRunError, match="compiled for device 'cuda'") as e:
        run_host(host, copy_dir, [1], SamplingOptions())
    assert e.value.returncode == 2


# ----------------------------------------------------------------------------------------------
# Build command
# ----------------------------------------------------------------------------------------------


def test_build_cpp_cli_reuses_the_build_folder(host, build_dir):
    from hita.cli.app import app

    result = CliRunner().invoke(app, ["build-cpp", "--out", str(build_dir)])
    assert result.exit_code == 0, result.output
    assert f"built {host} (C++17" in result.output


def test_cmake_names_the_apt_packages_of_a_missing_library(tmp_path):
    from hita.jobs.build_cpp import SOURCE_DIR, CppBuildError, _run

    cmd = ["cmake", "-S", str(SOURCE_DIR), "-B", str(tmp_path), "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON"]
    with pytest.raises(CppBuildError) as e:
        _run(cmd, "cmake configure")
    assert str(e.value) == ("nlohmann/json (nlohmann-json3-dev) not found; install the build dependencies: "
                            "apt-get install nlohmann-json3-dev libstb-dev libcli11-dev libssl-dev")
