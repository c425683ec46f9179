"""EMA, atomic checkpoint folders and RNG capture."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from hita.train.common import TrainError
from hita.train.ema import EMA
from hita.train.train_state import (
    UnreadableCheckpoint,
    capture_rng,
    first_readable,
    latest_checkpoint,
    list_checkpoints,
    restore_rng,
    write_checkpoint,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.register_buffer("log", torch.zeros(3))


def test_ema_averages_trainable_params_and_copies_the_rest():
    net = _Net()
    ema = EMA(net, decay=0.9)
    w0 = net.lin.weight.detach().clone()
    with torch.no_grad():
        net.lin.weight.add_(1.0)
        net.log.fill_(7.0)
    ema.update(net)
    sd = ema.state_dict()
    assert torch.allclose(sd["lin.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.equal(sd["log"], net.log) and torch.equal(sd["frozen.weight"], net.frozen.weight)
    assert set(sd) == set(net.state_dict())


def test_ema_warmup_decay():
    ema = EMA(_Net(), decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match="EMA decay"):
        EMA(_Net(), decay=1.0)


def test_checkpoint_folders_are_atomic(tmp_path):
    def ok(folder):
        (folder / "train_state.pt").write_bytes(b"x")

    def broken(folder):
        (folder / "train_state.pt").write_bytes(b"x")
        raise KeyboardInterrupt  # interrupted half-way

    write_checkpoint(tmp_path, 5, ok)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 10, broken)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]  # no half checkpoint, no temp folder left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    write_checkpoint(tmp_path, 10, ok)
    write_checkpoint(tmp_path, 15, ok, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    assert latest_checkpoint(tmp_path).name == "step_00000015"
    write_checkpoint(tmp_path, 15, ok)  # rewriting a step replaces it
    assert latest_checkpoint(tmp_path).name == "step_00000015"


def test_rng_roundtrip(tmp_path):
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_keep_last_never_drops_the_checkpoint_just_written(tmp_path):
    # A run resumed from step 5 past a damaged step_00000010: saving step 6 with keep_last=1 must keep
    # step 6 (the newer, damaged folder is not "the last one").
    def ok(folder):
        (folder / "train_state.pt").write_bytes(b"x")

    for step in (5, 10):
        write_checkpoint(tmp_path, step, ok)
    write_checkpoint(tmp_path, 6, ok, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 10]


def test_first_readable_falls_back_to_older_checkpoints(tmp_path):
    def ok(folder):
        (folder / "train_state.pt").write_bytes(b"x")

    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, ok)
    damaged = {"step_00000003", "step_00000002"}

    def read(folder):
        if folder.name in damaged:
            raise UnreadableCheckpoint(f"{folder}/model.safetensors: unreadable weights (truncated); resume from ...")
        return folder.name

    warnings = []
    folder, got = first_readable(latest_checkpoint(tmp_path), read, warnings.append)
    assert folder.name == got == "step_00000001"
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "step_00000003, step_00000002 cannot be read" in warnings[0] and "resuming from step_00000001" in warnings[0]
    damaged.add("step_00000001")
    with pytest.raises(UnreadableCheckpoint, match=r"none of the 3 checkpoints can be read .*new --run-dir"):
        first_readable(latest_checkpoint(tmp_path), read, warnings.append)


# -- resume past damaged checkpoint files, on a real (tiny) GPT run ------------------------------


@pytest.fixture(scope="module")
def synthetic_codes(tmp_path_factory):
    """A codes file for the `tiny` presets with random ids (no dataset needed: only file handling is tested)."""
    from safetensors.torch import save_file

    from hita.config import TokenizerConfig
    from hita.train.codes import CODES_KIND

    cfg = TokenizerConfig.from_name("tiny")
    g = torch.Generator().manual_seed(0)
    n = 16
    tensors = {
        "holistic_ids": torch.randint(0, cfg.codebook_size, (n, 1, cfg.n_holistic), generator=g, dtype=torch.int16),
        "patch_ids": torch.randint(0, cfg.codebook_size, (n, 1, cfg.n_patch), generator=g, dtype=torch.int16),
        "labels": torch.randint(0, 10, (n,), generator=g),
    }
    meta = {"hita_kind": CODES_KIND, "hita_tokenizer_config": cfg.to_json(), "num_classes": "10",
            "views": "identity", "source": "synthetic codes"}
    path = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _gpt_run(run_dir, codes, steps, **kw):
    from hita.train.gpt_trainer import gpt_train_config, train_gpt

    cfg = gpt_train_config("tiny", str(run_dir), codes=str(codes), steps=steps, batch_size=4, lr=1e-3,
                           warmup_steps=0, log_every=1, ckpt_every=1, ema_decay=0.9, progress=False, workers=0,
                           threads=1, **kw)
    return train_gpt(cfg)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "ema.safetensors", "train_state.pt"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, synthetic_codes, damaged, capsys):
    from safetensors.torch import load_file

    from hita.train.progress import read_log

    run = tmp_path / "run"
    _gpt_run(run, synthetic_codes, steps=2)
    step2 = run / "checkpoints" / "step_00000002"
    # Cloned: load_file may map the file, whose bytes the truncation below changes.
    original = {n: {k: v.clone() for k, v in load_file(str(step2 / n)).items()}
                for n in ("model.safetensors", "ema.safetensors")}
    _truncate(step2 / damaged)
    capsys.readouterr()
    _gpt_run(run, synthetic_codes, steps=2, resume=True, keep_last=1)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "cannot be read" in line]
    assert len(warning) == 1 and "Traceback" not in err, err
    assert damaged in warning[0] and "resuming from step_00000001" in warning[0], warning[0]
    start = [e for e in read_log(run) if e.get("event") == "start"][-1]
    assert start["resumed_from"].endswith("step_00000001") and start["step"] == 1
    # Step 2 was trained again from step 1 and replaces the damaged folder, bit for bit as before.
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000002"]
    for name, sd in original.items():
        again = load_file(str(step2 / name))
        assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd), name


def test_resume_with_no_readable_checkpoint_is_one_line(tmp_path, synthetic_codes):
    run = tmp_path / "run"
    _gpt_run(run, synthetic_codes, steps=2)
    _truncate(run / "checkpoints" / "step_00000002" / "model.safetensors")
    (run / "checkpoints" / "step_00000001" / "ema.safetensors").write_bytes(b"")
    with pytest.raises(TrainError) as e:
        _gpt_run(run, synthetic_codes, steps=3, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "none of the 2 checkpoints can be read" in msg and "model.safetensors" in msg, msg
