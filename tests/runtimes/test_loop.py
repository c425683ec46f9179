"""The shared decode loop over the eager executor, on the tiny presets (random weights)."""
from __future__ import annotations

import pytest
import torch

from hita.config import GPTConfig, TokenizerConfig
from hita.runtimes.executor import StepExecutor, validate_class_ids
from hita.runtimes.loop import generate_images, generate_tokens, teacher_forced, to_uint8
from hita.runtimes.sampling import SamplingOptions, apply_cfg
from hita.runtimes.torch_eager import TorchExecutor

GPT_CFG = GPTConfig.from_name("tiny")
L = GPT_CFG.seq_len  # 16 holistic + 64 patch
NH = GPT_CFG.n_holistic


def _tiny_gpt():
    from hita.models.gpt import HitaGPT

    torch.manual_seed(0)
    gpt = HitaGPT(GPT_CFG)
    # The head is zero-initialised (spec 4.5): give it weights so the logits carry information.
    torch.nn.init.normal_(gpt.output.weight, std=0.1)
    return gpt.eval()


@pytest.fixture(scope="module")
def gpt():
    return _tiny_gpt()


@pytest.fixture(scope="module")
def ex(gpt):
    return TorchExecutor(gpt)


class Spy(StepExecutor):
    """Records what the loop feeds an executor."""

    def __init__(self, inner: StepExecutor):
        self.inner, self.calls = inner, []
        self.gpt_config, self.tokenizer_config, self.name = inner.gpt_config, inner.tokenizer_config, "spy"

    def start(self, batch):
        self.calls.append(("start", batch))
        self.inner.start(batch)

    def prefill(self, class_ids):
        self.calls.append(("prefill", class_ids.clone()))
        return self.inner.prefill(class_ids)

    def decode(self, tokens, pos):
        self.calls.append(("decode", tokens.clone(), pos))
        return self.inner.decode(tokens, pos)

    def decode_image(self, holistic_ids, patch_ids):
        return self.inner.decode_image(holistic_ids, patch_ids)


def _raw_cfg_logits(ex, ids, tokens):
    """Raw executor logits [2n, L, V] for the batch [ids ; null] fed with the given tokens."""
    batch = torch.cat([ids, torch.full_like(ids, GPT_CFG.null_class)])
    ex.start(batch.shape[0])
    out = [ex.prefill(batch).float()]
    for pos in range(1, L):
        out.append(ex.decode(torch.cat([tokens[:, pos - 1]] * 2), pos).float())
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------


def test_seeded_generation_is_deterministic(ex):
    opts = SamplingOptions(seed=5)
    a = generate_tokens(ex, [1, 2], opts)
    b = generate_tokens(ex, [1, 2], opts)
    assert a.tokens.shape == (2, L) and a.tokens.dtype == torch.int64
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.holistic_ids, a.tokens[:, :NH]) and torch.equal(a.patch_ids, a.tokens[:, NH:])
    assert a.holistic_ids.shape == (2, NH) and a.patch_ids.shape == (2, GPT_CFG.n_patch)
    assert ((a.tokens >= 0) & (a.tokens < GPT_CFG.vocab_size)).all()
    assert a.logits is None
    c = generate_tokens(ex, [1, 2], SamplingOptions(seed=6))
    assert not torch.equal(a.tokens, c.tokens)


def test_rows_are_keyed_by_global_row_index(ex):
    """Image r of a batch equals the same class generated alone with row_offset=r (CFG on)."""
    opts = SamplingOptions(cfg_scale=2.0, top_k=100, seed=3)
    ids = [4, 7, 4]
    batch = generate_tokens(ex, ids, opts).tokens
    for r, c in enumerate(ids):
        alone = generate_tokens(ex, [c], opts, row_offset=r).tokens
        assert torch.equal(alone[0], batch[r]), f"row {r}"
    # Rows 0 and 2 share a class but not their noise.
    assert not torch.equal(batch[0], batch[2])


