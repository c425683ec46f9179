"""Artifacts folders: atomic writes, and every way a folder can be wrong is refused with a clear line."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from hita.config import GPTConfig, TokenizerConfig
from hita.export.manifest import (
    CHECKSUM_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    load_manifest,
    PIN_ENV,
    manifest_sha256,
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
    assert sorted(p.name for p in out.iterdir()) == [
        "decode_step.onnx", "decoder.onnx", MANIFEST_NAME, CHECKSUM_NAME, "prefill.onnx"]
    # The checksum file is sha256sum's format over the manifest's bytes.
    assert (out / CHECKSUM_NAME).read_text() == f"{manifest_sha256(out)}  {MANIFEST_NAME}\n"
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
    _, new = _write(tmp_path, payload=b"new")
    assert load_manifest(out) == new
    assert (out / "decoder.onnx").read_bytes() == b"newdecoder.onnx"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_export_with_a_foreign_file_added_is_not_replaced(tmp_path):
    # A folder is ours only when it holds exactly the files its manifest lists.
    out, old = _write(tmp_path, payload=b"old")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ArtifactError, match="not a hita artifacts folder.*refusing to replace"):
        _write(tmp_path, payload=b"new")
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert load_manifest(out) == old


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


def _consistent(out, text: str) -> None:
    """Write manifest.json with a matching checksum file: what a forger (or another hita) writes."""
    (out / MANIFEST_NAME).write_text(text)
    (out / CHECKSUM_NAME).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST_NAME}\n")


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
    _consistent(out, json.dumps(old))
    match = f"format version {FORMAT_VERSION + 1}, this hita reads version {FORMAT_VERSION}"
    with pytest.raises(ArtifactError, match=match):
        load_manifest(out)

    _consistent(out, good[:40])
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


@pytest.mark.parametrize(
    "change, match",
    [
        ({"files": {"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "plain, visible file name"),
        ({"files": {"/etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "plain, visible file name"),
        ({"graphs": []}, "graphs must be a JSON object"),
        ({"graphs": {"decoder": {"file": 3}}}, "must be an object with a 'file' name"),
        ({"files": {"decoder.onnx": {"sha256": "x", "size": -1}}}, "must be"),
        ({"engine": ["onnx"]}, "engine must be a JSON str"),
        ({"gpt_config": {"n_layer": "many"}}, "gpt_config"),
    ],
)
def test_forged_manifests_are_refused_with_one_line(tmp_path, change, match):
    out, _ = _write(tmp_path)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw.update(change)
    _consistent(out, json.dumps(raw))
    with pytest.raises(ArtifactError, match=match) as e:
        load_manifest(out)
    assert "\n" not in str(e.value)


def test_pinned_manifest(tmp_path, monkeypatch):
    out, written = _write(tmp_path)
    pin = manifest_sha256(out)
    assert load_manifest(out, expect_sha256=pin) == written
    assert load_manifest(out, expect_sha256=pin.upper()) == written
    with pytest.raises(ArtifactError, match="does not match the pinned .*not the export you reviewed"):
        load_manifest(out, expect_sha256="0" * 64)
    # Policy: folders of engines that hold executable code need a pin; ONNX graphs are data.
    monkeypatch.setenv(PIN_ENV, "1")
    load_manifest(out)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["engine"] = "aoti"
    _consistent(out, json.dumps(raw))
    with pytest.raises(ArtifactError, match="executable code and HITA_REQUIRE_PINNED is set"):
        load_manifest(out)
    assert load_manifest(out, expect_sha256=manifest_sha256(out)).engine == "aoti"


def test_web_app_folder_with_a_manifest_json_is_never_replaced(tmp_path):
    app = tmp_path / "site"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my web app"}')
    (app / "index.html").write_text("<html>precious</html>")
    with pytest.raises(ArtifactError, match="refusing to replace"):
        _write(tmp_path, name="site")
    assert (app / "index.html").read_text() == "<html>precious</html>"
    assert sorted(p.name for p in app.iterdir()) == ["index.html", "manifest.json"]


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out, _ = _write(tmp_path)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}


def test_leftovers_of_dead_writers_are_cleaned(tmp_path):
    # A writer killed mid-export leaves hidden siblings named with its pid; the next write removes them.
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for kind in ("work", "tmp", "old"):
        (tmp_path / f".art.{kind}-{dead}-abc123").mkdir()
    (tmp_path / ".art.tmp-1-keepme").mkdir()  # pid 1 is alive: never touched
    _write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".art.tmp-1-keepme"]
