"""The one autoregressive decode loop, shared by every backend (spec section 5).

Small named functions over the :class:`~hita.runtimes.executor.StepExecutor` interface:

- :func:`prefill` starts the cache and runs position 0 (the class token);
- :func:`decode_one_token` feeds one token at a position and returns the logits to sample from;
- :func:`generate_tokens` chains them with :func:`~hita.runtimes.sampling.sample`;
- :func:`teacher_forced` feeds given tokens and records raw logits (parity checks);
- :func:`generate_images` and :func:`to_uint8` turn tokens into pixels.

Sequence layout: index ``t = 0 .. n_holistic - 1`` are holistic tokens, ``t = n_holistic ..
n_holistic + n_patch - 1`` patch tokens. Token ``t`` is predicted at position ``t`` (the prefill is
position 0, then ``decode(token[t-1], pos=t)``), and drawn with the uniform
``NoiseStream(seed).uniform(step=t, rows=n, row_offset)[r]`` for image row ``r``.

Classifier-free guidance (reference semantics): when ``cfg_scale > 1`` the executor runs ``2n``
rows, ``[class ids ; null class]``; each sampled token is fed to both halves. The prefill is always
guided; decode step ``i = pos - 1`` is guided unless ``cfg_interval > -1 and i > cfg_interval``, in
which case the conditional rows' logits are used alone (the null rows keep being fed, as in the
reference, so their cache stays consistent).

The loop casts logits to float32 before any arithmetic so every backend samples with the same
numbers; executors never sample. Where: ``sampling="device"`` (default) keeps logits, tokens and the
draw on the executor's device (for CPU executors that is the host), so a GPU step needs no host
sync; ``sampling="host"`` copies float32 logits to the CPU first (parity mode: the same arithmetic
on the same device for every backend). Requests larger than the executor's ``max_rows`` run in
chunks; each image keeps its global noise row, so chunking never changes an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .executor import StepExecutor, validate_class_ids
from .sampling import NoiseStream, SamplingOptions, apply_cfg, sample

__all__ = [
    "GenerationResult",
    "prefill",
    "decode_one_token",
    "guided_logits",
    "draw_tokens",
    "sample_rows",
    "generate_tokens",
    "teacher_forced",
    "generate_images",
    "to_uint8",
]

Progress = bool | Callable[[int, int], None]
SAMPLING_PLACES = ("device", "host")


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Tokens (and optionally the logits they were drawn from) for ``n`` images.

    Fields:
        class_ids: int64 ``[n]``.
        tokens: int64 ``[n, n_holistic + n_patch]``, holistic tokens first.
        holistic_ids: int64 ``[n, n_holistic]`` (a view of ``tokens``).
        patch_ids: int64 ``[n, n_patch]`` (a view of ``tokens``).
        logits: float32 ``[n, n_holistic + n_patch, V]``, the logits each token was sampled from
            (after CFG, before temperature and filtering), or ``None`` when not recorded.
    """

    class_ids: torch.Tensor
    tokens: torch.Tensor
    holistic_ids: torch.Tensor
    patch_ids: torch.Tensor
    logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def _host_f32(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().to("cpu", torch.float32)


def guided_logits(raw: torch.Tensor, opts: SamplingOptions, step: int, host: bool = True) -> torch.Tensor:
    """Reduce an executor's output to the logits sampled from at one step.

    Args:
        raw: ``[B, V]`` executor logits; ``B = 2n`` when ``opts.use_cfg`` (cond rows first).
        opts: sampling options (cfg_scale, cfg_interval).
        step: decode step index ``pos - 1``; ``-1`` for the prefill.
        host: copy to the CPU (parity mode); else stay on the logits' device.
    Returns:
        float32 ``[n, V]`` on the CPU (``host``) or the logits' device.
    """
    raw = _host_f32(raw) if host else raw.detach().float()                   # [B, V]
    if not opts.use_cfg:
        return raw
    if opts.cfg_active(step):
        return apply_cfg(raw, opts.cfg_scale)                                 # [n, V]
    return raw[: raw.shape[0] // 2]                                           # cond rows only


def draw_tokens(logits: torch.Tensor, opts: SamplingOptions, noise: NoiseStream, t: int, row_offset: int = 0) -> torch.Tensor:
    """Draw the tokens at sequence index ``t`` for ``n`` images from their guided logits.

    The one place a token is drawn: :func:`generate_tokens` and the in-flight server
    (:mod:`hita.serving.scheduler`) both call it, so an image gets the same tokens whichever
    batch it ran in. Image ``r`` uses the uniform ``noise.uniform(t, n, row_offset)[r]``.

    Args:
        logits: float32 ``[n, V]`` from :func:`guided_logits`, on the CPU or the executor's device.
        opts: sampling options.
        noise: the request's :class:`~hita.runtimes.sampling.NoiseStream` (keyed by its seed).
        t: sequence index of the tokens being drawn.
        row_offset: global index of the first image.
    Returns:
        int64 ``[n]`` on the logits' device. On a GPU the NaN check is left to the caller (it would
        sync every step).
    """
    return sample_rows(logits, opts, noise.uniform(t, logits.shape[0], row_offset))


def sample_rows(logits: torch.Tensor, opts: SamplingOptions, u: torch.Tensor) -> torch.Tensor:
    """:func:`~hita.runtimes.sampling.sample` where the logits live, given each row's uniform.

    Rows are independent, so rows of several requests with the same options may be drawn in one
    call (the in-flight server does) and get the tokens each would get alone.

    Args:
        logits: float32 ``[n, V]`` guided logits.
        opts: temperature / top-k / top-p.
        u: float64 CPU ``[n]`` uniforms (:meth:`~hita.runtimes.sampling.NoiseStream.uniform`).
    Returns:
        int64 ``[n]`` on the logits' device (no NaN check on a GPU: it would sync).
    """
    if logits.device.type == "cpu":
        return sample(logits, opts, u)
    return sample(logits, opts, u.to(logits.device, non_blocking=True), check=False)


def prefill(executor: StepExecutor, class_ids: torch.Tensor, opts: SamplingOptions, host: bool = True) -> torch.Tensor:
    """Start a sequence: allocate the cache and run position 0 for every image.

    Args:
        executor: the backend.
        class_ids: int64 ``[n]`` (already validated).
        opts: sampling options; with ``opts.use_cfg`` the null-class rows are appended.
        host: as in :func:`guided_logits`.
    Returns:
        float32 ``[n, V]`` logits for holistic token 0 (always guided when CFG is on).
    """
    if opts.use_cfg:
        null = torch.full_like(class_ids, executor.gpt_config.null_class)
        class_ids = torch.cat([class_ids, null])                              # [2n]
    executor.start(class_ids.shape[0])
    return guided_logits(executor.prefill(class_ids), opts, step=-1, host=host)


def decode_one_token(
    executor: StepExecutor, tokens: torch.Tensor, pos: int, opts: SamplingOptions, host: bool = True
) -> torch.Tensor:
    """Feed the previous token at ``pos`` and return the logits for sequence index ``pos``.

    Args:
        executor: the backend, after :func:`prefill`.
        tokens: int64 ``[n]``, the tokens at sequence index ``pos - 1``.
        pos: position in ``1 .. n_holistic + n_patch - 1``.
        opts: sampling options (CFG rows are fed the same tokens).
        host: as in :func:`guided_logits`.
    Returns:
        float32 ``[n, V]``.
    """
    if opts.use_cfg:
        tokens = torch.cat([tokens, tokens])                                  # [2n]
    return guided_logits(executor.decode(tokens, pos), opts, step=pos - 1, host=host)


class _Progress:
    """tqdm bar (``progress=True``), user callback ``progress(done, total)``, or nothing."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.total, self.done, self.bar, self.fn = total, 0, None, None
        if callable(progress):
            self.fn = progress
        elif progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="tok")

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.fn is not None:
            self.fn(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_tokens(
    executor: StepExecutor,
    class_ids: torch.Tensor | Sequence[int],
    opts: SamplingOptions,
    progress: Progress = False,
    record_logits: bool = False,
    row_offset: int = 0,
    sampling: str = "device",
) -> GenerationResult:
    """Generate ``n_holistic + n_patch`` tokens per class id.

    Args:
        executor: the backend.
        class_ids: ``n`` class ids in ``[0, num_classes)``.
        opts: sampling options.
        progress: ``True`` for a tqdm bar, a callable ``f(done_steps, total_steps)``, or ``False``.
        record_logits: keep the float32 logits every token was sampled from (``n * L * V * 4``
            bytes: about 37 MB per image for the released layout).
        row_offset: global index of the first row for the noise stream; image ``r`` of this call
            uses noise row ``row_offset + r``, so splitting a batch with matching offsets gives the
            same images.
        sampling: ``"device"`` (sample where the executor's logits live) or ``"host"`` (float32
            logits copied to the CPU first: parity mode). Equal logits draw equal tokens either way.
    Returns:
        :class:`GenerationResult` with CPU tensors.
    Raises:
        ValueError: a class id out of range, or an unknown ``sampling``.
    """
    if sampling not in SAMPLING_PLACES:
        raise ValueError(f"sampling must be one of {SAMPLING_PLACES}, got {sampling!r}")
    cfg = executor.gpt_config
    ids = validate_class_ids(class_ids, cfg.num_classes)                     # [n]
    n, L = ids.shape[0], cfg.seq_len
    per = executor.chunk_rows(2 if opts.use_cfg else 1) or n
    tokens = torch.empty(n, L, dtype=torch.int64)                            # [n, L]
    recorded = torch.empty(n, L, cfg.vocab_size, dtype=torch.float32) if record_logits else None
    chunks = [(a, min(a + per, n)) for a in range(0, n, per)]
    bar = _Progress(progress, L * len(chunks), desc=f"{executor.name} tokens")
    try:
        for a, b in chunks:
            _generate_chunk(executor, ids[a:b], opts, row_offset + a, sampling == "host", bar,
                            tokens[a:b], None if recorded is None else recorded[a:b])
    finally:
        bar.close()
    nh = cfg.n_holistic
    return GenerationResult(ids, tokens, tokens[:, :nh], tokens[:, nh:], recorded)


def _generate_chunk(
    executor: StepExecutor,
    ids: torch.Tensor,
    opts: SamplingOptions,
    row_offset: int,
    host: bool,
    bar: _Progress,
    out: torch.Tensor,
    recorded: torch.Tensor | None,
) -> None:
    """One sequence of ``len(ids)`` images that fits the executor; writes ``out`` [m, L] in place."""
    m, L = ids.shape[0], executor.gpt_config.seq_len
    noise = NoiseStream(opts.seed)
    dev = torch.device("cpu") if host else executor.device
    tokens = torch.empty(m, L, dtype=torch.int64, device=dev)               # [m, L] on the sampling device
    finite = torch.ones((), dtype=torch.bool, device=dev)                   # NaN guard without a sync per step
    logits = prefill(executor, ids, opts, host=host)                          # [m, V]
    for t in range(L):
        if t > 0:
            logits = decode_one_token(executor, tokens[:, t - 1], t, opts, host=host)
        if recorded is not None:
            recorded[:, t] = logits.cpu()
        if dev.type != "cpu":
            finite &= torch.isfinite(logits).any(dim=-1).all()
        tokens[:, t] = draw_tokens(logits, opts, noise, t, row_offset)
        bar.update()
    if not bool(finite):
        raise FloatingPointError(
            f"{executor.name} returned NaN or infinite logits; check the model dtype/weights, or run the eager executor"
        )
    out.copy_(tokens.cpu())


def teacher_forced(
    executor: StepExecutor,
    class_ids: torch.Tensor | Sequence[int],
    holistic_ids: torch.Tensor,
    patch_ids: torch.Tensor,
) -> torch.Tensor:
    """Feed given tokens through the cached step path and record every step's raw logits (no CFG).

    Args:
        executor: the backend.
        class_ids: ``n`` class ids in ``[0, num_classes)``.
        holistic_ids: int64 ``[n, n_holistic]``.
        patch_ids: int64 ``[n, n_patch]``.
    Returns:
        float32 CPU ``[n, n_holistic + n_patch, V]``; entry ``[:, t]`` predicts token ``t``.
    """
    cfg = executor.gpt_config
    ids = validate_class_ids(class_ids, cfg.num_classes)                     # [n]
    n = ids.shape[0]
    if tuple(holistic_ids.shape) != (n, cfg.n_holistic) or tuple(patch_ids.shape) != (n, cfg.n_patch):
        raise ValueError(
            f"teacher_forced needs holistic_ids [{n}, {cfg.n_holistic}] and patch_ids [{n}, {cfg.n_patch}] "
            f"for {n} class ids, got {tuple(holistic_ids.shape)} and {tuple(patch_ids.shape)}"
        )
    tokens = torch.cat([holistic_ids, patch_ids], dim=1).to("cpu", torch.int64)  # [n, L]
    L = tokens.shape[1]
    out = torch.empty(n, L, cfg.vocab_size, dtype=torch.float32)             # [n, L, V]
    executor.start(n)
    out[:, 0] = _host_f32(executor.prefill(ids))
    for pos in range(1, L):
        out[:, pos] = _host_f32(executor.decode(tokens[:, pos - 1], pos))
    return out


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def generate_images(
    executor: StepExecutor,
    class_ids: torch.Tensor | Sequence[int],
    opts: SamplingOptions,
    progress: Progress = False,
    row_offset: int = 0,
    sampling: str = "device",
) -> tuple[torch.Tensor, GenerationResult]:
    """Generate tokens and decode them to pixels.

    Args:
        executor: the backend (needs a tokenizer decoder).
        class_ids: ``n`` class ids.
        opts: sampling options.
        progress: as in :func:`generate_tokens`.
        row_offset: as in :func:`generate_tokens`.
        sampling: as in :func:`generate_tokens`.
    Returns:
        ``(images, result)``: float32 CPU ``[n, 3, H, W]`` unclamped, and the tokens.
    """
    result = generate_tokens(executor, class_ids, opts, progress=progress, row_offset=row_offset, sampling=sampling)
    images = executor.decode_image(result.holistic_ids, result.patch_ids)   # [n, 3, H, W]
    return images.detach().to("cpu", torch.float32), result


def to_uint8(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Convert decoder output to uint8 HWC images exactly like the reference evaluation.

    Optional bicubic resize first (``align_corners=False``, no antialias, on the float output before
    clamping; e.g. 336 -> 256 for metrics, spec 5 and 7), then ``clamp(127.5 x + 128, 0, 255)`` and a
    truncating cast.

    Args:
        images: float ``[n, 3, H, W]`` in nominal ``[-1, 1]``.
        size: output side length, or ``None`` to keep ``H x W``.
    Returns:
        uint8 CPU ``[n, size, size, 3]`` (or ``[n, H, W, 3]``).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"to_uint8 expects images [n, 3, H, W], got {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)                              # [n, 3, H, W]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        if size <= 0:
            raise ValueError(f"size must be a positive integer, got {size}")
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    x = torch.clamp(127.5 * x + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8).contiguous()                 # [n, H, W, 3]
