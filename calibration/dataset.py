"""A calibration set on disk: one safetensors file whose metadata holds the set's own manifest.

Why one file: a set is written with :func:`hita.util.files.atomic_write` (temp file, fsync, rename),
so a reader sees the old set or the new one, never half of one, and there is no folder to replace.

What it holds (``nb`` runs of ``B`` rows each; with guidance ``B = 2 * batch_images``, conditional
rows first; ``L`` = sequence length, ``N`` = images):

- ``prefill.class_ids`` int64 ``[nb, B]``: what the prefill graph was fed, null-class rows included;
- ``decode.tokens`` int64 ``[nb, B, L - 1]``: the token fed at every decode position ``p = 1..L-1``
  (column ``p - 1``);
- ``decode.cache.{i}.key|value`` float32 ``[nb, B, H, S, hd]``: each run's KV cache after its last
  step. The static cache is written one slot per position and starts from zeros, so the cache the
  decode step saw at position ``p`` is this one with slots ``p..S-1`` zeroed. One cache per run thus
  gives the exact decode-step inputs at *all* positions (:meth:`CalibrationSet.decode_feed`);
- ``decoder.holistic_ids`` ``[N, Nh]`` / ``decoder.patch_ids`` ``[N, Np]``: the token grids the decoder
  turns into images;
- ``probe.positions`` ``[P]`` / ``probe.logits`` float32 ``[P, B, V]``: eager logits of run 0 at a
  few positions: a fingerprint of the weights, checked against the graph being quantized.

The manifest (metadata key ``hita_calibration``) records the configs, the pos128 rule, the source
checkpoints' sha256, the options, the shapes and the sha256 of every tensor's bytes (a flipped bit
in the data is caught, not only a broken header).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from hita.config import GPTConfig, TokenizerConfig

from .options import CollectOptions

__all__ = ["CalibrationSet", "CalibrationError", "FORMAT", "FORMAT_VERSION", "estimate_bytes", "save_set",
           "load_set", "check_writable"]

FORMAT = "hita-calibration"
FORMAT_VERSION = 1
META_KEY = "hita_calibration"
_FIX = "collect it again with `hita calibrate --out SET`"


class CalibrationError(ValueError):
    """A calibration set that cannot be used: unreadable, damaged, from another model, too small.
    A ``ValueError``, so the CLI prints its one line and exits 2."""


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def estimate_bytes(gpt_cfg: GPTConfig, tok_cfg: TokenizerConfig, opts: CollectOptions, rows: int) -> int:
    """Bytes a set with these options will hold (the tensors; the header is a few KB)."""
    nb, L = opts.batches, gpt_cfg.seq_len
    cache = 2 * gpt_cfg.n_layer * nb * rows * gpt_cfg.n_head * gpt_cfg.cache_len * gpt_cfg.head_dim * 4
    tokens = nb * rows * (L - 1) * 8 + nb * rows * 8 + opts.images * (L + 1) * 8
    probes = opts.probe_positions * (rows * gpt_cfg.vocab_size * 4 + 8)
    return cache + tokens + probes


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a set path that is a folder or a file that is not a calibration set.

    Raises:
        CalibrationError: the path cannot be replaced safely.
    """
    p = Path(path)
    if p.is_dir():
        raise CalibrationError(f"{p}: is a folder; give a file path for the set, such as {p / 'calib.safetensors'}")
    if p.exists() and not _is_set(p):
        raise CalibrationError(f"{p}: exists and is not a hita calibration set; refusing to overwrite it; "
                               "choose a new file")
    if not p.parent.exists():
        raise CalibrationError(f"{p.parent}: no such folder; create it first")
    if not os.access(p.parent, os.W_OK):
        raise CalibrationError(f"{p.parent}: not writable; choose a writable folder")
    return p


