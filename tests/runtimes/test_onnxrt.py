"""ONNX Runtime executor vs eager PyTorch through the shared loop, and every refusal it owes a user.

Parity matrix (style rule 10) on the tiny presets, fp32: teacher-forced logits within 1e-4 at every
step, greedy and seeded sampled tokens identical with CFG on and off and with a cfg_interval, batch
1 equal to batch 3 row by row, in-place and ping-pong KV binding bit-identical, decoded images.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from hita.export.errors import ArtifactError, SignatureError
from hita.export.manifest import MANIFEST_NAME, load_manifest, sha256_file
from hita.export.testing import reissue_manifest
from hita.export.testing import tiny_models
from hita.runtimes.loop import generate_tokens, teacher_forced
from hita.runtimes.onnxrt import OrtExecutor
from hita.runtimes.sampling import SamplingOptions
from hita.runtimes.torch_eager import TorchExecutor

ATOL = 1e-4  # fp32 (see hita.export.spec.TOLERANCES)
CLASS_IDS = [0, 3, 9]


@pytest.fixture(scope="module")
def eager():
    gpt, tok = tiny_models()  # the weights that were exported
    return TorchExecutor(gpt, tok)


@pytest.fixture(scope="module")
def ort_ex(onnx_dir):
    return OrtExecutor(onnx_dir, threads=1)


@pytest.fixture(scope="module")
def tokens(eager):
    cfg = eager.gpt_config
    g = torch.Generator().manual_seed(0)
    hol = torch.randint(0, cfg.vocab_size, (len(CLASS_IDS), cfg.n_holistic), generator=g)
    patch = torch.randint(0, cfg.vocab_size, (len(CLASS_IDS), cfg.n_patch), generator=g)
    return hol, patch


@pytest.fixture(scope="module")
def eager_logits(eager, tokens):
    return teacher_forced(eager, CLASS_IDS, *tokens)  # [n, L, V]


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------


def test_teacher_forced_logits_match_eager_at_every_step(ort_ex, tokens, eager_logits):
    got = teacher_forced(ort_ex, CLASS_IDS, *tokens)
    per_step = (got - eager_logits).abs().amax(dim=(0, 2))  # [L]
    assert per_step.numel() == ort_ex.gpt_config.seq_len
    assert float(per_step.max()) <= ATOL, f"worst step {int(per_step.argmax())}: {float(per_step.max()):.2e}"
    assert float(eager_logits.std()) > 1.0  # non-degenerate logits, so the check means something


def test_pos128_rule_is_baked_into_the_graph(ort_ex, tokens, eager_logits):
    """The artifacts hold the 'reference' rule: they must differ from a 'consistent' eager run
    exactly from position n_holistic on (this proves the comparison above can fail)."""
    gpt, tok = tiny_models()
    other = teacher_forced(TorchExecutor(gpt, tok, pos128="consistent"), CLASS_IDS, *tokens)
    got = teacher_forced(ort_ex, CLASS_IDS, *tokens)
    nh = ort_ex.gpt_config.n_holistic
    assert float((got[:, :nh] - other[:, :nh]).abs().max()) <= ATOL
    assert float((got[:, nh] - other[:, nh]).abs().max()) > 1e-2


def test_batch_one_equals_batch_three_row_by_row(ort_ex, tokens):
    hol, patch = tokens
    full = teacher_forced(ort_ex, CLASS_IDS, hol, patch)
    for r, c in enumerate(CLASS_IDS):
        row = teacher_forced(ort_ex, [c], hol[r : r + 1], patch[r : r + 1])
        assert float((row[0] - full[r]).abs().max()) <= 1e-5


def test_inplace_and_pingpong_binding_agree_bit_for_bit(onnx_dir, tokens):
    inplace = OrtExecutor(onnx_dir, threads=1, kv_binding="inplace")
    pingpong = OrtExecutor(onnx_dir, threads=1, kv_binding="pingpong")
    assert (inplace.kv_binding, pingpong.kv_binding) == ("inplace", "pingpong")
    assert torch.equal(teacher_forced(inplace, CLASS_IDS, *tokens), teacher_forced(pingpong, CLASS_IDS, *tokens))


def test_auto_binding_uses_verified_inplace_on_cpu(ort_ex):
    assert ort_ex.manifest.options["kv_inplace_verified"] and ort_ex.kv_binding == "inplace"


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(cfg_scale=1.0, temperature=0.0),  # greedy, no CFG
        SamplingOptions(cfg_scale=2.0, temperature=0.0),  # greedy, CFG
        SamplingOptions(cfg_scale=1.0, seed=11),
        SamplingOptions(cfg_scale=1.5, seed=12, top_k=50, top_p=0.9),
        SamplingOptions(cfg_scale=3.0, cfg_interval=20, seed=13, temperature=0.8),
    ],
    ids=["greedy", "greedy-cfg", "sample", "sample-cfg-topk-topp", "sample-cfg-interval"],
)
def test_generated_tokens_identical(eager, ort_ex, opts):
    ref = generate_tokens(eager, CLASS_IDS, opts)
    got = generate_tokens(ort_ex, CLASS_IDS, opts)
    assert torch.equal(ref.tokens, got.tokens)


def test_decoded_images_match(eager, ort_ex, tokens):
    ref = eager.decode_image(*tokens).double()
    got = ort_ex.decode_image(*tokens)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    diff = got.double() - ref
    assert float(diff.abs().max()) <= ATOL
    assert 10 * math.log10(4.0 / float((diff**2).mean())) > 100.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_decoder_returns_its_activation_memory(ort_ex):
    # 512 tiny images: the decoder's activations take ~650 MiB. ORT's arena kept that after a run
    # (and grew to ~1.2 GiB over two calls) until the executor shrank it after each decoder run; the
    # output itself is 6 MiB. 200 MiB leaves room for allocator noise and is a third of one leak.
    n = 512
    g = torch.Generator().manual_seed(0)
    h = torch.randint(0, 512, (n, 16), generator=g)
    p = torch.randint(0, 512, (n, 64), generator=g)
    ort_ex.decode_image(h[:1], p[:1])
    base = _rss_mib()
    for _ in range(2):
        assert ort_ex.decode_image(h, p).shape == (n, 3, 32, 32)
    assert _rss_mib() - base < 200


def test_logits_are_a_zero_copy_view_of_the_bound_output(ort_ex):
    ort_ex.start(2)
    first = ort_ex.prefill(torch.tensor([1, 2]))
    ptr, snapshot = first.data_ptr(), first.clone()
    second = ort_ex.decode(first.argmax(-1), 1)
    assert second.data_ptr() == ptr == ort_ex._logits.data_ptr()
    assert not torch.equal(first, snapshot)  # overwritten in place: callers copy what they keep


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def art(onnx_dir, tmp_path):
    return shutil.copytree(onnx_dir, tmp_path / "art")


def _rewrite_manifest(folder, **changes):
    """Re-issue a folder's manifest with changed fields and valid hashes (a consistent-looking lie)."""
    names = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    files = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names}
    reissue_manifest(folder, files=files, **changes)


