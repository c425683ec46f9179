"""Sampling for the shared decode loop: options, a counter-based noise stream, CFG, filters, draws.

Every backend (torch eager, onnxruntime, TensorRT, AOTInductor, the C++ host) hands its logits to the
functions here, so a token is a pure function of (logits, options, seed, step, row). The reference
(spec section 5) samples with ``torch.multinomial`` on a stateful generator; that draw depends on the
device, the batch layout and the torch version, and cannot be replayed from C++. We instead take one
uniform number per row per step from a counter-based hash (:class:`NoiseStream`) and invert the
cumulative distribution (:func:`sample`). Two runtimes that produce equal logits therefore draw equal
tokens, a run can be resumed or split across batches row by row, and the C++ host reproduces the
noise bit for bit with a dozen lines of integer code.

Order of operations per step (rows = the n images; with CFG the executor returned 2n rows)::

    logits  = executor output cast to float32 on the host         # (B, V)
    logits  = apply_cfg(logits, cfg_scale)    if CFG is active    # (2n, V) -> (n, V)
    tokens  = argmax(logits)                  if temperature == 0
    else:
    logits  = logits / max(temperature, 1e-5)
    logits  = filter_logits(logits, top_k, top_p)                 # -inf outside the kept set
    probs   = softmax(logits) in float32
    token   = first index i with cumsum_float64(probs)[i] > u * sum(probs)

Deviation from the reference, on purpose: the reference mixes CFG and applies temperature on bf16
logits when the GPT runs in bf16 (spec 8.6). We upcast to float32 first; bf16 values are exact in
float32, so this only removes rounding, and it makes the arithmetic identical for every backend.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SamplingOptions",
    "NoiseStream",
    "mix64",
    "noise_bits",
    "apply_cfg",
    "filter_logits",
    "sample",
]

_MASK64 = (1 << 64) - 1


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


MAX_CFG_SCALE = 1000.0  # beyond it, scale x (cond - uncond) overflows float32 for logits of ordinary size


@dataclass(frozen=True)
class SamplingOptions:
    """How the loop turns logits into tokens. Defaults are the reference evaluation driver's.

    Fields:
        cfg_scale: classifier-free guidance scale. ``1.0`` = no guidance (no unconditional rows are
            built, exactly like the reference); ``> 1`` = guidance with a ``[cond ; null-class]``
            batch. Values below 1 are rejected: the reference builds the unconditional batch only
            when ``cfg_scale > 1``, so a scale below 1 would silently mean "no guidance" there while
            meaning "interpolate towards unconditional" in the formula. We refuse the ambiguity.
        cfg_interval: ``-1`` = guidance on every step. ``k >= 0`` = guidance at prefill and on decode
            steps ``i <= k`` (``i = pos - 1``), conditional logits alone afterwards (spec 5.4).
        temperature: ``0`` = greedy (argmax); otherwise logits are divided by
            ``max(temperature, 1e-5)``.
        top_k: keep the ``top_k`` largest logits (ties at the k-th value are kept); ``0`` = off.
        top_p: nucleus filtering; ``1.0`` = off.
        seed: key of the :class:`NoiseStream`, an integer in ``[0, 2**64)``.
    """

    cfg_scale: float = 1.5
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.cfg_scale, numbers.Real) or not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")
        if self.cfg_scale > MAX_CFG_SCALE:
            raise ValueError(f"cfg_scale {self.cfg_scale:g} is above {MAX_CFG_SCALE:g}: the guided logits would overflow "
                             "to infinity; useful scales are 1 to about 10")
        if self.cfg_scale < 1.0:
            raise ValueError(
                f"cfg_scale {self.cfg_scale} < 1 is not supported: the reference only builds the "
                "unconditional batch for cfg_scale > 1, so it would mean 'no guidance' there; "
                "use cfg_scale=1.0 for no guidance or a value > 1 for guidance"
            )
        if not _is_int(self.cfg_interval) or self.cfg_interval < -1:
            raise ValueError(
                f"cfg_interval must be an integer >= -1, got {self.cfg_interval!r}; "
                "use -1 for guidance on every step or k >= 0 to stop guidance after decode step k"
            )
        if not isinstance(self.temperature, numbers.Real) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}; "
                "use 0 for greedy decoding or 1.0 for plain sampling"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(
                f"top_k must be an integer >= 0, got {self.top_k!r}; use 0 to disable top-k filtering"
            )
        if not isinstance(self.top_p, numbers.Real) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(
                f"top_p must lie in (0, 1], got {self.top_p!r}; use 1.0 to disable nucleus filtering"
            )
        if not _is_int(self.seed) or not (0 <= self.seed <= _MASK64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def use_cfg(self) -> bool:
        """Whether the loop builds the ``[cond ; null]`` batch (reference: ``cfg_scale > 1``)."""
        return self.cfg_scale > 1.0

    def cfg_active(self, step: int) -> bool:
        """Whether guided logits are used for decode step ``step`` (``= pos - 1``; ``-1`` = prefill).

        Args:
            step: 0-based decode step index; the prefill counts as ``-1`` and is always guided.
        Returns:
            ``True`` when CFG mixing applies, ``False`` when the conditional rows are used alone.
        """
        if not self.use_cfg:
            return False
        return not (self.cfg_interval > -1 and step > self.cfg_interval)


# ----------------------------------------------------------------------------------------------
# Counter-based noise
# ----------------------------------------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, the splitmix64 increment
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """The splitmix64 finaliser on one 64-bit unsigned integer (python int in, python int out).

    Args:
        z: integer in ``[0, 2**64)``.
    Returns:
        ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``
        with every product taken modulo ``2**64``.
    """
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def noise_bits(seed: int, step: int, row: int) -> int:
    """The 64-bit hash behind :meth:`NoiseStream.uniform` for one (seed, step, row) triple.

    Args:
        seed, step, row: integers in ``[0, 2**64)``.
    Returns:
        ``h`` in ``[0, 2**64)``; the uniform number is ``(h >> 11) * 2**-53``.
    """
    g = _GOLDEN
    h = mix64((seed + g) & _MASK64)
    h = mix64(h ^ ((step + 2 * g) & _MASK64))
    return mix64(h ^ ((row + 3 * g) & _MASK64))


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # numpy uint64 array arithmetic wraps modulo 2**64 (no overflow checks on arrays).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


class NoiseStream:
    """Counter-based uniform numbers keyed by ``(seed, step, row)``: no state, any order, any device.

    Exact algorithm (all integers unsigned 64-bit, ``+`` and ``*`` wrap modulo ``2**64``; the C++ host
    mirrors this line by line)::

        G  = 0x9E3779B97F4A7C15
        mix64(z): z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                  z = (z ^ (z >> 27)) * 0x94D049BB133111EB
                  return z ^ (z >> 31)
        h  = mix64(seed + G)
        h  = mix64(h ^ (step + 2*G))        // 2*G = 0x3C6EF372FE94F82A (mod 2**64)
        h  = mix64(h ^ (row  + 3*G))        // 3*G = 0xDAA66D2C7DDF743F (mod 2**64)
        u  = (double)(h >> 11) * 0x1.0p-53  // top 53 bits -> [0, 1), exact in float64

    ``mix64(seed + G)`` is the first output of the public splitmix64 generator seeded with ``seed``
    (for seed 0 it is ``0xE220A8397B1DCDAF``), a handy first check for a port.

    In the decode loop, ``step`` is the sequence index of the token being drawn (0 = first holistic
    token, drawn after the prefill; ``n_holistic + n_patch - 1`` = last patch token) and ``row`` is
    the *global* image index ``row_offset + r``. Keying by the global index means that image ``r`` of
    a batch gets the same noise when generated alone with ``row_offset = r``, so batches can be split
    or merged without changing any image. CFG null rows never draw noise (they reuse the cond token).

    Args:
        seed: integer in ``[0, 2**64)``.
    """

    def __init__(self, seed: int) -> None:
        if not _is_int(seed) or not (0 <= seed <= _MASK64):
            raise ValueError(f"NoiseStream seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = int(seed)
        self._h_seed = np.uint64(mix64((self.seed + _GOLDEN) & _MASK64))

    def bits(self, step: int, rows: int, row_offset: int = 0) -> np.ndarray:
        """Raw 64-bit hashes for rows ``row_offset .. row_offset + rows - 1`` at ``step``.

        Args:
            step: integer in ``[0, 2**64)``.
            rows: number of rows (>= 0).
            row_offset: global index of the first row.
        Returns:
            ``numpy.uint64`` array ``[rows]``.
        """
        for name, v in (("step", step), ("rows", rows), ("row_offset", row_offset)):
            if not _is_int(v) or v < 0:
                raise ValueError(f"NoiseStream.{name} must be a non-negative integer, got {v!r}")
        if step > _MASK64 or row_offset + rows - 1 > _MASK64:
            raise ValueError("NoiseStream step and row indices must be < 2**64")
        g = _GOLDEN
        h = np.full(rows, self._h_seed, dtype=np.uint64)                     # [rows]
        h = _mix64_np(h ^ np.uint64((step + 2 * g) & _MASK64))
        row_ids = np.arange(rows, dtype=np.uint64) + np.uint64(row_offset)   # [rows]
        return _mix64_np(h ^ (row_ids + np.uint64((3 * g) & _MASK64)))

    def uniform(self, step: int, rows: int, row_offset: int = 0) -> torch.Tensor:
        """Uniform numbers in ``[0, 1)`` for rows ``row_offset .. row_offset + rows - 1`` at ``step``.

        Args:
            step: sequence index of the token being drawn.
            rows: number of rows.
            row_offset: global index of the first row (default 0).
        Returns:
            float64 CPU tensor ``[rows]``, each value a multiple of ``2**-53``.
        """
        top53 = self.bits(step, rows, row_offset) >> np.uint64(11)           # [rows] < 2**53
        return torch.from_numpy(top53.astype(np.float64) * (2.0 ** -53))


# ----------------------------------------------------------------------------------------------
# Logit transforms and the draw
# ----------------------------------------------------------------------------------------------


def apply_cfg(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance mix: ``uncond + scale * (cond - uncond)``.

    Args:
        logits: ``[2n, V]``, conditional rows first, then the null-class rows (same order).
        scale: guidance scale.
    Returns:
        ``[n, V]`` in the dtype of ``logits`` (the loop passes float32).
    """
    if logits.dim() != 2 or logits.shape[0] % 2:
        raise ValueError(f"apply_cfg expects logits [2n, V] with cond rows first, got {tuple(logits.shape)}")
    cond, uncond = logits.chunk(2, dim=0)  # [n, V] each
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF-style top-k then top-p (nucleus) filtering; removed entries become ``-inf``.

    top-k keeps every logit ``>=`` the k-th largest (so ties at the boundary are kept). top-p sorts
    the remaining logits descending (stable: among equal logits the lower token id comes first),
    takes the float32 cumulative softmax and removes a token when the mass *before* it already
    exceeds ``top_p``; the most likely token is always kept. This is the classic rule used by the
    reference (LlamaGen's ``top_k_top_p_filtering``).

    Args:
        logits: ``[n, V]`` float.
        top_k: ``0`` = off.
        top_p: ``1.0`` = off.
    Returns:
        ``[n, V]`` filtered copy (the input is not modified).
    """
    if top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]                  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # [n, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)            # [n, V]
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token that crosses top_p
        remove[..., 0] = False
        mask = remove.scatter(-1, sorted_idx, remove)                         # back to vocab order
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def sample(logits: torch.Tensor, opts: SamplingOptions, u: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Draw one token per row by inverting the cumulative distribution at a given uniform.

    Inverse-CDF with one counter-based uniform per row and step (instead of ``torch.multinomial``)
    makes the draw a pure function of (logits, options, u): two runtimes with equal logits draw
    equal tokens, and the C++ host can mirror it. The cumulative sum runs sequentially in float64
    over the float32 probabilities in vocab order, so only a uniform that falls within rounding
    distance of a bucket edge could pick a neighbouring token in another implementation.

    Args:
        logits: ``[n, V]`` (guided if CFG applies); any float dtype, cast to float32 on its own
            device: the draw runs where the logits are (the same ops on CPU and CUDA).
        opts: temperature / top-k / top-p.
        u: float64 ``[n]`` uniforms in ``[0, 1)`` (from :meth:`NoiseStream.uniform`), moved to the
            logits' device.
        check: raise on rows without finite mass (a host sync on a GPU: the loop checks once per
            sequence there instead).
    Returns:
        int64 ``[n]`` on the logits' device. ``temperature == 0`` returns ``argmax`` (first maximum)
        and ignores ``u``.
    Raises:
        FloatingPointError: when a row has no finite probability mass (NaN/inf logits).
    """
    logits = logits.detach().float()                                          # [n, V]
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits [n, V], got {tuple(logits.shape)}")
    if opts.temperature == 0:
        return logits.argmax(dim=-1)                                          # [n]
    u = torch.as_tensor(u, dtype=torch.float64).to(logits.device).reshape(-1)  # [n]
    if u.shape[0] != logits.shape[0]:
        raise ValueError(f"sample got {u.shape[0]} uniforms for {logits.shape[0]} rows")
    logits = logits / max(opts.temperature, 1e-5)
    logits = filter_logits(logits, opts.top_k, opts.top_p)
    probs = torch.softmax(logits, dim=-1)                                     # [n, V] float32
    cdf = probs.double().cumsum(dim=-1)                                       # [n, V] float64
    total = cdf[:, -1:]                                                       # [n, 1]
    if check and (not bool(torch.isfinite(total).all()) or bool((total <= 0).any())):
        bad = int((~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0)).nonzero()[0, 0])
        raise FloatingPointError(
            f"row {bad} has no finite probability mass after softmax; the executor returned "
            "NaN or infinite logits (check the model dtype/weights, or run the eager executor)"
        )
    target = u[:, None] * total                                               # [n, 1]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]                   # first cdf > target
    # u * total can round up to total itself; then take the last token with non-zero probability.
    last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1)                   # [n]
    return torch.minimum(idx, last)