def test_greedy_equals_argmax_of_teacher_forced_logits(ex):
    opts = SamplingOptions(cfg_scale=1.0, temperature=0.0)
    res = generate_tokens(ex, [0, 9], opts, record_logits=True)
    tf = teacher_forced(ex, [0, 9], res.holistic_ids, res.patch_ids)      # [2, L, V]
    assert tf.shape == (2, L, GPT_CFG.vocab_size) and tf.dtype == torch.float32
    assert torch.equal(tf.argmax(-1), res.tokens)
    assert torch.allclose(res.logits, tf, atol=1e-6, rtol=0)


def test_cfg_mixes_every_step_by_default(ex):
    opts = SamplingOptions(cfg_scale=3.0, seed=1)
    ids = torch.tensor([2, 5])
    res = generate_tokens(ex, ids, opts, record_logits=True)
    raw = _raw_cfg_logits(ex, ids, res.tokens)                              # [4, L, V]
    expected = torch.stack([apply_cfg(raw[:, t], 3.0) for t in range(L)], dim=1)
    assert torch.allclose(res.logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(res.logits, raw[:2], atol=1e-2)               # guidance does something


def test_cfg_interval_zero_uses_cond_logits_from_step_one(ex):
    """cfg_interval=0: prefill (t=0) and decode step i=0 (t=1) guided; steps i>=1 (t>=2) cond only."""
    opts = SamplingOptions(cfg_scale=3.0, cfg_interval=0, seed=1)
    ids = torch.tensor([2, 5])
    spy = Spy(ex)
    res = generate_tokens(spy, ids, opts, record_logits=True)
    raw = _raw_cfg_logits(ex, ids, res.tokens)                              # [4, L, V]
    for t in (0, 1):
        assert torch.allclose(res.logits[:, t], apply_cfg(raw[:, t], 3.0), atol=1e-5, rtol=0)
    assert torch.allclose(res.logits[:, 2:], raw[:2, 2:], atol=1e-6, rtol=0)
    # The null rows are still fed every step, with the conditional token.
    assert spy.calls[0] == ("start", 4)
    assert spy.calls[1][1].tolist() == [2, 5, GPT_CFG.null_class, GPT_CFG.null_class]
    decodes = [c for c in spy.calls if c[0] == "decode"]
    assert [c[2] for c in decodes] == list(range(1, L))
    for _, fed, pos in decodes:
        assert torch.equal(fed, torch.cat([res.tokens[:, pos - 1]] * 2))


def test_cfg_scale_one_builds_no_null_rows(ex):
    spy = Spy(ex)
    res = generate_tokens(spy, [3], SamplingOptions(cfg_scale=1.0), record_logits=True)
    assert spy.calls[0] == ("start", 1)
    assert spy.calls[1][1].tolist() == [3]
    assert all(c[1].shape == (1,) for c in spy.calls[2:])
    tf = teacher_forced(ex, [3], res.holistic_ids, res.patch_ids)
    assert torch.allclose(res.logits, tf, atol=1e-6, rtol=0)


def test_cfg_changes_tokens(ex):
    plain = generate_tokens(ex, [1, 3], SamplingOptions(cfg_scale=1.0, seed=2)).tokens
    guided = generate_tokens(ex, [1, 3], SamplingOptions(cfg_scale=4.0, seed=2)).tokens
    late = generate_tokens(ex, [1, 3], SamplingOptions(cfg_scale=4.0, cfg_interval=10, seed=2)).tokens
    assert not torch.equal(plain, guided)
    assert torch.equal(late[:, :12], guided[:, :12])  # identical while guidance is on (t <= 11)
    assert not torch.equal(late, guided)


def test_class_id_out_of_range_raises(ex):
    with pytest.raises(ValueError, match=r"class id 10 out of range \[0, 10\)"):
        generate_tokens(ex, [3, 10], SamplingOptions())
    with pytest.raises(ValueError, match="class id -1"):
        validate_class_ids(torch.tensor([-1]), 10)
    with pytest.raises(ValueError, match="at least one"):
        validate_class_ids([], 10)
    with pytest.raises(ValueError, match="integers"):
        validate_class_ids(torch.tensor([1.0]), 10)


def test_progress_callback_counts_steps(ex):
    seen = []
    generate_tokens(ex, [0], SamplingOptions(cfg_scale=1.0), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, L) for i in range(1, L + 1)]


