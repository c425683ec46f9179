"""Output folders: hita claims a folder only when it is new, empty or its own, and never a user's."""
from __future__ import annotations

import threading

import pytest

from hita.util.files import RUN_MARKER, check_claimable, claim_folder, folder_kind


def test_a_folder_with_a_user_file_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files hita did not write \(e.g. 'notes.txt'\)"):
        claim_folder(tmp_path, "train")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / RUN_MARKER).exists()


def test_another_jobs_folder_is_refused(tmp_path):
    claim_folder(tmp_path / "run", "evaluate")
    (tmp_path / "run" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="holds files hita did not write"):
        check_claimable(tmp_path / "run", "train")


def test_processes_claiming_one_folder_at_once_all_succeed(tmp_path):
    """DDP ranks claim the run folder together: one rank's marker, mid-write, is not a foreign
    file to the others (a race CI found)."""
    folder = tmp_path / "run"
    (folder).mkdir()
    (folder / f".{RUN_MARKER}.abc123_x.tmp").write_text("{}")  # another rank's atomic_write in flight
    assert check_claimable(folder, "train") == folder
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            for _ in range(50):
                claim_folder(folder, "train")
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and folder_kind(folder) == "train"
    other = tmp_path / "other"
    other.mkdir()
    (other / ".notes.txt.tmp").write_text("")   # other temporaries are not ours
    with pytest.raises(ValueError, match=r"\(e.g. '.notes.txt.tmp'\)"):
        check_claimable(other, "train")
