"""Zero-shot editing: input policy, token plans, and the in-painting loop against plain generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hita.edit.images import EditError, cell_mask, load_image, load_mask
from hita.edit.tokens import mix_holistic, patch_regen_mask
from hita.jobs.edit import EditModels, inpaint, inpaint_tokens, style_transfer
from hita.runtimes.loop import generate_tokens
from hita.runtimes.sampling import SamplingOptions


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def test_images_are_resized_or_refused_with_the_fix(tmp_path):
    grey = _png(tmp_path / "g.png", np.full((28, 28), 200, np.uint8))
    img = load_image(grey, 32)
    assert img.pixels.shape == (32, 32, 3) and img.native == (28, 28) and "resized 28x28 -> 32x32" in img.note
    assert load_image(_png(tmp_path / "ok.png", np.zeros((32, 32, 3), np.uint8)), 32).note == ""
    opaque = np.full((32, 32, 4), 255, np.uint8)
    assert load_image(_png(tmp_path / "opaque.png", opaque), 32).pixels.shape == (32, 32, 3)
    cases = [
        (_png(tmp_path / "rect.png", np.zeros((30, 40, 3), np.uint8)), "is 40x30, not square.*crop it"),
        (_png(tmp_path / "alpha.png", np.zeros((32, 32, 4), np.uint8)), "transparent pixels.*flatten"),
        (_png(tmp_path / "deep.png", np.zeros((32, 32), np.uint16)), "mode I;16.*8-bit"),
        (tmp_path / "absent.png", "no such file"),
    ]
    (tmp_path / "text.png").write_text("not an image")
    cases.append((tmp_path / "text.png", "cannot be read as an image"))
    for path, message in cases:
        with pytest.raises(EditError, match=message):
            load_image(path, 32)


def test_masks_must_fit_the_image_and_mark_something(tmp_path):
    half = np.zeros((28, 28), np.uint8)
    half[14:] = 255
    cover = load_mask(_png(tmp_path / "m.png", half), (28, 28), 32)
    assert cover.shape == (32, 32) and cover[:15].max() == 0 and cover[17:].min() == 1.0
    cells = cell_mask(cover, 8)
    assert cells[:3].sum() == 0 and cells[4:].all()
    with pytest.raises(EditError, match="is 16x16 but the image is 28x28; draw the mask at the image's size"):
        load_mask(_png(tmp_path / "small.png", np.zeros((16, 16), np.uint8)), (28, 28), 32)
    with pytest.raises(EditError, match="is empty .* nothing to in-paint"):
        load_mask(_png(tmp_path / "empty.png", np.zeros((28, 28), np.uint8)), (28, 28), 32)


def test_token_plans():
    content, style = torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)
    assert mix_holistic(content, style).eq(1).all()
    assert mix_holistic(content, style, [0, 5]).nonzero()[:, 1].tolist() == [0, 5]
    with pytest.raises(ValueError, match="out of range"):
        mix_holistic(content, style, [16])
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[2, 3] = True  # cell 19: the encoder's token 19, and token 15 whose output is read at cell 19
    assert patch_regen_mask(cells, 4).nonzero().flatten().tolist() == [15, 19]
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[0, 1] = True  # cells 0..3 are read from holistic positions: only the encoder's token
    assert patch_regen_mask(cells, 4).nonzero().flatten().tolist() == [1]


def test_inpainting_everything_is_plain_generation(tiny_torch_executor):
    """With every position regenerated, the in-painting loop draws exactly the tokens the decode loop
    draws for the same class and seed (same noise rows), so the two loops cannot drift apart."""
    ex = tiny_torch_executor
    cfg = ex.gpt_config
    opts = SamplingOptions(cfg_scale=2.0, seed=11, top_k=20)
    want = generate_tokens(ex, [3, 3], opts).tokens
    junk_h = torch.zeros(2, cfg.n_holistic, dtype=torch.long)
    junk_p = torch.zeros(2, cfg.n_patch, dtype=torch.long)
    got = inpaint_tokens(ex, junk_h, junk_p, torch.ones(cfg.seq_len, dtype=torch.bool), 3, opts)
    assert torch.equal(got, want)


def test_inpainting_keeps_known_tokens_and_pixels(tiny_torch_executor):
    from hita.export.testing import tiny_models

    models = EditModels(tiny_models(0)[1], tiny_torch_executor)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cover = np.zeros((32, 32), np.float32)
    cover[20:] = 1.0
    for holistic in ("encode", "sample"):
        res = inpaint(models, image, cover, None, SamplingOptions(cfg_scale=1.0, seed=0), samples=2, holistic=holistic)
        assert res["composite"].shape == (2, 32, 32, 3)
        assert np.array_equal(res["composite"][:, :20], np.broadcast_to(image[:20], (2, 20, 32, 3)))
        regen = res["regenerated_tokens"]
        # encode keeps the 16 holistic tokens, sample (the default) draws them all
        assert regen[:16].all() if holistic == "sample" else not regen[:16].any()
        assert regen[16:].sum() == 8 * 3 + 4  # rows 5..7 of the 8x8 grid, plus 4 shifted
    with pytest.raises(ValueError, match="needs --class"):
        inpaint(models, image, cover, None, SamplingOptions(cfg_scale=2.0), samples=1)


def test_style_transfer_mixes_tokens(tiny_torch_executor):
    from hita.export.testing import tiny_models

    tok = tiny_models(0)[1]
    models = EditModels(tok, tiny_torch_executor)
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    none = style_transfer(models, a, b, slots=[])
    assert np.array_equal(none["result"], none["content_recon"])  # no slot taken: the content's own tokens
    full = style_transfer(models, a, b)
    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1
    hol, patch = tok.encode(x)
    want = tiny_torch_executor.decode_image(hol[1:], patch[:1])
    from hita.runtimes.loop import to_uint8

    assert np.array_equal(full["result"], to_uint8(want)[0].numpy())


def test_onnxruntime_edits_like_eager(onnx_dir, tiny_torch_executor):
    from hita.export.testing import tiny_models
    from hita.runtimes.onnxrt import OrtExecutor

    tok = tiny_models(0)[1]
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cover = np.zeros((32, 32), np.float32)
    cover[:, 16:] = 1.0
    opts = SamplingOptions(cfg_scale=1.5, seed=5)
    eager = inpaint(EditModels(tok, tiny_torch_executor), image, cover, 2, opts, samples=2)
    ort = inpaint(EditModels(tok, OrtExecutor(onnx_dir)), image, cover, 2, opts, samples=2)
    assert np.abs(eager["raw"].astype(int) - ort["raw"].astype(int)).max() <= 1
