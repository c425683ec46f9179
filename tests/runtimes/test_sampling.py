"""Sampling: noise golden values (the C++ host must reproduce these bit for bit), CFG, filters,
inverse-CDF draws and option validation."""
from __future__ import annotations

import math

import pytest
import torch

from hita.runtimes.sampling import (
    NoiseStream,
    SamplingOptions,
    apply_cfg,
    filter_logits,
    mix64,
    noise_bits,
    sample,
)

M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15

# (seed, step, row) -> (64-bit hash, uniform). Also checked against a 10-line C implementation of the
# NoiseStream docstring when written; a port must print exactly these doubles (%.17g).
GOLDEN = [
    ((0, 0, 0), 0x1E35CDB4BF4F6F16, 0.11800847685600291),
    ((0, 0, 1), 0x8D0312E892F28CFB, 0.5508281534011507),
    ((0, 1, 0), 0xDF1FEE48C3407A10, 0.8715809753077809),
    ((1, 0, 0), 0xDA0909B7E1251B72, 0.8517004083561414),
    ((42, 568, 3), 0x9E7E60D7554B84A5, 0.6191158796039371),
    ((M64, M64, M64), 0x5E923DC280790B9A, 0.3694189643724465),
    ((123456789, 127, 1000), 0xFC605C51F7A762DC, 0.9858453464618413),
]


def _reference_bits(seed: int, step: int, row: int) -> int:
    """Independent restatement of the docstring algorithm with python ints."""

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    h = mix((seed + G) % 2**64)
    h = mix(h ^ ((step + 2 * G) % 2**64))
    return mix(h ^ ((row + 3 * G) % 2**64))


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------


def test_mix64_matches_public_splitmix64_outputs():
    # splitmix64 seeded with 0: first two outputs are mix64(G) and mix64(2G) (public test vector).
    assert mix64(G) == 0xE220A8397B1DCDAF
    assert mix64((2 * G) & M64) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("key,bits,u", GOLDEN)
def test_noise_golden_values(key, bits, u):
    seed, step, row = key
    assert noise_bits(seed, step, row) == bits
    assert _reference_bits(seed, step, row) == bits
    got = NoiseStream(seed).uniform(step, 1, row_offset=row)
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert got.item() == u  # bit-exact
    assert u == (bits >> 11) * 2.0**-53


def test_noise_vectorised_rows_and_offsets():
    ns = NoiseStream(7)
    full = ns.uniform(5, 6)                                  # rows 0..5
    assert full.tolist() == [(noise_bits(7, 5, r) >> 11) * 2.0**-53 for r in range(6)]
    assert torch.equal(ns.uniform(5, 3, row_offset=2), full[2:5])  # global row keying
    assert torch.equal(NoiseStream(7).uniform(5, 6), full)   # stateless
    assert not torch.equal(ns.uniform(6, 6), full)           # steps differ
    assert not torch.equal(NoiseStream(8).uniform(5, 6), full)
    assert ((full >= 0) & (full < 1)).all()
    assert ns.uniform(0, 0).shape == (0,)


def test_noise_is_roughly_uniform():
    u = torch.cat([NoiseStream(3).uniform(t, 64) for t in range(64)])  # 4096 values
    assert abs(u.mean().item() - 0.5) < 0.02
    hist = torch.histc(u.float(), bins=8, min=0, max=1)
    assert hist.min() > 400 and hist.max() < 620


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_noise_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        NoiseStream(bad)


def test_noise_rejects_bad_step():
    with pytest.raises(ValueError, match="step"):
        NoiseStream(0).uniform(-1, 2)


# ----------------------------------------------------------------------------------------------
# CFG and filters
# ----------------------------------------------------------------------------------------------


