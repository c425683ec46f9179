"""AOTInductor export and executor on the tiny presets: manifest, parity with eager (logits per step,
greedy and seeded tokens, pixels), the in-place KV contract, and refusals of foreign packages.

One export per pytest session: the folder lives in the session's base temp dir and is reused while
its manifest verifies, so ``tests/runtimes/test_cpp_host.py`` shares it. Compiling the three tiny
graphs takes 1-2 minutes on 2 cores, hence ``slow``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from hita.util.metrics import psnr
from hita.export.errors import ArtifactError
from hita.export.manifest import MANIFEST_NAME, Manifest, load_manifest
from hita.export.testing import reissue_manifest
from hita.export.spec import DECODE_STEP, DECODER, GRAPH_NAMES, PREFILL
from hita.export.testing import reissue_manifest, tiny_models
from hita.runtimes.loop import (
    generate_images,
    generate_tokens,
    teacher_forced,
    to_uint8,
)
from hita.runtimes.parity import check_parity
from hita.runtimes.sampling import SamplingOptions
from hita.runtimes.torch_eager import TorchExecutor

ATOL = 1e-4  # fp32 logits tolerance per step (hita.export.spec.TOLERANCES)
MIN_PSNR_DB = 60.0  # decoder pixels in [-1, 1]; measured ~127 dB (max |diff| ~5e-6)


@pytest.fixture(scope="module")
def eager():
    gpt, tok = tiny_models(0)
    return TorchExecutor(gpt, tok)


@pytest.fixture(scope="module")
def aoti(aoti_dir):
    from hita.runtimes.aoti import AotiExecutor

    return AotiExecutor(aoti_dir)


def _rewrite_manifest(folder: Path, **changes) -> None:
    """A valid-looking manifest with other settings (device, torch version): what a genuine export
    elsewhere would contain."""
    reissue_manifest(folder, **changes)


@pytest.fixture
def copy_dir(aoti_dir, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(aoti_dir, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_manifest_records_packages_device_versions_and_inplace_cache(aoti_dir):
    m = load_manifest(aoti_dir, expect_engine="aoti")
    assert sorted(m.files) == ["decode_step.pt2", "decoder.pt2", "prefill.pt2"]
    assert m.device == "cpu" and m.versions["torch"] == torch.__version__
    assert m.precision == "float32" and m.pos128 == "reference" and m.gpt_preset == "tiny"
    step = m.graphs[DECODE_STEP]
    past = [t["name"] for t in step["inputs"][2:]]
    assert [t["name"] for t in step["outputs"]] == ["logits"] and step["mutates"] == past
    assert len(past) == 2 * m.gpt_cfg.n_layer
    assert [t["name"] for t in m.graphs[PREFILL]["outputs"]][1:] == [p.replace("past_key_values", "present") for p in past]
    assert m.graphs[PREFILL]["mutates"] == [] and m.graphs[DECODER]["mutates"] == []
    report = m.options["validation"]
    for g in GRAPH_NAMES:
        assert report[g]["max_abs_diff"] <= ATOL and report[g]["batch"] == 3
    assert report[DECODER]["psnr_db"] >= MIN_PSNR_DB
    assert m.options["kv_cache"] == "inplace"
    # The CPU defaults (hita.export.aoti): prefix attention + head half, freezing; the step was
    # checked to read no cache slot beyond the position.
    assert m.options["attention"] == "prefix" and m.options["inductor_configs"] == {"freezing": True}
    assert report[DECODE_STEP]["prefix_only_verified"] is True


def test_export_rejects_bad_arguments(tmp_path):
    from hita.export.aoti import export_aoti

    gpt, tok = tiny_models(0)
    with pytest.raises(ValueError, match="pos128"):
        export_aoti(gpt, tok, tmp_path / "a", pos128="nope", progress=False)
    with pytest.raises(ValueError, match="cpu, cuda"):
        export_aoti(gpt, tok, tmp_path / "a", device="meta", progress=False)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------
# Parity with eager through the shared loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logits_match_eager_at_every_step(eager, aoti):
    ids = torch.tensor([0, 3, 9])
    run = generate_tokens(eager, ids, SamplingOptions(cfg_scale=1.0, seed=5))
    ref = teacher_forced(eager, ids, run.holistic_ids, run.patch_ids)      # [3, L, V]
    got = teacher_forced(aoti, ids, run.holistic_ids, run.patch_ids)
    per_step = (ref - got).abs().amax(dim=(0, 2))                           # [L]
    assert per_step.numel() == eager.gpt_config.seq_len
    assert float(per_step.max()) <= ATOL, f"worst step {int(per_step.argmax())}: {float(per_step.max()):.2e}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(temperature=0.0, cfg_scale=1.0),
        SamplingOptions(temperature=0.0, cfg_scale=2.0),
        SamplingOptions(seed=11, cfg_scale=1.5, cfg_interval=6, top_k=40, top_p=0.9, temperature=0.9),
    ],
    ids=["greedy", "greedy-cfg", "seeded-cfg-topk-topp"],
)
def test_tokens_identical_to_eager(eager, aoti, opts):
    ids = [2, 7]
    assert torch.equal(generate_tokens(eager, ids, opts).tokens, generate_tokens(aoti, ids, opts).tokens)


@pytest.mark.slow
def test_images_close_to_eager(eager, aoti):
    opts = SamplingOptions(seed=3)
    img_e, run = generate_images(eager, [1, 4], opts)
    img_a = aoti.decode_image(run.holistic_ids, run.patch_ids).cpu()
    assert psnr(img_e, img_a) >= MIN_PSNR_DB
    assert (to_uint8(img_e).int() - to_uint8(img_a).int()).abs().max() <= 1


@pytest.mark.slow
def test_parity_report_passes(eager, aoti):
    report = check_parity(eager, aoti, [0, 5], SamplingOptions(seed=1))
    assert report.ok, report.failures
    assert report.max_logit_diff <= ATOL and report.token_agreement == 1.0


@pytest.mark.slow
def test_any_batch_size_runs(eager, aoti):
    # The batch axis is symbolic from 1 up (traced at 2, validated at 3 during export).
    for ids in ([6], [0, 1, 2, 3, 4]):
        assert torch.equal(
            generate_tokens(eager, ids, SamplingOptions(temperature=0.0, cfg_scale=1.0)).tokens,
            generate_tokens(aoti, ids, SamplingOptions(temperature=0.0, cfg_scale=1.0)).tokens,
        )


@pytest.mark.slow
def test_decode_step_updates_the_cache_in_place(eager, aoti):
    cfg = eager.gpt_config
    ids = torch.tensor([1, 2])
    aoti.start(2)
    aoti.prefill(ids)
    cache = aoti._cache
    before = [c.clone() for c in cache]
    aoti.decode(torch.tensor([5, 6]), 3)
    assert all(c is d for c, d in zip(cache, aoti._cache))  # same tensors, no new cache
    for b, c in zip(before, cache):
        changed = (b != c).any(dim=(0, 1, 3))                                   # [S]
        assert changed.nonzero().flatten().tolist() == [3]                       # only slot pos
    assert cache[0].shape == (2, cfg.n_head, cfg.cache_len, cfg.head_dim)


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refuses_package_for_another_device(copy_dir):
    from hita.runtimes.aoti import AotiExecutor

    _rewrite_manifest(copy_dir, device="cuda")
    with pytest.raises(ArtifactError, match="compiled for device 'cuda'.*--device cpu") as e:
        AotiExecutor(copy_dir)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_refuses_package_for_another_torch_version(copy_dir, aoti_dir):
    from hita.runtimes.aoti import AotiExecutor

    versions = dict(load_manifest(aoti_dir).versions, torch="2.11.0+cu128")
    _rewrite_manifest(copy_dir, versions=versions)
    with pytest.raises(ArtifactError, match="compiled with torch 2.11.0.*re-export") as e:
        AotiExecutor(copy_dir)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_refuses_missing_or_changed_files(copy_dir):
    from hita.runtimes.aoti import AotiExecutor

    raw = (copy_dir / MANIFEST_NAME).read_text()
    (copy_dir / MANIFEST_NAME).write_text(raw.replace('"device": "cpu"', '"device": "cuda"'))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        AotiExecutor(copy_dir)  # a hand edit without a new checksum is caught first
    (copy_dir / MANIFEST_NAME).write_text(raw)
    data = (copy_dir / "prefill.pt2").read_bytes()
    (copy_dir / "prefill.pt2").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="prefill.pt2: sha256 mismatch"):
        AotiExecutor(copy_dir)
    (copy_dir / "decoder.pt2").unlink()
    with pytest.raises(ArtifactError, match="decoder.pt2: missing"):
        AotiExecutor(copy_dir)


def test_refuses_a_folder_of_another_engine(tmp_path):
    from hita.export.manifest import write_artifacts
    from hita.runtimes.aoti import AotiExecutor

    gpt, tok = tiny_models(0)
    f = tmp_path / "decoder.onnx"
    f.write_bytes(b"x")
    m = Manifest(
        engine="onnx", tokenizer_preset="tiny", tokenizer_config=tok.cfg.to_dict(), gpt_preset="tiny",
        gpt_config=gpt.cfg.to_dict(), pos128="reference", precision="float32", device="cpu",
        versions={"torch": torch.__version__}, graphs={"decoder": {"file": "decoder.onnx", "inputs": [], "outputs": []}},
    )
    write_artifacts(tmp_path / "onnx", {"decoder.onnx": f}, m)
    with pytest.raises(ArtifactError, match="holds a 'onnx' export, expected 'aoti'"):
        AotiExecutor(tmp_path / "onnx")
