"""`extract-codes` files: layout, flip view, and errors for files of another kind."""
from __future__ import annotations

import pytest
import torch

from hita.checkpoint import load_tokenizer
from hita.data import Augmented, DataError, open_dataset
from hita.train.codes import CodesView, load_codes


def test_codes_file_matches_the_tokenizer(tiny_codes, tiny_tokenizer, fashion):
    codes = load_codes(tiny_codes)
    tok = load_tokenizer(tiny_tokenizer)
    assert codes.tokenizer_config == tok.cfg and codes.num_classes == 10 and codes.views == ("identity", "hflip")
    assert codes.holistic_ids.shape == (32, 2, 16) and codes.patch_ids.shape == (32, 2, 64)
    assert codes.holistic_ids.dtype == torch.int16
    ds = open_dataset(fashion, limit=3)
    x = torch.stack([Augmented(ds, 32, "resize")[(i, 0)][0] for i in range(3)])
    with torch.no_grad():
        h, p = tok.encode(x.flip(-1))
    assert torch.equal(codes.holistic_ids[:3, 1].long(), h) and torch.equal(codes.patch_ids[:3, 1].long(), p)
    assert torch.equal(codes.labels[:3], torch.as_tensor(ds.labels[:3]))
    hol, patch, label = CodesView(codes)[(2, 7)]
    assert hol.dtype == torch.int64 and patch.shape == (64,) and label == int(ds.labels[2])


def test_load_codes_rejects_other_files(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="not a codes file"):
        load_codes(tiny_tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_codes(tmp_path / "none.safetensors")
