"""EMA, atomic checkpoint folders and RNG capture."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from hita.train.ema import EMA
from hita.train.train_state import capture_rng, latest_checkpoint, list_checkpoints, restore_rng, write_checkpoint


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