def test_consistent_pos128_matches_training_forward(gpt):
    """With pos128="consistent" the cached step path reproduces the training forward (spec 4.7)."""
    ex = TorchExecutor(gpt, pos128="consistent")
    g = torch.Generator().manual_seed(0)
    hol = torch.randint(0, GPT_CFG.vocab_size, (2, NH), generator=g)
    patch = torch.randint(0, GPT_CFG.vocab_size, (2, GPT_CFG.n_patch), generator=g)
    ids = torch.tensor([1, 8])
    tf = teacher_forced(ex, ids, hol, patch)
    with torch.no_grad():
        h, p = gpt.forward_train(ids, hol, patch)
    assert torch.allclose(tf, torch.cat([h, p], dim=1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pos128"):
        TorchExecutor(gpt, pos128="slot")


def test_executor_errors(gpt):
    ex = TorchExecutor(gpt)
    with pytest.raises(RuntimeError, match="start"):
        ex.prefill(torch.tensor([0]))
    ex.start(2)
    with pytest.raises(ValueError, match=r"expects \[2\]"):
        ex.prefill(torch.tensor([0]))
    with pytest.raises(ValueError, match="position"):
        ex.decode(torch.tensor([0, 0]), L)
    with pytest.raises(RuntimeError, match="without a tokenizer"):
        ex.decode_image(
            torch.zeros(1, NH, dtype=torch.long), torch.zeros(1, GPT_CFG.n_patch, dtype=torch.long)
        )


def test_bf16_executor_logits_are_upcast_for_sampling():
    """A bf16 GPT returns bf16 logits (spec 4.5); the loop samples from their exact float32 values."""
    ex = TorchExecutor(_tiny_gpt(), dtype=torch.bfloat16)
    ex.start(1)
    assert ex.prefill(torch.tensor([2])).dtype == torch.bfloat16
    res = generate_tokens(ex, [2], SamplingOptions(cfg_scale=1.0, seed=1), record_logits=True)
    assert res.logits.dtype == torch.float32
    assert torch.equal(res.logits.bfloat16().float(), res.logits)
    assert ((res.tokens >= 0) & (res.tokens < GPT_CFG.vocab_size)).all()


def test_to_uint8_formula_and_resize():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -2.0, 0.999, -0.99]).view(1, 1, 1, 7).expand(1, 3, 7, 7)
    out = to_uint8(x)
    assert out.shape == (1, 7, 7, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0, 255, 1]  # truncation, not rounding
    y = torch.rand(2, 3, 12, 12) * 2 - 1
    small = to_uint8(y, size=8)
    expected = torch.nn.functional.interpolate(y, size=(8, 8), mode="bicubic", align_corners=False)
    assert small.shape == (2, 8, 8, 3)
    assert torch.equal(small, torch.clamp(127.5 * expected + 128, 0, 255).permute(0, 2, 3, 1).to(torch.uint8))
    assert torch.equal(to_uint8(y, size=12), to_uint8(y))


def test_generate_images_with_tiny_tokenizer(gpt):
    from hita.models.tokenizer import HitaTokenizer

    tok_cfg = TokenizerConfig.from_name("tiny")
    torch.manual_seed(1)
    ex = TorchExecutor(gpt, HitaTokenizer(tok_cfg))
    assert ex.tokenizer_config == tok_cfg
    images, res = generate_images(ex, [0, 1], SamplingOptions(seed=4))
    assert images.shape == (2, 3, tok_cfg.image_size, tok_cfg.image_size) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert torch.equal(res.tokens, generate_tokens(ex, [0, 1], SamplingOptions(seed=4)).tokens)
    assert torch.equal(images, ex.decode_image(res.holistic_ids, res.patch_ids).cpu())
    assert to_uint8(images).shape == (2, tok_cfg.image_size, tok_cfg.image_size, 3)


# ----------------------------------------------------------------------------------------------
# The executor contract: row limits, buckets, sampling place
# ----------------------------------------------------------------------------------------------


