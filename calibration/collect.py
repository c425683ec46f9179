"""Collect a calibration set from the generator's own sampling runs (``hita calibrate``).

Why the loop's own runs: static quantization fixes one scale per tensor from the activations it is
shown. Random inputs (standard-normal caches, uniform tokens) produce activation ranges the deployed
model never sees; the tokens a guided sampler draws, the null-class rows of CFG and the caches they
build do. So the eager executor is driven through the one decode loop
(:func:`~hita.runtimes.loop.generate_tokens`, with the same sampling options and shared noise as any
deployment) behind a :class:`RecordingExecutor` that keeps what each graph is fed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hita.config import check_pair
from hita.runtimes.executor import StepExecutor

from .dataset import CalibrationError, check_writable, estimate_bytes, save_set
from .options import MiB, CollectOptions

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["RecordingExecutor", "collect", "probe_positions"]


def probe_positions(seq_len: int, count: int) -> list[int]:
    """``count`` decode positions spread over ``1 .. seq_len - 1`` (both ends included)."""
    last = seq_len - 1
    return sorted({round(1 + i * (last - 1) / max(count - 1, 1)) for i in range(count)})


def _cache_views(executor: StepExecutor) -> list[torch.Tensor]:
    """The executor's KV cache as ``[k0, v0, k1, v1, ...]``, each ``[B, H, S, hd]``, through its
    public ``kv_cache()`` (``TorchExecutor`` and ``OrtExecutor`` both have one, same order)."""
    read = getattr(executor, "kv_cache", None)
    if read is None:
        raise TypeError(f"{executor.name}: cannot read its KV cache; collect with the eager executor")
    return list(read())


class RecordingExecutor(StepExecutor):
    """Wraps an executor and records, for one loop run, what the GPT graphs are fed.

    Records the prefill's class ids (null-class rows included), the token fed at every decode
    position, the logits at ``probes`` and the cache after the last position. Delegates everything
    else, so the loop (and its sampling) runs exactly as it would on ``inner``.
    """

    def __init__(self, inner: StepExecutor, probes: list[int]) -> None:
        self.inner = inner
        self.gpt_config = inner.gpt_config
        self.tokenizer_config = inner.tokenizer_config
        self.name = f"{inner.name}+recording"
        self.device = inner.device
        self.max_rows = inner.max_rows
        self.batch_buckets = inner.batch_buckets
        self.kv_itemsize = inner.kv_itemsize
        self.probes = set(probes)
        self.class_ids: torch.Tensor | None = None
        self.fed: torch.Tensor | None = None
        self.probe_logits: dict[int, torch.Tensor] = {}
        self.final_cache: list[torch.Tensor] | None = None

    def start(self, batch: int) -> None:
        self.inner.start(batch)
        self.fed = torch.full((batch, self.gpt_config.seq_len - 1), -1, dtype=torch.int64)   # [B, L-1]
        self.class_ids, self.final_cache, self.probe_logits = None, None, {}

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        self.class_ids = class_ids.detach().to("cpu", torch.int64).clone()                    # [B]
        return self.inner.prefill(class_ids)

    def decode(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        assert self.fed is not None, "start() first"
        self.fed[:, pos - 1] = tokens.detach().to("cpu", torch.int64)
        logits = self.inner.decode(tokens, pos)                                                # [B, V]
        if pos in self.probes:
            self.probe_logits[pos] = logits.detach().to("cpu", torch.float32).clone()
        if pos == self.gpt_config.seq_len - 1:
            self.final_cache = [t.detach().to("cpu", torch.float32).clone() for t in _cache_views(self.inner)]
        return logits

    def decode_image(self, holistic_ids: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.decode_image(holistic_ids, patch_ids)


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["hita"] = metadata.version("hita")
    except metadata.PackageNotFoundError:
        pass
    return out


def collect(
    gpt: "HitaGPT",
    tokenizer: "HitaTokenizer",
    out: str | os.PathLike,
    options: CollectOptions,
    *,
    pos128: str = "reference",
    checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> Path:
    """Sample ``options.images`` images with the eager executor and save what the graphs saw.

    Every check (output path, class ids, size budget) runs before sampling; the set is written in
    one atomic step at the end, so an interrupted run leaves nothing behind.

    Args:
        gpt, tokenizer: the models (moved to float32 CPU and eval mode in place, as the executor does).
        out: the set's file (``.safetensors``); replaced only when it is a calibration set.
        options: what to sample and keep (:class:`CollectOptions`).
        pos128: the position-128 rule; a set only calibrates exports made with the same rule.
        checkpoints: ``{"gpt": path, "tokenizer": path}``, hashed into the manifest.
        progress: ``True`` for a bar over all runs, or ``f(done_steps, total_steps)``.
    Returns:
        ``out`` as a ``Path``.
    Raises:
        CalibrationError / ValueError: bad options, classes, budget or output path.
    """
    from hita.runtimes.loop import generate_tokens
    from hita.runtimes.torch_eager import TorchExecutor
    from hita.util.files import file_sha256

    check_pair(tokenizer.cfg, gpt.cfg)
    out = check_writable(out)
    cfg = gpt.cfg
    classes = options.class_list(cfg.num_classes)
    opts = options.sampling()
    rows = options.batch_images * (2 if opts.use_cfg else 1)
    need = estimate_bytes(cfg, tokenizer.cfg, options, rows)
    if need > options.max_bytes:
        raise CalibrationError(
            f"the set needs {need / MiB:.0f} MiB ({options.images} images, {rows} rows per run, final KV caches "
            f"of {cfg.name}) but the budget is {options.max_bytes / MiB:.0f} MiB; lower --images or raise --max-mib"
        )
    hashes = {k: (file_sha256(p) if p else None) for k, p in (checkpoints or {}).items()}
    executor = TorchExecutor(gpt, tokenizer, dtype=torch.float32, pos128=pos128)
    L, nb = cfg.seq_len, options.batches
    probes = probe_positions(L, options.probe_positions)
    rec = RecordingExecutor(executor, probes)
    bar = _bar(progress, nb * L)
    fed, prefill_ids, caches, images = [], [], [], []
    probe_logits: list[torch.Tensor] = []
    try:
        for b in range(nb):
            ids = classes[b * options.batch_images:(b + 1) * options.batch_images]
            result = generate_tokens(rec, ids, opts, progress=bar.step if bar else False,
                                     row_offset=b * options.batch_images)
            assert rec.fed is not None and rec.final_cache is not None and rec.class_ids is not None
            n = len(ids)
            # The loop feeds each image's sampled token to its conditional and its null row alike.
            assert torch.equal(rec.fed[:n], result.tokens[:, :-1]), "recorded feeds differ from the sampled tokens"
            fed.append(rec.fed)
            prefill_ids.append(rec.class_ids)
            caches.append(rec.final_cache)
            images.append(result)
            if b == 0:
                probe_logits = [rec.probe_logits[p] for p in probes]
    finally:
        if bar:
            bar.close()
    tensors: dict[str, torch.Tensor] = {
        "class_ids": torch.tensor(classes, dtype=torch.int64),
        "prefill.class_ids": torch.stack(prefill_ids),                                   # [nb, B]
        "decode.tokens": torch.stack(fed),                                               # [nb, B, L-1]
        "decoder.holistic_ids": torch.cat([r.holistic_ids for r in images]),             # [N, Nh]
        "decoder.patch_ids": torch.cat([r.patch_ids for r in images]),                   # [N, Np]
        "probe.positions": torch.tensor(probes, dtype=torch.int64),                      # [P]
        "probe.logits": torch.stack(probe_logits),                                       # [P, B, V]
    }
    for i in range(cfg.n_layer):
        for j, kind in enumerate(("key", "value")):
            tensors[f"decode.cache.{i}.{kind}"] = torch.stack([c[2 * i + j] for c in caches])  # [nb, B, H, S, hd]
    manifest: dict[str, Any] = {
        "gpt_preset": cfg.name, "gpt_config": cfg.to_dict(),
        "tokenizer_preset": tokenizer.cfg.name, "tokenizer_config": tokenizer.cfg.to_dict(),
        "pos128": pos128, "checkpoints": hashes, "options": options.to_dict(),
        "runs": nb, "rows": rows, "images": options.images, "sampling": "eager float32 through runtimes.loop",
        "versions": _versions(),
    }
    return save_set(out, tensors, manifest)


class _Bar:
    """One tqdm bar (or a user callback) over every step of every run."""

    def __init__(self, progress: bool | Callable[[int, int], None], total: int) -> None:
        self.total, self.done = total, 0
        self.fn = progress if callable(progress) else None
        self.tqdm = None
        if progress is True:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, desc="calibration steps", unit="step")

    def step(self, _done: int, _total: int) -> None:
        self.done += 1
        if self.tqdm is not None:
            self.tqdm.update(1)
        if self.fn is not None:
            self.fn(self.done, self.total)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _bar(progress: bool | Callable[[int, int], None], total: int) -> _Bar | None:
    return _Bar(progress, total) if progress else None
