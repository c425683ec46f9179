"""HitaGPT: checkpoint layout (spec 4.2 / 4.9), positions (spec 4.4), KV-cache vs teacher forcing
(spec 4.7 / 8.1), q/k zeroed at position Nh (spec 8.2), bf16 and export-friendliness of decode."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hita.config import GPTConfig
from hita.models.gpt import HitaGPT, rope_table_2d

# Spec 4.2: (n_layer, dim, FFN hidden, total params), typed from the table, not derived.
SPEC_SIZES = {
    "GPT-B": (12, 768, 2048, 136_152_576),
    "GPT-L": (24, 1024, 2816, 376_596_480),
    "GPT-XL": (36, 1280, 3584, 816_806_400),
    "GPT-XXL": (48, 1536, 4096, 1_461_500_928),
    "GPT-2B": (48, 1920, 5120, 2_251_549_440),
}


def expected_shapes(n_layer, dim, hidden, vocab=16384, classes=1000, nh=128):
    """The spec 4.9 key table, with the per-size numbers substituted."""
    shapes = {
        "cls_embedding.embedding_table.weight": (classes + 1, dim),
        "tok_embeddings.weight": (vocab, dim),
        "slot_embeddings.weight": (vocab, dim),
    }
    for i in range(n_layer):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (3 * dim, dim)
        shapes[p + "attention.wo.weight"] = (dim, dim)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (2 * vocab, dim)
    shapes["slot_pos.weight"] = (nh, dim)
    return shapes


def randomise(model: HitaGPT, std: float = 0.05, seed: int = 0) -> HitaGPT:
    """Random nonzero weights everywhere (output.weight is zero-initialised); norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def random_tokens(cfg: GPTConfig, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    hol = torch.randint(0, cfg.vocab_size, (batch, cfg.n_holistic), generator=g)
    patch = torch.randint(0, cfg.vocab_size, (batch, cfg.n_patch), generator=g)
    return cls, hol, patch


def cached_logits(model: HitaGPT, cls, hol, patch, pos128: str, inplace: bool):
    """Prefill + one decode per token, driven by hand so that inplace=False is covered too."""
    k, v = model.new_caches(cls.shape[0])
    first, k, v = model.prefill(cls, k, v, inplace=inplace)
    fed = torch.cat([hol, patch[:, :-1]], dim=1)
    outs = [first]
    for p in range(1, fed.shape[1] + 1):
        pos = torch.tensor([p])
        out, k, v = model.decode(fed[:, p - 1], pos, k, v, pos128=pos128, inplace=inplace)
        outs.append(out)
    logits = torch.stack(outs, dim=1)
    return logits[:, : model.cfg.n_holistic], logits[:, model.cfg.n_holistic :]


@pytest.fixture(scope="module")
def small_full_layout():
    """Tiny width, released layout (128 holistic + 21x21 patch), random weights, eval, fp32."""
    cfg = dataclasses.replace(
        GPTConfig.from_name("GPT-B"), name="t", dim=64, n_layer=2, n_head=2, vocab_size=64
    )
    model = randomise(HitaGPT(cfg)).eval().requires_grad_(False)
    return model, random_tokens(cfg, batch=2)


@pytest.fixture(scope="module")
def tiny():
    return randomise(HitaGPT(GPTConfig.from_name("tiny"))).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Layout, parameter counts, init, RoPE table
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPEC_SIZES))
def test_state_dict_matches_spec_table(name):
    n_layer, dim, hidden, total = SPEC_SIZES[name]
    with torch.device("meta"):
        model = HitaGPT(GPTConfig.from_name(name))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(n_layer, dim, hidden)
    assert list(got) == list(expected_shapes(n_layer, dim, hidden))  # spec key order too
    assert sum(p.numel() for p in model.parameters()) == total
    if name == "GPT-B":
        assert len(got) == 90


