"""The FID Inception: architecture of the 2015 TF graph, strict local loading, clear refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hita.eval.inception import WEIGHTS_NAME, FIDInception, InceptionFeatures, load_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(FIDInception().state_dict(), path)
    return path


def test_architecture_matches_the_fid_network():
    m = FIDInception()
    # torchvision's Inception-v3 without the auxiliary head has 23,834,568 parameters with 1000 classes;
    # the FID graph's 1008-way classifier adds 8 * 2049.
    assert sum(p.numel() for p in m.parameters()) == 23_834_568 + 8 * 2049
    assert m.fc.weight.shape == (1008, 2048)
    assert m.Mixed_7c.max_pool and not m.Mixed_7b.max_pool


def test_features_and_logits_from_a_local_file(weights):
    ex = InceptionFeatures.from_file(weights)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a, b = ex(images), ex(images[:1])
    assert a.features.shape == (2, 2048) and a.logits.shape == (2, 1008)
    np.testing.assert_allclose(a.features[:1], b.features, rtol=1e-4, atol=1e-5)  # batch-independent


def test_older_files_without_batchnorm_counters_load(weights, tmp_path):
    sd = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    load_inception(tmp_path / "old.pth")


def test_missing_or_wrong_weights_name_the_file_needed(tmp_path):
    for bad in (None, tmp_path / "absent.pth"):
        with pytest.raises(ValueError, match=WEIGHTS_NAME):
            load_inception(bad)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not the FID Inception"):
        load_inception(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        load_inception(tmp_path / "junk.pth")