def test_apply_cfg_formula_and_row_order():
    cond = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    uncond = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    out = apply_cfg(torch.cat([cond, uncond]), 1.5)
    assert torch.equal(out, uncond + 1.5 * (cond - uncond))
    assert torch.equal(apply_cfg(torch.cat([cond, uncond]), 1.0), cond)
    with pytest.raises(ValueError, match="2n"):
        apply_cfg(torch.zeros(3, 4), 2.0)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    kept = torch.isfinite(out)
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(out[kept], logits[kept])
    assert torch.isfinite(filter_logits(logits, top_k=100)).all()   # k > V keeps all
    assert torch.equal(filter_logits(logits, top_k=0), logits)      # off


def test_top_k_keeps_ties_at_boundary():
    out = filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]
    out = filter_logits(torch.tensor([[1.0, 2.0, 1.0, 0.0]]), top_k=2)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = probs.log()
    # sorted: 0.5 (id 1), 0.25 (id 2), 0.15 (id 3), 0.1 (id 0); cumulative .5 .75 .9 1.
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_top_p_always_keeps_one_token():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = filter_logits(logits, top_p=1e-6)
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 1]
    assert torch.isfinite(out[0, 0]) and torch.isfinite(out[1, 0])  # stable: lowest id among ties


def test_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, top_k=3, top_p=0.99)
    # top-k keeps 3; top-p renormalises over those 3 and removes none of the first two.
    assert torch.isfinite(out).tolist() == [[True, True, True, False, False]]
    assert torch.equal(logits, torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]))  # not modified


# ----------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------


def _opts(**kw):
    return SamplingOptions(cfg_scale=1.0, **kw)


def test_inverse_cdf_picks_expected_index():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(7, 4)
    u = torch.tensor([0.0, 0.05, 0.1 - 1e-6, 0.1 + 1e-6, 0.35, 0.61, 1 - 2**-53], dtype=torch.float64)
    assert sample(logits, _opts(), u).tolist() == [0, 0, 0, 1, 2, 3, 3]


def test_inverse_cdf_skips_zero_probability_tokens():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]]).expand(3, 5)
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    assert sample(logits, _opts(), u).tolist() == [1, 3, 3]


def test_temperature_sharpens_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 2.0, 1.0]])
    u = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert sample(logits, _opts(temperature=0.0), u).tolist() == [1, 0]   # first maximum on ties
    assert sample(logits, _opts(temperature=1e-9), u).tolist() == [1, 1]  # clamp 1e-5, ties split
    assert sample(logits, _opts(temperature=1.0), torch.zeros(2, dtype=torch.float64)).tolist() == [0, 0]


def test_sample_respects_filters_and_casts_bf16():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.bfloat16)
    u = torch.tensor([1 - 2**-53], dtype=torch.float64)
    assert sample(logits, _opts(top_k=2), u).tolist() == [1]
    assert sample(logits, _opts(), u).tolist() == [3]


def test_sample_frequencies_follow_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.3])
    ns = NoiseStream(11)
    counts = torch.zeros(3)
    for t in range(40):
        toks = sample(probs.log().expand(100, 3), _opts(), ns.uniform(t, 100))
        counts += torch.bincount(toks, minlength=3)
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_sample_rejects_nan_logits():
    with pytest.raises(FloatingPointError, match="row 1"):
        sample(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), _opts(), torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def test_default_options_match_reference_driver():
    o = SamplingOptions()
    assert (o.cfg_scale, o.cfg_interval, o.temperature, o.top_k, o.top_p, o.seed) == (1.5, -1, 1.0, 0, 1.0, 0)
    assert o.use_cfg and o.cfg_active(-1) and o.cfg_active(10_000)
    assert not SamplingOptions(cfg_scale=1.0).use_cfg
    o = SamplingOptions(cfg_interval=2)
    assert [o.cfg_active(i) for i in (-1, 0, 1, 2, 3, 4)] == [True, True, True, True, False, False]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"cfg_scale": 0.5}, "cfg_scale 0.5 < 1"),
        ({"cfg_scale": math.nan}, "finite"),
        ({"cfg_interval": -2}, "cfg_interval"),
        ({"cfg_interval": 1.0}, "cfg_interval"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_options_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kw)


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        SamplingOptions().seed = 3  # type: ignore[misc]