def test_edited_manifest_refused(art):
    raw = json.loads((art / MANIFEST_NAME).read_text())
    raw["gpt_config"]["n_layer"] = 5
    (art / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="content changed after export"):
        OrtExecutor(art)


def test_config_that_disagrees_with_the_graphs_refused(art):
    raw = json.loads((art / MANIFEST_NAME).read_text())
    _rewrite_manifest(art, gpt_config={**raw["gpt_config"], "n_layer": 5})
    with pytest.raises(ArtifactError, match="configs and graph signatures disagree"):
        OrtExecutor(art)


def test_missing_or_changed_file_refused(art):
    data = bytearray((art / "decode_step.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (art / "decode_step.onnx").write_bytes(bytes(data))
    match = r"decode_step.onnx: sha256 mismatch \(file changed after export\); re-run `hita export"
    with pytest.raises(ArtifactError, match=match):
        OrtExecutor(art)
    (art / "decode_step.onnx").unlink()
    with pytest.raises(ArtifactError, match="decode_step.onnx: missing"):
        OrtExecutor(art)


def test_truncated_onnx_refused(art):
    path = art / "prefill.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"prefill.onnx: \d+ bytes, manifest says \d+ \(truncated"):
        OrtExecutor(art)
    _rewrite_manifest(art)  # even with a manifest that vouches for it, ORT must refuse it
    with pytest.raises(ArtifactError, match="prefill.onnx: ONNX Runtime cannot load it"):
        OrtExecutor(art)


def test_wrong_graph_in_place_of_decode_step_refused(art):
    shutil.copy(art / "prefill.onnx", art / "decode_step.onnx")
    _rewrite_manifest(art)
    with pytest.raises(
        SignatureError,
        match=r"decode_step.onnx: has inputs \[class_ids\]; expected \[token, position, .*\]; "
        r"the file is not a hita decode-step graph",
    ):
        OrtExecutor(art)


def test_other_engine_refused(art):
    _rewrite_manifest(art, engine="tensorrt")
    with pytest.raises(ArtifactError, match="holds a 'tensorrt' export, expected 'onnx'"):
        OrtExecutor(art)
    assert load_manifest(art).engine == "tensorrt"


def test_call_order_and_argument_errors(ort_ex):
    fresh = OrtExecutor(ort_ex.artifacts_dir, threads=1, verify_files=False)
    with pytest.raises(RuntimeError, match="call start"):
        fresh.decode(torch.tensor([1]), 1)
    fresh.start(2)
    with pytest.raises(RuntimeError, match="call prefill"):
        fresh.decode(torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match=r"expects \[2\] ids"):
        fresh.prefill(torch.tensor([1, 2, 3]))
    fresh.prefill(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"position 0 out of range \[1, 79\]"):
        fresh.decode(torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="kv_binding"):
        OrtExecutor(ort_ex.artifacts_dir, kv_binding="shared")


def test_onnxruntime_is_imported_lazily():
    code = "import sys, hita.runtimes.onnxrt; assert 'onnxruntime' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
