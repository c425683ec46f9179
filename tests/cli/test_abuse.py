"""The standing abuse suite: what a careless or hostile user does to the CLI, on the embedded model.

Every case asserts the exit code, the one-line ``error:`` message (no traceback), and what is on disk
afterwards: nothing half-written, nothing of the user's deleted or overwritten.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hita.checkpoint import save_model
from hita.cli.app import app
from hita.config import GPTConfig, TokenizerConfig
from hita.models.gpt import HitaGPT
from hita.models.tokenizer import HitaTokenizer

runner = CliRunner()


def _one_error_line(res) -> str:
    """The CLI's single ``error:`` line (and proof there is no traceback)."""
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "0-300000000"], "300000001 images requested; one run makes at most"),
        (["--classes", "0-30"], "class id 30 out of range [0, 10)"),
        (["--classes", "5-2"], "class range '5-2' runs backwards; write it as 2-5"),
        (["--per-class", "1000000000"], "must be in 1..1000000"),
        (["--runtime", "tensorrt", "--artifacts", "."], "the tensorrt runtime runs TensorRT engines on an NVIDIA GPU"
         if not torch.cuda.is_available() else "tensorrt"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--runtime", "onnxruntime", "--artifacts", ".", "--precision", "bf16"], "fixed at export"),
        (["--runtime", "onnxruntime", "--artifacts", ".", "--pos128", "consistent"], "fixed at export"),
        (["--artifacts", "."], "--artifacts runs with an artifact runtime"),
        (["--expect-manifest-sha256", "00"], "pins an artifacts folder"),
    ],
)
def test_generate_bad_arguments_fail_fast(tmp_path, args, message):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = runner.invoke(app, ["generate", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in _one_error_line(res)
    assert time.perf_counter() - t0 < 30          # refused up front, not after minutes of work
    assert not out.exists()


def test_resize_is_bounded(tmp_path):
    res = runner.invoke(app, ["generate", "--out", str(tmp_path / "o"), "--resize", "100000"])
    assert res.exit_code == 2 and "4096" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("kind", ["file", "devnull"])
def test_generate_out_must_be_a_writable_folder(tmp_path, kind):
    target = tmp_path / "a-file.txt" if kind == "file" else "/dev/null"
    if kind == "file":
        target.write_text("keep me")
    res = runner.invoke(app, ["generate", "--out", str(target), "--classes", "0"])
    assert res.exit_code == 2
    assert "exists and is not a folder" in _one_error_line(res)
    if kind == "file":
        assert target.read_text() == "keep me"


def _tmpfs(path, options) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_generate_out_read_only(tmp_path):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _tmpfs(ro, "size=64k,ro"):
            pytest.skip("root writes into read-only folders, and this sandbox cannot mount a read-only tmpfs")
    else:
        ro.mkdir()
        ro.chmod(0o500)
    try:
        res = runner.invoke(app, ["generate", "--out", str(ro / "sub"), "--classes", "0"])
        assert res.exit_code == 2 and "not writable" in _one_error_line(res)
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_generate_on_a_full_disk_is_one_line(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "size=48k"):
        pytest.skip("mounting a small tmpfs needs root and mount rights in this sandbox")
    try:
        # 40 images of 64x64 RGB PNGs (~3-8 KiB each) do not fit in 48 KiB.
        res = runner.invoke(app, ["generate", "--out", str(disk / "o"), "--classes", "0-9", "--per-class", "4",
                                  "--resize", "64", "--batch-size", "40"])
        assert res.exit_code == 2, res.output
        assert "No space left on device" in _one_error_line(res)
        assert not (disk / "o" / "complete.json").exists()        # the folder says it is partial
        # no temp files; the run marker stays (the folder is hita's and may be reused)
        assert [p.name for p in (disk / "o").iterdir() if p.name.startswith(".")] == [".hita-run"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("args", [["generate", "--classes", "0"], ["demo"], ["build-cpp"]])
def test_never_writes_into_a_folder_of_foreign_files(tmp_path, args):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "grid.png").write_text("precious")
    (out / "complete.json").write_text("{}")
    (out / "Makefile").write_text("all:\n")
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "holds files hita did not write" in _one_error_line(res)
    assert sorted(p.name for p in out.iterdir()) == ["Makefile", "complete.json", "grid.png"]
    assert (out / "grid.png").read_text() == "precious"


@pytest.mark.parametrize("target", ["file", "fifo"])
def test_convert_never_replaces_a_foreign_file_or_device(tmp_path, target):
    from hita.export.testing import tiny_models

    src = tmp_path / "gpt.pt"
    torch.save({"model": tiny_models(0)[0].state_dict()}, src)
    dst = tmp_path / "dst"
    if target == "file":
        dst.write_text("keep")
    else:
        os.mkfifo(dst)
    res = runner.invoke(app, ["convert", str(src), str(dst), "--preset", "tiny"])
    assert res.exit_code == 2, res.output
    assert ("was not written by hita" if target == "file" else "is not a regular file") in _one_error_line(res)
    assert dst.read_text() == "keep" if target == "file" else dst.is_fifo()


def test_a_crafted_zip_checkpoint_is_refused_before_it_expands(tmp_path):
    import zipfile

    good, bomb = tmp_path / "good.pt", tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4)}, good)
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():  # one record claims 64 MiB but packs into a few KiB
            out.writestr(info.filename, b"\0" * (64 << 20) if info.filename.endswith("data/0") else z.read(info))
    res = runner.invoke(app, ["convert", str(bomb), str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2
    assert "is compressed, which torch never writes" in _one_error_line(res)
    assert not (tmp_path / "o.safetensors").exists()


def test_non_finite_training_rates_and_huge_cfg_are_refused(tmp_path):
    res = runner.invoke(app, ["train", "gpt", "--preset", "tiny", "--codes", str(tmp_path / "c.safetensors"),
                              "--run-dir", str(tmp_path / "run"), "--lr", "inf"])
    assert res.exit_code == 2 and "--lr must be a finite number" in _one_error_line(res)
    assert not (tmp_path / "run").exists()
    res = runner.invoke(app, ["generate", "--classes", "0", "--cfg-scale", "1e38", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "would overflow" in _one_error_line(res)
    assert not (tmp_path / "g").exists()


def test_option_parse_errors_are_one_line(tmp_path):
    exe = Path(sys.executable).with_name("hita")
    res = subprocess.run([str(exe), "generate", "--seed", "0x10", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: Invalid value for '--seed': Input should be a valid integer, unable to parse string as an integer; "
        "see `hita generate --help`"]


def test_hostile_names_are_escaped_in_messages():
    from hita.cli.common import printable

    assert printable("bad \x1b]0;pwned\x07 name\nsecond") == "bad \\x1b]0;pwned\\x07 name\\nsecond"


def test_generate_writes_a_completion_marker_last(tmp_path):
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", "--out", str(out), "--classes", "0,1", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    marker = (out / "complete.json").read_text()
    assert '"images": 2' in marker
    assert sorted(p.name for p in out.glob("0*.png")) == ["0000_class0.png", "0001_class1.png"]


def test_batch_that_cannot_fit_in_memory_is_refused(tmp_path):
    res = runner.invoke(app, ["generate", "--out", str(tmp_path / "o"), "--classes", "0", "--per-class", "1000000",
                              "--batch-size", "1000000"])
    assert res.exit_code == 2
    assert "the KV cache needs" in _one_error_line(res) and "use --batch-size" in res.output


def test_default_class_message_names_the_model_classes(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(GPTConfig.from_name("tiny"), num_classes=150)
    gpt, tok = HitaGPT(cfg), HitaTokenizer(TokenizerConfig.from_name("tiny"))
    save_model(gpt, cfg, tmp_path / "gpt.safetensors")
    save_model(tok, tok.cfg, tmp_path / "tok.safetensors")
    res = runner.invoke(app, ["generate", "--gpt", str(tmp_path / "gpt.safetensors"), "--tokenizer",
                              str(tmp_path / "tok.safetensors"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "this GPT has 150 classes" in _one_error_line(res)


def test_export_never_touches_a_folder_it_did_not_write(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text('{"name": "web app"}')
    (site / "app.js").write_text("precious()")
    t0 = time.perf_counter()
    res = runner.invoke(app, ["export", "--out", str(site)])
    assert res.exit_code == 2
    assert "refusing to replace it" in _one_error_line(res)
    assert time.perf_counter() - t0 < 30          # refused before loading or exporting anything
    assert sorted(p.name for p in site.iterdir()) == ["app.js", "manifest.json"]
    assert (site / "app.js").read_text() == "precious()"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_refuses_to_overwrite_its_source(tmp_path):
    from hita.assets import default_model

    src = tmp_path / "gpt.safetensors"
    shutil.copy(default_model().gpt, src)
    before = src.read_bytes()
    res = runner.invoke(app, ["convert", str(src), str(src)])
    assert res.exit_code == 2 and "is the source checkpoint" in _one_error_line(res)
    assert src.read_bytes() == before


def test_parity_json_to_a_folder_is_refused(tmp_path):
    res = runner.invoke(app, ["parity", "--artifacts", str(tmp_path), "--json", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in _one_error_line(res)


def test_a_self_consistent_forged_manifest_fails_in_one_line(onnx_dir, tmp_path):
    """A manifest rewritten with its checksum (anyone with write access can) that claims more
    classes than the graph holds: ONNX Runtime's failure becomes one line pointing at re-export/pins."""
    import json

    from hita.export.testing import reissue_manifest

    forged = tmp_path / "forged"
    shutil.copytree(onnx_dir, forged)
    gpt_config = json.loads((forged / "manifest.json").read_text())["gpt_config"]
    reissue_manifest(forged, gpt_config={**gpt_config, "num_classes": gpt_config["num_classes"] + 1000})
    res = runner.invoke(app, ["generate", "--runtime", "onnxruntime", "--artifacts", str(forged),
                              "--classes", str(gpt_config["num_classes"] + 5), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "ONNX Runtime failed running the artifacts" in _one_error_line(res)
