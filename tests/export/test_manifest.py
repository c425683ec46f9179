"""Artifacts folders: atomic writes, and every way a folder can be wrong is refused with a clear line."""
from __future__ import annotations

import json

import pytest

from hita.config import GPTConfig, TokenizerConfig
from hita.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    load_manifest,
    sha256_file,
    write_artifacts,
)
from hita.export.spec import graph_specs

GPT = GPTConfig.from_name("tiny")
TOK = TokenizerConfig.from_name("tiny")


def _manifest(engine: str = "onnx") -> Manifest:
    specs = graph_specs(TOK, GPT)
    return Manifest(
        engine=engine,
        tokenizer_preset=TOK.name,
        tokenizer_config=TOK.to_dict(),
        gpt_preset=GPT.name,
        gpt_config=GPT.to_dict(),
        pos128="reference",
        precision="float32",
        device="cpu",
        versions={"torch": "x"},
        graphs={n: {"file": s.file_name, **s.signature.to_dict()} for n, s in specs.items()},
    )


def _write(tmp_path, name="art", payload=b"graph bytes"):
    files = {}
    for f in ("decoder.onnx", "prefill.onnx", "decode_step.onnx"):
        src = tmp_path / f"src-{name}-{f}"
        src.write_bytes(payload + f.encode())
        files[f] = src
    out = tmp_path / name
    return out, write_artifacts(out, files, _manifest())


def test_write_then_load(tmp_path):
    out, written = _write(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["decode_step.onnx", "decoder.onnx", MANIFEST_NAME, "prefill.onnx"]
    m = load_manifest(out, expect_engine="onnx")
    assert m == written
    expected = {"sha256": sha256_file(out / "prefill.onnx"), "size": len(b"graph bytesprefill.onnx")}
    assert m.files["prefill.onnx"] == expected
    assert m.gpt_cfg == GPT and m.tokenizer_cfg == TOK
    assert m.signature("decode_step") == graph_specs(TOK, GPT)["decode_step"].signature
    # No temp folders are left next to the result.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_replaces_an_existing_artifacts_folder(tmp_path):
    out, _ = _write(tmp_path, payload=b"old")
    (out / "stale.txt").write_text("from the old export")
    _, new = _write(tmp_path, payload=b"new")
    assert not (out / "stale.txt").exists()
    assert load_manifest(out) == new
    assert (out / "decoder.onnx").read_bytes() == b"newdecoder.onnx"


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a hita artifacts folder.*refusing to replace"):
        _write(tmp_path)
    assert (out / "notes.txt").read_text() == "precious"


def test_failed_write_leaves_old_folder_untouched(tmp_path):
    out, old = _write(tmp_path, payload=b"old")
    with pytest.raises(ArtifactError, match="not produced"):
        write_artifacts(out, {"decoder.onnx": tmp_path / "src-art-decoder.onnx"}, _manifest())
    assert load_manifest(out) == old


def test_refusals(tmp_path):
    out, _ = _write(tmp_path)
    fix = r"re-run `hita export --engine onnx`"

    with pytest.raises(ArtifactError, match="no such artifacts folder"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match=r"holds a 'onnx' export, expected 'tensorrt'"):
        load_manifest(out, expect_engine="tensorrt")

    data = (out / "prefill.onnx").read_bytes()
    (out / "prefill.onnx").write_bytes(data[:-1] + b"X")
    with pytest.raises(ArtifactError, match=rf"prefill.onnx: sha256 mismatch \(file changed after export\); {fix}"):
        load_manifest(out, expect_engine="onnx")
    load_manifest(out, verify_files=False)  # sizes only: same size passes
    (out / "prefill.onnx").write_bytes(data[:5])
    with pytest.raises(ArtifactError, match=r"prefill.onnx: 5 bytes, manifest says \d+ \(truncated"):
        load_manifest(out)
    (out / "prefill.onnx").unlink()
    with pytest.raises(ArtifactError, match=f"prefill.onnx: missing from .*; {fix}"):
        load_manifest(out)


def test_edited_or_broken_manifest_refused(tmp_path):
    out, _ = _write(tmp_path)
    mpath = out / MANIFEST_NAME
    good = mpath.read_text()

    edited = json.loads(good)
    edited["gpt_config"]["n_layer"] = 5
    mpath.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="content changed after export"):
        load_manifest(out)

    old = json.loads(good)
    old["format_version"] = FORMAT_VERSION + 1
    mpath.write_text(json.dumps(old))
    match = f"format version {FORMAT_VERSION + 1}, this hita reads version {FORMAT_VERSION}"
    with pytest.raises(ArtifactError, match=match):
        load_manifest(out)

    mpath.write_text(good[:40])
    with pytest.raises(ArtifactError, match="manifest.json: unreadable"):
        load_manifest(out)

    mpath.unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_manifest(out)


def test_file_names_must_be_plain(tmp_path):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="plain"):
        write_artifacts(tmp_path / "art", {"../escape.onnx": src}, _manifest())
