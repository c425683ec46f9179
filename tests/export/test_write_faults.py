"""Artifacts folders under faults: killed writers, concurrent writers, full and read-only disks.

Each case checks what is on disk afterwards: ``--out`` holds a complete, verifying folder (the old
export or the new one, never a mix, never nothing), and nothing half-written stays behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hita.export.manifest import ArtifactError, load_manifest, write_artifacts

from test_manifest import _manifest, _write  # noqa: E402 - pytest puts this folder on sys.path

# A child that re-exports a folder with large files (so a kill lands mid-write), forever.
_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_manifest import _manifest
    from hita.export.manifest import write_artifacts

    out, work, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    i = 0
    while True:
        files = {{}}
        for f in ("decoder.onnx", "prefill.onnx", "decode_step.onnx"):
            p = work / f"{{tag}}-{{i}}-{{f}}"
            p.write_bytes(f.encode() * (4 << 20 // len(f)) + tag.encode())
            files[f] = p
        write_artifacts(out, files, _manifest())
        print("wrote", i, flush=True)
        i += 1
    """
)


def _spawn_writer(out: Path, work: Path, tag: str) -> subprocess.Popen:
    script = _WRITER.format(tests=str(Path(__file__).resolve().parent))
    return subprocess.Popen([sys.executable, "-c", script, str(out), str(work), tag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_a_killed_writer_leaves_the_old_or_the_new_folder(tmp_path, delay):
    out, old = _write(tmp_path, payload=b"old")
    work = tmp_path / "work"
    work.mkdir()
    child = _spawn_writer(out, work, "new")
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    m = load_manifest(out)                       # never missing, never mixed: it verifies
    assert m.files.keys() == old.files.keys()
    # The next write cleans the dead writer's hidden leftovers.
    _write(tmp_path, payload=b"again")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_concurrent_writers_never_leave_a_broken_folder(tmp_path):
    out, _ = _write(tmp_path, payload=b"old")
    children = []
    for tag in ("a", "b"):
        (tmp_path / tag).mkdir()
        children.append(_spawn_writer(out, tmp_path / tag, tag))
    deadline = time.time() + 6
    checks = 0
    while time.time() < deadline:
        load_manifest(out)        # a reader during the race always sees one whole, verifying folder
        checks += 1
        time.sleep(0.02)
    for c in children:
        c.send_signal(signal.SIGKILL)
        c.wait()
    assert checks > 10
    assert all("Traceback" not in c.stderr.read() for c in children)
    load_manifest(out)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "size=256k"):
        pytest.skip("mounting a small tmpfs needs root and mount rights in this sandbox")
    yield disk
    _umount(disk)


def test_full_disk_is_one_line_and_leaves_the_old_folder(small_disk, tmp_path):
    small = {}
    for f in ("decoder.onnx", "prefill.onnx", "decode_step.onnx"):
        p = tmp_path / f"small-{f}"
        p.write_bytes(b"x" * 1000)
        small[f] = p
    out = small_disk / "art"
    old = write_artifacts(out, small, _manifest())
    big = {}
    for f in ("decoder.onnx", "prefill.onnx", "decode_step.onnx"):
        p = tmp_path / f"big-{f}"
        p.write_bytes(b"y" * (200 << 10))      # 600 KiB in all: does not fit in 256 KiB
        big[f] = p
    with pytest.raises(ArtifactError, match=r"cannot write the artifacts \(No space left on device\)") as e:
        write_artifacts(out, big, _manifest())
    assert "\n" not in str(e.value)
    assert load_manifest(out) == old
    assert sorted(p.name for p in small_disk.iterdir()) == ["art"]    # no hidden leftovers


def test_read_only_disk_is_one_line(tmp_path):
    disk = tmp_path / "ro"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "size=64k,ro"):
        pytest.skip("mounting a read-only tmpfs needs root and mount rights in this sandbox")
    try:
        src = tmp_path / "f"
        src.write_bytes(b"x")
        with pytest.raises(ArtifactError, match="cannot write the artifacts") as e:
            write_artifacts(disk / "art", {"decoder.onnx": src, "prefill.onnx": src, "decode_step.onnx": src},
                            _manifest())
        assert "\n" not in str(e.value)
        assert list(disk.iterdir()) == []
    finally:
        _umount(disk)
