"""Token codes extracted once by a frozen tokenizer (``hita extract-codes``) and read back by GPT training.

The reference tokenizes every batch online; extracting once trades augmentation variety for speed:
each image is stored as its deterministic resize / centre crop and (by default) its horizontal flip,
and training picks one of those views per sample and epoch.

File: one safetensors file with ``holistic_ids`` [N, V, Nh], ``patch_ids`` [N, V, Np] (int16 when the
codebook fits, else int32), ``labels`` [N] int64; metadata ``hita_kind = "codes"``, the tokenizer
config (``hita_tokenizer_config``), ``num_classes``, ``views`` and the data description.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hita.config import TokenizerConfig
from hita.data import Augmented, DataError, open_dataset
from hita.data.folder import ImageFolder

CODES_KIND = "codes"
VIEWS_FLIP = ("identity", "hflip")


@dataclass(frozen=True)
class Codes:
    holistic_ids: torch.Tensor  # (N, V, Nh)
    patch_ids: torch.Tensor  # (N, V, Np)
    labels: torch.Tensor  # (N,) int64
    tokenizer_config: TokenizerConfig
    num_classes: int
    views: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    def describe(self) -> str:
        return f"codes of {self.source} ({len(self)} images × {len(self.views)} views, tokenizer {self.tokenizer_config.name!r})"


@torch.no_grad()
def extract_codes(tokenizer: str | os.PathLike, data: str, out: str | os.PathLike, *, preset: str | None = None,
                  backbone: str | None = None, batch_size: int = 64, device: str = "cpu", flip: bool = True,
                  limit: int | None = None, progress: bool = True) -> Path:
    """Tokenize ``data`` with the frozen tokenizer file ``tokenizer`` and write the codes file ``out``.

    Images get the deterministic version of the training transform (centre crop for folders, resize
    for Fashion-MNIST); with ``flip`` their mirror image is tokenized too. Returns ``out``.
    """
    from safetensors.torch import save_file

    from hita.checkpoint import is_hita_safetensors, load_tokenizer
    from hita.util.files import atomic_write, check_output_file

    check_output_file(out, "--out", owned=is_hita_safetensors)  # before any work: never replace a foreign file

    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size})")
    tok = load_tokenizer(tokenizer, preset, backbone=backbone, device=device)
    cfg = tok.cfg
    if cfg.backbone is not None and backbone is None:
        raise ValueError(f"tokenizer {cfg.name!r} encodes with a frozen {cfg.backbone}: pass --backbone PATH")
    ds = open_dataset(data, limit=limit)
    view = Augmented(ds, cfg.image_size, "center" if isinstance(ds, ImageFolder) else "resize")
    loader = torch.utils.data.DataLoader([(i, 0) for i in range(len(ds))], batch_size=batch_size,
                                         collate_fn=lambda keys: keys)
    n_views = 2 if flip else 1
    dtype = torch.int16 if cfg.codebook_size <= 32767 else torch.int32
    hol = torch.empty(len(ds), n_views, cfg.n_holistic, dtype=dtype)
    patch = torch.empty(len(ds), n_views, cfg.n_patch, dtype=dtype)
    labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64)
    i = 0
    for keys in tqdm(loader, desc="extract-codes", unit="batch", disable=not progress):
        x = torch.stack([view[k][0] for k in keys]).to(device)
        for v in range(n_views):
            h, p = tok.encode(x if v == 0 else torch.flip(x, dims=[-1]))
            hol[i:i + len(keys), v] = h.cpu().to(dtype)
            patch[i:i + len(keys), v] = p.cpu().to(dtype)
        i += len(keys)
    meta = {"hita_kind": CODES_KIND, "hita_tokenizer_config": cfg.to_json(), "num_classes": str(ds.num_classes),
            "views": ",".join(VIEWS_FLIP[:n_views]), "source": ds.describe()}
    tensors = {"holistic_ids": hol, "patch_ids": patch, "labels": labels}
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_codes(path: str | os.PathLike) -> Codes:
    """Read a codes file written by ``extract_codes`` (clear errors for anything else)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"codes file {path} does not exist; create it with `hita extract-codes`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable codes file ({str(e)[:120]}); recreate it with `hita extract-codes`") from None
    if meta.get("hita_kind") != CODES_KIND or not {"holistic_ids", "patch_ids", "labels"} <= set(t):
        raise DataError(f"{path} is not a codes file (hita_kind={meta.get('hita_kind')!r}); create one with "
                        "`hita extract-codes` (a tokenizer or GPT checkpoint goes to --tokenizer)")
    tok_cfg = TokenizerConfig.from_dict(json.loads(meta["hita_tokenizer_config"]))
    return Codes(t["holistic_ids"], t["patch_ids"], t["labels"], tok_cfg, int(meta["num_classes"]),
                 tuple(meta["views"].split(",")), meta.get("source", str(path)))


class CodesView(torch.utils.data.Dataset):
    """``view[(index, epoch)] -> (holistic_ids [Nh], patch_ids [Np], label)``, one stored view per
    sample and epoch, drawn from (seed, epoch, index) like the image augmentation."""

    def __init__(self, codes: Codes, seed: int = 0):
        self.codes, self.seed = codes, seed

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = key
        n_views = self.codes.holistic_ids.shape[1]
        v = int(np.random.default_rng((self.seed, epoch, index)).integers(n_views)) if n_views > 1 else 0
        return (self.codes.holistic_ids[index, v].long(), self.codes.patch_ids[index, v].long(),
                int(self.codes.labels[index]))
