"""The shipped Fashion-MNIST classifier: loads strictly, is as accurate as its metadata says."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hita.eval.classifier import (ClassifierConfig, ClassifierError, FashionClassifier, load_classifier, read_metadata,
                                  save_classifier, shipped_classifier, to_classifier_input)


def test_shipped_classifier_is_at_least_90_percent_accurate_on_the_test_set(fashion_root, monkeypatch):
    from hita.data import open_dataset
    from hita.eval.train_classifier import accuracy, images_to_tensor

    meta = read_metadata(shipped_classifier())
    assert float(meta["hita_test_accuracy"]) >= 0.90 and json.loads(meta["hita_recipe"])["epochs"] > 0
    monkeypatch.setenv("HITA_FASHION_MNIST", str(fashion_root))
    ds = open_dataset("fashion-mnist", split="test", limit=2000)
    model = load_classifier(shipped_classifier())
    acc, per = accuracy(model, images_to_tensor(ds.images, 32), torch.from_numpy(ds.labels))
    assert acc >= 0.88  # 2,000 of the 10,000 test images: within 2 points of the full-set figure


def test_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    m = FashionClassifier(ClassifierConfig(widths=(4, 4, 8), feature_dim=8)).eval()
    save_classifier(m, tmp_path / "c.safetensors", {"hita_test_accuracy": "0.5"})
    back = load_classifier(tmp_path / "c.safetensors")
    x = to_classifier_input(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)), 32)
    assert x.shape == (3, 1, 32, 32)
    assert torch.equal(m(x), back(x))
    with pytest.raises(ClassifierError, match="no such classifier file"):
        load_classifier(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ClassifierError, match="not a readable safetensors file"):
        load_classifier(tmp_path / "junk.safetensors")