def _is_set(p: Path) -> bool:
    """Whether ``p`` is a safetensors file carrying a calibration manifest (header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not a set
        return False


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """A loaded set: its manifest and tensors, and the graph feeds they give.

    Fields:
        path: where it was read from.
        manifest: the set's manifest (JSON-native dict).
        tensors: name -> CPU tensor (see the module docstring).
    """

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    # -- facts ---------------------------------------------------------------------------------

    @property
    def gpt_cfg(self) -> GPTConfig:
        return GPTConfig.from_dict(self.manifest["gpt_config"])

    @property
    def tokenizer_cfg(self) -> TokenizerConfig:
        return TokenizerConfig.from_dict(self.manifest["tokenizer_config"])

    @property
    def options(self) -> CollectOptions:
        return CollectOptions.from_dict(self.manifest["options"])

    @property
    def runs(self) -> int:
        return int(self.tensors["decode.tokens"].shape[0])

    @property
    def rows(self) -> int:
        return int(self.tensors["decode.tokens"].shape[1])

    @property
    def images(self) -> int:
        return int(self.tensors["decoder.holistic_ids"].shape[0])

    @property
    def positions(self) -> int:
        """Decode positions per run (``L - 1``)."""
        return int(self.tensors["decode.tokens"].shape[2])

    # -- feeds ---------------------------------------------------------------------------------

    def decode_feed(self, run: int, pos: int, names: list[str], row_positions: bool = False) -> dict[str, np.ndarray]:
        """The exact decode-step inputs of run ``run`` at position ``pos``.

        Args:
            names: the decode step's input names (``token``, ``position``, then the cache inputs in
                ``past_key_values.{i}.key, .value`` order).
            row_positions: the step takes one position per row (``position [B]``, every row at ``pos``).
        """
        if not 1 <= pos <= self.positions:
            raise ValueError(f"position {pos} outside 1..{self.positions}")
        tokens = self.tensors["decode.tokens"][run, :, pos - 1].numpy().copy()
        feed = {names[0]: tokens, names[1]: np.full((len(tokens) if row_positions else 1,), pos, dtype=np.int64)}
        n_layer = (len(names) - 2) // 2
        for i in range(n_layer):
            for j, kind in enumerate(("key", "value")):
                cache = self.tensors[f"decode.cache.{i}.{kind}"][run].numpy().copy()   # [B, H, S, hd]
                cache[:, :, pos:, :] = 0.0   # slots written at positions >= pos did not exist yet
                feed[names[2 + 2 * i + j]] = cache
        return feed

    def decode_points(self, max_feeds: int) -> list[tuple[int, int]]:
        """``(run, position)`` pairs: every position of every run, or at most ``max_feeds`` of them
        spread evenly over positions (holistic and patch ranges alike) and runs."""
        everything = [(r, p) for r in range(self.runs) for p in range(1, self.positions + 1)]
        if len(everything) <= max_feeds:
            return everything
        idx = np.linspace(0, len(everything) - 1, max_feeds).round().astype(int)
        return [everything[i] for i in sorted(set(idx.tolist()))]

    def prefill_feed(self, run: int) -> dict[str, np.ndarray]:
        return {"class_ids": self.tensors["prefill.class_ids"][run].numpy().copy()}

    def decoder_feeds(self) -> list[dict[str, np.ndarray]]:
        """Token grids in batches of ``batch_images`` (one fixed shape)."""
        per = self.options.batch_images
        h, p = self.tensors["decoder.holistic_ids"], self.tensors["decoder.patch_ids"]
        return [{"holistic_ids": h[a:a + per].numpy().copy(), "patch_ids": p[a:a + per].numpy().copy()}
                for a in range(0, self.images, per)]

    def probes(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(position, eager logits [B, V])`` of run 0."""
        for pos, logits in zip(self.tensors["probe.positions"].tolist(), self.tensors["probe.logits"]):
            yield int(pos), logits.numpy()


# ----------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------


def save_set(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> Path:
    """Write tensors + manifest (tensor hashes and shapes filled in here) atomically to ``path``."""
    from safetensors.torch import save_file

    from hita.util.files import atomic_write

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    full = {
        **manifest,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                        "sha256": _tensor_sha256(v)} for k, v in tensors.items()},
    }
    meta = {META_KEY: json.dumps(full, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


_REQUIRED = ("prefill.class_ids", "decode.tokens", "decoder.holistic_ids", "decoder.patch_ids",
             "probe.positions", "probe.logits", "class_ids")


def load_set(path: str | os.PathLike, verify: bool = True) -> CalibrationSet:
    """Read and check a set.

    Args:
        verify: hash every tensor against the manifest (``False``: header and shapes only).
    Raises:
        CalibrationError: missing, unreadable, not a set, another format version, or damaged.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no such calibration set; create it with `hita calibrate --out {p}`")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise CalibrationError(f"{p}: a safetensors file but not a hita calibration set; {_FIX}")
            manifest = json.loads(meta[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"{p}: not a readable calibration set ({first}); {_FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CalibrationError(f"{p}: not a hita calibration set; {_FIX}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{p}: calibration set format {manifest.get('format_version')!r}, this hita reads "
                               f"{FORMAT_VERSION}; {_FIX}")
    listed = manifest.get("tensors", {})
    missing = sorted((set(listed) | set(_REQUIRED)) - set(tensors))
    extra = sorted(set(tensors) - set(listed))
    if missing or extra:
        raise CalibrationError(f"{p}: tensors missing {missing[:4]} or unlisted {extra[:4]} (damaged set); {_FIX}")
    for name, entry in listed.items():
        t = tensors[name]
        if list(t.shape) != entry.get("shape"):
            raise CalibrationError(f"{p}: tensor {name} has shape {list(t.shape)}, manifest says "
                                   f"{entry.get('shape')} (damaged set); {_FIX}")
        if verify and _tensor_sha256(t) != entry.get("sha256"):
            raise CalibrationError(f"{p}: tensor {name} does not match its sha256 (the file changed after it "
                                   f"was written); {_FIX}")
    try:
        s = CalibrationSet(p, manifest, tensors)
        s.gpt_cfg, s.tokenizer_cfg, s.options  # noqa: B018 - parse now: a bad manifest fails here, in one line
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{p}: invalid manifest ({e}); {_FIX}") from None
    return s
