"""Configs from files are bounded: every size a file can set is type- and range-checked, with one line."""
from __future__ import annotations

import json

import pytest
import torch

from hita.config import MAX_PARAMS, GPTConfig, TokenizerConfig


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("cls", [TokenizerConfig, GPTConfig])
def test_every_preset_constructs_and_round_trips(cls):
    assert cls.PRESETS
    for cfg in cls.PRESETS.values():
        assert cls.from_json(cfg.to_json()) == cfg
        assert cfg.param_estimate() < MAX_PARAMS


def test_param_estimate_matches_the_models():
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

    for cfg in GPTConfig.PRESETS.values():
        with torch.device("meta"):
            n = sum(v.numel() for v in HitaGPT(cfg).state_dict().values())
        assert cfg.param_estimate() == n, cfg.name
    for cfg in TokenizerConfig.PRESETS.values():
        with torch.device("meta"):
            sd = HitaTokenizer(cfg).state_dict()
        n = sum(v.numel() for k, v in sd.items() if "codebook_used" not in k)  # fixed-size usage logs
        assert abs(cfg.param_estimate() - n) <= 0.02 * n, (cfg.name, cfg.param_estimate(), n)


GPT_2B = GPTConfig.from_name("GPT-2B").to_dict()
HITA_V = TokenizerConfig.from_name("hita-v").to_dict()


@pytest.mark.parametrize("field, value, expect", [
    ("grid", 100000, "[1, 128]"),  # a 1.28 TB allocation for the RoPE table / embeddings
    ("num_classes", 100_000_000, "[1, 1000000]"),
    ("n_layer", 10**6, "[1, 256]"),
    ("vocab_size", 2**24, "[2, 1048576]"),
    ("dim", 1 << 20, "[1, 16384]"),
    ("n_head", 0, "[1, 256]"),
    ("n_holistic", -1, "[1, 4096]"),
    ("vocab_size", 0, "[2, 1048576]"),
    ("dim", "1920", "must be an integer"),
    ("dim", 1920.0, "must be an integer"),
    ("n_layer", True, "must be an integer"),
    ("grid", None, "must be an integer"),
    ("rope_base", "1e4", "must be a number"),
    ("norm_eps", float("nan"), "outside the allowed range"),
    ("class_dropout", 1.0, "[0.0, 1.0)"),
    ("token_dropout", -0.1, "[0.0, 1.0)"),
])
def test_gpt_config_fields_are_bounded(field, value, expect):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_2B, field: value})
    msg = _one_line(e)
    assert field in msg and expect in msg and repr(value)[:20] in msg, msg


@pytest.mark.parametrize("field, value, expect", [
    ("image_size", 100000, "[1, 4096]"),
    ("image_size", 4096, "256x256 token grid"),  # within its own range, but the grid is not
    ("image_size", 0, "[1, 4096]"),
    ("codebook_size", 2**30, "[2, 1048576]"),
    ("codebook_size", 1, "[2, 1048576]"),
    ("patch_code_dim", 10**6, "[1, 4096]"),
    ("depth", 10**6, "[1, 256]"),
    ("dim", -512, "[1, 16384]"),
    ("ch_mult", [1, 1, 2, 2, "4"], "list of 1 to 8 integers"),
    ("ch_mult", [1] * 20, "list of 1 to 8 integers"),
    ("ch_mult", [1, 1, 2, 2, 1000], "[1, 64]"),
    ("shift_k", 1.5, "must be an integer"),
    ("vfm_recon", "yes", "true or false"),
    ("backbone", 7, "printable string"),
    ("dropout", 2.0, "[0.0, 1.0)"),
])
def test_tokenizer_config_fields_are_bounded(field, value, expect):
    with pytest.raises(ValueError) as e:
        TokenizerConfig.from_dict({**HITA_V, field: value})
    msg = _one_line(e)
    assert field in msg and expect in msg, msg


def test_models_above_the_parameter_limit_are_refused():
    # Every field in range, but about 208e9 parameters.
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_2B, "dim": 8192, "n_layer": 256, "n_head": 64})
    msg = _one_line(e)
    assert "about 208e9 parameters" in msg and "20e9 limit" in msg, msg
    with pytest.raises(ValueError, match="parameters"):
        TokenizerConfig.from_dict({**HITA_V, "ch": 4096})


def test_names_keys_and_shapes_of_the_dict():
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_2B, "evil": 1, "n_layers": 2})
    msg = _one_line(e)
    assert "unknown gpt config keys: 'evil', 'n_layers'" in msg, msg
    with pytest.raises(ValueError, match="lacks the keys dim, n_layer, n_head"):
        GPTConfig.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        GPTConfig.from_json("[1, 2]")
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_2B, "name": "two\nlines"})
    assert "name must be a printable string" in _one_line(e)
    with pytest.raises(ValueError) as e:
        TokenizerConfig.from_dict({**HITA_V, "name": "x" * 10_000})
    assert len(_one_line(e)) < 300
    with pytest.raises(ValueError) as e:  # an int too long for Python to print still gives one short line
        GPTConfig.from_dict({**GPT_2B, "grid": 10**5000})
    assert "grid" in _one_line(e)


def test_json_lists_become_tuples_and_ints_become_floats():
    cfg = TokenizerConfig.from_json(json.dumps({**HITA_V, "commit_beta": 1}))
    assert cfg.ch_mult == (1, 1, 2, 2, 4) and isinstance(cfg.commit_beta, float)
    assert GPTConfig("x", dim=128, n_layer=2, n_head=4, rope_base=10000) == GPTConfig("x", dim=128, n_layer=2, n_head=4)