def test_tiny_state_dict_and_no_persistent_buffers():
    cfg = GPTConfig.from_name("tiny")
    model = HitaGPT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(
        cfg.n_layer, cfg.dim, cfg.ffn_hidden, cfg.vocab_size, cfg.num_classes, cfg.n_holistic
    )
    assert set(got) == {n for n, _ in model.named_parameters()}  # freqs_cis is not saved
    assert model.freqs_cis.shape == (cfg.n_patch + 1, cfg.head_dim // 2, 2)


def test_init_output_zero_rest_normal():
    model = HitaGPT(GPTConfig.from_name("tiny"))
    assert torch.count_nonzero(model.output.weight) == 0
    weights = (model.tok_embeddings.weight, model.layers[0].attention.wqkv.weight)
    for w in (*weights, model.slot_pos.weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_rope_table_2d_layout():
    grid, hd = 21, 60  # GPT-2B's head_dim: 15 frequencies per axis
    table = rope_table_2d(grid, hd, 10000.0)
    assert table.shape == (grid * grid + 1, hd // 2, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    k = torch.arange(hd // 4, dtype=torch.float64)
    theta = 10000.0 ** (-2 * k / (hd // 2))
    r, c = 5, 13
    ang = torch.cat([r * theta, c * theta])
    row = table[1 + r * grid + c].double()
    torch.testing.assert_close(row, torch.stack([ang.cos(), ang.sin()], -1), atol=1e-5, rtol=0)


def test_rope_table_survives_dtype_casts_and_meta_build():
    cfg = GPTConfig.from_name("tiny")
    ref = HitaGPT(cfg).freqs_cis
    bf16 = HitaGPT(cfg).to(torch.bfloat16)
    assert bf16.freqs_cis.dtype == torch.float32 and torch.equal(bf16.freqs_cis, ref)
    with torch.device("meta"):
        lazy = HitaGPT(cfg)
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.freqs_cis, ref)


def test_pos128_is_validated(tiny):
    k, v = tiny.new_caches(1)
    with pytest.raises(ValueError, match="reference.*consistent"):
        tiny.decode(torch.tensor([1]), torch.tensor([1]), k, v, pos128="slot")


# ----------------------------------------------------------------------------------------------
# KV cache vs teacher forcing (spec 4.7, 8.1)
# ----------------------------------------------------------------------------------------------


def test_cache_matches_teacher_forcing_consistent(small_full_layout):
    model, (cls, hol, patch) = small_full_layout
    ref_h, ref_p = model.teacher_forced_logits(cls, hol, patch, use_cache=False)
    assert ref_h.shape == (2, 128, 64) and ref_p.shape == (2, 441, 64)
    got_h, got_p = model.teacher_forced_logits(cls, hol, patch, use_cache=True, pos128="consistent")
    assert (got_h - ref_h).abs().max() <= 1e-5
    assert (got_p - ref_p).abs().max() <= 1e-5
    oop_h, oop_p = cached_logits(model, cls, hol, patch, "consistent", inplace=False)
    assert torch.equal(oop_h, got_h) and torch.equal(oop_p, got_p)


def test_cache_reference_diverges_from_position_nh(small_full_layout):
    model, (cls, hol, patch) = small_full_layout
    ref_h, ref_p = model.teacher_forced_logits(cls, hol, patch, use_cache=False)
    got_h, got_p = model.teacher_forced_logits(cls, hol, patch, use_cache=True, pos128="reference")
    assert (got_h - ref_h).abs().max() <= 1e-5  # outputs before position Nh agree
    per_pos = (got_p - ref_p).abs().amax(dim=(0, 2))  # (Np,): output at position Nh onward
    assert per_pos.min() > 1e-3, per_pos.min()
    oop_h, oop_p = cached_logits(model, cls, hol, patch, "reference", inplace=False)
    assert torch.equal(oop_h, got_h) and torch.equal(oop_p, got_p)


def test_teacher_forced_restores_train_mode(tiny):
    cls, hol, patch = random_tokens(tiny.cfg, batch=1)
    tiny.train()
    try:
        a = tiny.teacher_forced_logits(cls, hol, patch)
        b = tiny.teacher_forced_logits(cls, hol, patch)
        assert tiny.training and torch.equal(a[0], b[0])  # no dropout inside
    finally:
        tiny.eval()


# ----------------------------------------------------------------------------------------------
# Position Nh: q and k are exactly zero (spec 8.2)
# ----------------------------------------------------------------------------------------------


def _spy_projections(model, monkeypatch):
    seen = []
    for layer in model.layers:
        orig = layer.attention.project

        def spy(x, pe, _orig=orig):
            q, k, v = _orig(x, pe)
            seen.append((q, k))
            return q, k, v

        monkeypatch.setattr(layer.attention, "project", spy)
    return seen


def test_qk_zero_at_position_nh_training(tiny, monkeypatch):
    nh = tiny.cfg.n_holistic
    seen = _spy_projections(tiny, monkeypatch)
    tiny.forward_train(*random_tokens(tiny.cfg, batch=2))
    assert len(seen) == tiny.cfg.n_layer
    for q, k in seen:  # (B, H, T, hd)
        assert torch.count_nonzero(q[:, :, nh]) == 0 and torch.count_nonzero(k[:, :, nh]) == 0
        assert q[:, :, nh - 1].abs().min() > 0 and k[:, :, nh + 1].abs().max() > 0


@pytest.mark.parametrize("pos128", ["reference", "consistent"])
def test_qk_zero_at_position_nh_decode(tiny, monkeypatch, pos128):
    nh = tiny.cfg.n_holistic
    k, v = tiny.new_caches(2)
    seen = _spy_projections(tiny, monkeypatch)
    _, k, v = tiny.decode(torch.tensor([3, 7]), torch.tensor([nh]), k, v, pos128=pos128)
    for q_, k_ in seen:  # (B, H, 1, hd)
        assert torch.count_nonzero(q_) == 0 and torch.count_nonzero(k_) == 0
    assert all(torch.count_nonzero(kc) == 0 for kc in k)  # written k at index Nh is zero too
    assert all(torch.count_nonzero(vc[:, :, nh]) > 0 for vc in v)


# ----------------------------------------------------------------------------------------------
# dtypes and export-friendliness
# ----------------------------------------------------------------------------------------------


def test_bf16_decode_returns_bf16_logits():
    model = randomise(HitaGPT(GPTConfig.from_name("tiny"))).eval().to(torch.bfloat16)
    k, v = model.new_caches(2)
    assert k[0].dtype == torch.bfloat16
    with torch.no_grad():
        logits, k, v = model.prefill(torch.tensor([1, 10]), k, v)
        assert logits.dtype == torch.bfloat16 and logits.shape == (2, 512)
        for p in (1, 16, 17, 40):
            logits, k, v = model.decode(torch.tensor([5, 6]), torch.tensor([p]), k, v)
            assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_decode_exports_with_dynamic_batch():
    """One exported graph serves every position and batch size (no data-dependent Python)."""
    cfg = dataclasses.replace(GPTConfig.from_name("tiny"), name="t1", n_layer=1)
    model = randomise(HitaGPT(cfg)).eval().requires_grad_(False)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = model

        def forward(self, tokens, pos, k, v):
            return self.gpt.decode(tokens, pos, k, v, pos128="reference")

    batch = torch.export.Dim("batch", min=1, max=64)
    k, v = model.new_caches(2)
    ep = torch.export.export(
        Decode(), (torch.tensor([1, 2]), torch.tensor([3]), k, v),
        dynamic_shapes=({0: batch}, None, [{0: batch}], [{0: batch}]),
    )
    k3, v3 = model.new_caches(3)
    k3 = [torch.randn_like(t) for t in k3]
    toks = torch.tensor([4, 5, 6])
    for p in (1, 15, 16, 17, 60):
        pos = torch.tensor([p])
        got, want = ep.module()(toks, pos, k3, v3), model.decode(toks, pos, k3, v3)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1][0], want[1][0], atol=0, rtol=0)