class Limited(Spy):
    """An executor that accepts at most ``max_rows`` rows per sequence (an engine profile's max)."""

    def __init__(self, inner, max_rows, buckets=()):
        super().__init__(inner)
        self.max_rows, self.batch_buckets = max_rows, buckets

    def start(self, batch):
        assert batch <= self.max_rows, f"loop started {batch} rows on an executor of at most {self.max_rows}"
        super().start(batch)


@pytest.mark.parametrize("max_rows, buckets, starts", [(4, (), [4, 4, 2]), (5, (), [4, 4, 2]), (8, (2, 4), [4, 4, 2])])
def test_loop_chunks_requests_to_fit_max_rows_with_cfg_counted(ex, max_rows, buckets, starts):
    opts = SamplingOptions(cfg_scale=2.0, top_k=20, seed=3)
    ids = [1, 2, 3, 4, 5]
    whole = generate_tokens(ex, ids, opts)
    lim = Limited(ex, max_rows, buckets)
    chunked = generate_tokens(lim, ids, opts)
    assert [c[1] for c in lim.calls if c[0] == "start"] == starts     # 2 rows per image (CFG)
    assert torch.equal(chunked.tokens, whole.tokens)                  # noise keyed by global image index


def test_an_executor_too_small_for_one_image_is_refused(ex):
    with pytest.raises(ValueError, match="runs at most 1 rows per step, and one image needs 2"):
        generate_tokens(Limited(ex, 1), [1], SamplingOptions(cfg_scale=2.0))


def test_device_and_host_sampling_draw_the_same_tokens(ex):
    opts = SamplingOptions(cfg_scale=1.5, top_p=0.9, temperature=0.9, seed=11)
    dev = generate_tokens(ex, [0, 3, 7], opts, sampling="device", record_logits=True)
    host = generate_tokens(ex, [0, 3, 7], opts, sampling="host", record_logits=True)
    assert torch.equal(dev.tokens, host.tokens)
    assert torch.equal(dev.logits, host.logits)
    with pytest.raises(ValueError, match="sampling must be one of"):
        generate_tokens(ex, [0], opts, sampling="gpu")


def test_kv_cache_bytes_matches_the_allocated_cache(gpt):
    ex32, ex16 = TorchExecutor(_tiny_gpt()), TorchExecutor(_tiny_gpt(), dtype=torch.bfloat16)
    ex32.start(3)
    allocated = sum(t.numel() * t.element_size() for t in ex32._k + ex32._v)
    assert ex32.kv_cache_bytes(3) == allocated
    assert ex16.kv_cache_bytes(3) == allocated // 2
    assert ex32.device == torch.device("cpu") and ex32.max_rows is None and ex32.chunk_rows(2) is None


@pytest.mark.gpu
def test_device_sampling_on_cuda_matches_the_host():
    gpt = _tiny_gpt()
    cuda = TorchExecutor(gpt, device="cuda")
    opts = SamplingOptions(cfg_scale=1.5, top_k=50, top_p=0.95, seed=5)
    dev = generate_tokens(cuda, list(range(10)), opts, sampling="device", record_logits=True)
    host = generate_tokens(cuda, list(range(10)), opts, sampling="host", record_logits=True)
    assert torch.equal(dev.logits, host.logits)
    # Same float32 logits; CUDA's softmax/cumsum may round differently from the CPU's, so a draw
    # that lands within rounding of a bucket edge could differ. Measured agreement is reported.
    agree = (dev.tokens == host.tokens).float().mean().item()
    assert agree >= 0.999, agree


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_on_cuda(dtype):
    opts = SamplingOptions(cfg_scale=2.0, top_k=50, seed=7)
    eager = generate_tokens(TorchExecutor(_tiny_gpt(), device="cuda", dtype=dtype), [1, 4, 6], opts,
                            record_logits=True)
    graphed = generate_tokens(TorchExecutor(_tiny_gpt(), device="cuda", dtype=dtype, cuda_graphs=True), [1, 4, 6],
                              opts, record_logits=True)
    # The replayed kernels are the eager ones, so logits are bit-identical and so are the tokens.
    assert torch.equal(graphed.logits, eager.logits)
    assert torch.equal(graphed.tokens, eager.tokens)


def test_cuda_graphs_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        TorchExecutor(_tiny_gpt(), cuda_graphs=True)
