"""Export specs: names, dtypes, symbolic shapes, example inputs and TensorRT profiles per graph."""
from __future__ import annotations

import pytest
import torch

from hita.config import GPTConfig, TokenizerConfig
from hita.export.errors import SignatureError
from hita.export.spec import (
    DynamicDim,
    GraphSignature,
    TensorSpec,
    decode_spec,
    decoder_spec,
    graph_specs,
    kv_names,
    prefill_spec,
)

GPT = GPTConfig.from_name("tiny")
TOK = TokenizerConfig.from_name("tiny")


def test_kv_names_are_key_then_value_per_layer():
    assert kv_names("present", 2) == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]


def test_decoder_spec_io():
    s = decoder_spec(TOK)
    assert s.input_names == ["holistic_ids", "patch_ids"]
    assert [t.shape for t in s.inputs] == [("batch", 16), ("batch", 64)]
    assert s.outputs == (TensorSpec("image", "float32", ("batch", 3, 32, 32)),)
    assert s.file_name == "decoder.onnx"


def test_prefill_spec_io():
    s = prefill_spec(GPT)
    assert s.input_names == ["class_ids"]
    assert s.output_names == ["logits"] + kv_names("present", GPT.n_layer)
    assert s.outputs[0].shape == ("batch", GPT.vocab_size)
    assert s.outputs[1].shape == ("batch", GPT.n_head, GPT.cache_len, GPT.head_dim)
    assert s.inputs[0].high == GPT.num_classes + 1  # the CFG null class is a valid input


def test_decode_spec_io_and_dynamic_axes():
    s = decode_spec(GPT, dtype=torch.bfloat16)
    assert s.input_names[:2] == ["token", "position"]
    assert s.input_names[2:] == kv_names("past_key_values", GPT.n_layer)
    assert s.output_names[1:] == kv_names("present", GPT.n_layer)
    assert s.inputs[1].shape == (1,)  # the position is static: one graph serves every position
    assert {t.dtype for t in s.inputs[2:] + s.outputs} == {"bfloat16"}
    axes = s.dynamic_axes
    assert "position" not in axes
    assert axes["token"] == {0: "batch"} and axes["present.3.value"] == {0: "batch"}
    assert (s.atol, s.rtol) == (5e-2, 5e-2)


def test_example_inputs_use_sizes_of_at_least_two_and_valid_ranges():
    s = decode_spec(GPT)
    feed = s.example_inputs()
    assert list(feed) == s.input_names
    assert feed["token"].shape == (2,) and feed["past_key_values.0.key"].shape[0] == 2
    assert int(feed["token"].max()) < GPT.vocab_size
    assert 1 <= int(feed["position"]) < GPT.seq_len
    check = s.example_inputs(s.sizes("check"))
    assert check["token"].shape == (3,)
    assert torch.equal(s.example_inputs(seed=4)["token"], s.example_inputs(seed=4)["token"])


def test_trt_profile_covers_cfg_batch():
    s = decode_spec(GPT)  # default max batch 16 = 8 images + their CFG rows
    lo, opt, hi = s.trt_profile()["past_key_values.0.key"]
    assert lo == (1, GPT.n_head, GPT.cache_len, GPT.head_dim)
    assert opt[0] == hi[0] == 16
    assert s.trt_profile()["position"] == ((1,), (1,), (1,))
    assert decode_spec(GPT, max_batch=32, opt_batch=4).trt_profile()["token"] == ((1,), (4,), (32,))
    # CFG doubles only the GPT batch, never the number of decoded images.
    assert graph_specs(TOK, GPT)["decoder"].dim("batch").max == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(example=1), "example size must be >= 2"),
        (dict(check=2), "must differ"),
        (dict(min=0), "min <= opt <= max"),
        (dict(max=2), "min <= opt <= max"),
    ],
)
def test_dynamic_dim_rejects_sizes_that_hide_bugs(kwargs, match):
    base = dict(name="batch", min=1, opt=4, max=8)
    with pytest.raises(ValueError, match=match):
        DynamicDim(**{**base, **kwargs})


def test_unknown_dtype_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        prefill_spec(GPT, dtype="float64")


def test_signature_check_messages():
    spec = decode_spec(GPT)
    spec.signature.check(spec.signature, "decode_step.onnx", spec.description, "fix it")
    other = prefill_spec(GPT).signature
    with pytest.raises(SignatureError, match=r"decode_step.onnx: has inputs \[class_ids\]; expected \[token, position"):
        spec.signature.check(other, "decode_step.onnx", spec.description, "fix it")
    retyped = GraphSignature(
        spec.inputs[:2] + (TensorSpec("past_key_values.0.key", "float16", spec.inputs[2].shape),) + spec.inputs[3:],
        spec.outputs,
    )
    with pytest.raises(SignatureError, match="float16 .*expected past_key_values.0.key: float32"):
        spec.signature.check(retyped, "decode_step.onnx", spec.description, "fix it")
    fixed_batch = GraphSignature((TensorSpec("token", "int64", (2,)),) + spec.inputs[1:], spec.outputs)
    with pytest.raises(SignatureError, match=r"token: int64 \[2\]; expected token: int64 \[batch\]"):
        spec.signature.check(fixed_batch, "decode_step.onnx", spec.description, "fix it")


def test_signature_roundtrips_through_json_dict():
    sig = decode_spec(GPT).signature
    assert GraphSignature.from_dict(sig.to_dict()) == sig
