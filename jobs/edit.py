"""Zero-shot style transfer and in-painting through any runtime, written as PNGs plus a side-by-side grid.

Encoding always runs the PyTorch tokenizer (no runtime exports an encoder); the GPT steps and the
pixel decoder run on the chosen executor, so an ONNX Runtime or AOTInductor export edits images the
same way eager PyTorch does. The token plans and image checks live in :mod:`hita.edit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hita.edit.images import LoadedImage, cell_mask, load_image, load_mask
from hita.edit.tokens import mix_holistic, patch_regen_mask
from hita.runtimes.executor import StepExecutor
from hita.runtimes.loop import decode_one_token, prefill, to_uint8
from hita.runtimes.sampling import NoiseStream, SamplingOptions, sample
from hita.util.images import save_grid, save_pngs

__all__ = ["EditModels", "encode_images", "style_transfer", "inpaint_tokens", "inpaint", "style_transfer_job",
           "inpaint_job", "load_edit_models", "HOLISTIC_MODES"]

HOLISTIC_MODES = ("encode", "sample")


@dataclass(frozen=True, eq=False)
class EditModels:
    """The PyTorch tokenizer (to encode) and the executor (GPT steps and decoding)."""

    tokenizer: torch.nn.Module
    executor: StepExecutor
    class_names: tuple[str, ...] | None = None


def load_edit_models(runtime, *, gpt=None, tokenizer=None, artifacts=None, device: str = "cpu",
                     expect_manifest_sha256: str | None = None) -> EditModels:
    """The tokenizer that encodes (``tokenizer``, else the embedded default) and the executor of ``runtime``.

    Artifact runtimes take ``artifacts``; their decoder must come from the same tokenizer, which is
    checked against the manifest's recorded checkpoint hash.
    """
    from hita.checkpoint import load_tokenizer
    from hita.jobs.sources import resolve_checkpoints
    from hita.runtimes.factory import ARTIFACT_RUNTIMES, Runtime, make_executor
    from hita.util.files import file_sha256

    runtime = Runtime(runtime)
    if runtime in ARTIFACT_RUNTIMES:
        if gpt is not None:
            raise ValueError(f"--runtime {runtime.value} runs --artifacts; --gpt is for the torch runtime")
        if artifacts is None:
            raise ValueError(f"the {runtime.value} runtime needs --artifacts DIR (made by `hita export`)")
        from hita.assets import default_model
        from hita.export.manifest import load_manifest

        tok_path = Path(tokenizer) if tokenizer is not None else default_model().tokenizer
        recorded = load_manifest(artifacts, verify_files=False, expect_sha256=expect_manifest_sha256).checkpoints.get("tokenizer")
        if recorded is not None and recorded != file_sha256(tok_path):
            raise ValueError(f"{artifacts} was exported from another tokenizer than {tok_path}; pass --tokenizer with "
                             "the checkpoint the artifacts were exported from (encoding runs in PyTorch)")
        ex = make_executor(runtime, artifacts=artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
        names = None
    else:
        if artifacts is not None:
            raise ValueError("--artifacts runs with an artifact runtime (--runtime onnxruntime, aoti or tensorrt)")
        gpt, tok_path, names = resolve_checkpoints(gpt, tokenizer)
        ex = make_executor(runtime, gpt=gpt, tokenizer=tok_path, device=device)
    if names is None and ex.gpt_config.num_classes == 10:
        from hita.data.fashion_mnist import CLASSES

        names = CLASSES
    return EditModels(load_tokenizer(tok_path, device=device), ex, names)


def check_pair(models: EditModels) -> None:
    """The executor must decode with the same tokenizer config that encodes."""
    ex_cfg = models.executor.tokenizer_config
    if ex_cfg is None:
        raise ValueError(f"{models.executor.name} has no tokenizer decoder; use artifacts exported with the decoder")
    if ex_cfg != models.tokenizer.cfg:
        raise ValueError(f"the runtime decodes with tokenizer {ex_cfg.name!r} but --tokenizer is {models.tokenizer.cfg.name!r}; "
                         "pass the tokenizer the artifacts were exported from")


@torch.no_grad()
def encode_images(tok, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (S, S, 3) images -> holistic ids (B, Nh), patch ids (B, Np)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    dev = next(tok.parameters()).device
    return tok.encode(x.to(dev))


def _decode(ex: StepExecutor, hol: torch.Tensor, patch: torch.Tensor) -> np.ndarray:
    return to_uint8(ex.decode_image(hol.cpu(), patch.cpu()).float().cpu()).numpy()


def style_transfer(models: EditModels, content: np.ndarray, style: np.ndarray,
                   slots: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Patch tokens of ``content`` + holistic tokens of ``style`` (all, or ``slots``), decoded.

    Returns uint8 images: ``result``, and the two reconstructions (``content_recon``, ``style_recon``)
    that show what the tokenizer keeps of each input.
    """
    check_pair(models)
    hol, patch = encode_images(models.tokenizer, [content, style])        # (2, Nh), (2, Np)
    mixed = mix_holistic(hol[:1], hol[1:], slots)
    out = _decode(models.executor, torch.cat([mixed, hol]), torch.cat([patch[:1], patch]))
    return {"result": out[0], "content_recon": out[1], "style_recon": out[2]}


def inpaint_tokens(executor: StepExecutor, holistic: torch.Tensor, patch: torch.Tensor, regen: torch.Tensor,
                   class_id: int | None, opts: SamplingOptions, row_offset: int = 0) -> torch.Tensor:
    """Keep the given tokens and let the GPT draw those where ``regen`` is True, in sequence order.

    Args:
        holistic, patch: int64 (n, Nh), (n, Np): known tokens (values at regenerated places are ignored).
        regen: bool (Nh + Np,): sequence positions to draw.
        class_id: the class to condition on, or None for the null class (unconditional, no guidance).
        opts: sampling options; guidance (``cfg_scale > 1``) needs a class.
        row_offset: noise row of the first image (image ``r`` draws row ``row_offset + r``).
    Returns:
        int64 (n, Nh + Np) tokens.
    """
    cfg = executor.gpt_config
    n = holistic.shape[0]
    if class_id is None:
        if opts.use_cfg:
            raise ValueError("guidance (--cfg-scale > 1) needs --class; pass a class or --cfg-scale 1")
        ids = torch.full((n,), cfg.null_class, dtype=torch.long)
    else:
        if not 0 <= class_id < cfg.num_classes:
            raise ValueError(f"--class {class_id} out of range [0, {cfg.num_classes}) for this GPT")
        ids = torch.full((n,), class_id, dtype=torch.long)
    rows = n * (2 if opts.use_cfg else 1)
    if executor.max_rows is not None and rows > executor.max_rows:
        raise ValueError(f"{executor.name} runs at most {executor.max_rows} rows; ask for fewer --samples")
    seq = torch.cat([holistic, patch], dim=1).to(torch.long).cpu().clone()  # (n, L)
    last = int(torch.nonzero(regen).max()) if regen.any() else -1
    noise = NoiseStream(opts.seed)
    logits = prefill(executor, ids, opts)                                       # (n, V), host float32
    for t in range(last + 1):
        if t > 0:
            logits = decode_one_token(executor, seq[:, t - 1], t, opts)
        if regen[t]:
            seq[:, t] = sample(logits, opts, noise.uniform(t, n, row_offset))
    return seq


def inpaint(models: EditModels, image: np.ndarray, coverage: np.ndarray, class_id: int | None,
            opts: SamplingOptions, samples: int = 4, holistic: str = "sample") -> dict[str, np.ndarray]:
    """Fill the masked region of ``image`` ``samples`` times.

    Args:
        image: uint8 (S, S, 3); coverage: float (S, S) mask coverage (> 0 = fill).
        holistic: ``sample`` (default) lets the GPT draw the holistic tokens too, so the global
            appearance they carry fits the filled image; ``encode`` keeps the holistic tokens of the
            image (the hole is filled with the visible part's mean grey first, so they describe the
            visible part, and the fill inherits that grey).
    Returns:
        ``raw`` uint8 (samples, S, S, 3) decoded results, ``composite`` (known pixels pasted back),
        ``masked`` the input with the hole shown grey, ``recon`` the tokenizer's reconstruction.
    """
    check_pair(models)
    if holistic not in HOLISTIC_MODES:
        raise ValueError(f"--holistic must be one of {', '.join(HOLISTIC_MODES)}, got {holistic!r}")
    if samples < 1 or samples > 64:
        raise ValueError(f"--samples must be in 1..64 (got {samples})")
    tok_cfg = models.tokenizer.cfg
    hole = coverage > 0
    fill = image[~hole].mean(0) if (~hole).any() else np.full(3, 128.0)
    masked = image.copy()
    masked[hole] = fill.astype(np.uint8)
    hol, patch = encode_images(models.tokenizer, [masked, image])
    regen_patch = patch_regen_mask(torch.from_numpy(cell_mask(coverage, tok_cfg.grid)), tok_cfg.shift_k)
    regen = torch.cat([torch.full((tok_cfg.n_holistic,), holistic == "sample"), regen_patch])
    seq = inpaint_tokens(models.executor, hol[:1].expand(samples, -1), patch[:1].expand(samples, -1), regen,
                         class_id, opts)
    nh = tok_cfg.n_holistic
    raw = _decode(models.executor, seq[:, :nh], seq[:, nh:])
    recon = _decode(models.executor, hol[1:], patch[1:])[0]
    keep = ~hole[None, :, :, None]
    composite = np.where(keep, image[None], raw).astype(np.uint8)
    shown = masked.copy()
    shown[hole] = 128
    return {"raw": raw, "composite": composite, "masked": shown, "recon": recon,
            "regenerated_tokens": regen.numpy()}


# ----------------------------------------------------------------------------------------------
# Jobs: files in, files out
# ----------------------------------------------------------------------------------------------


def _visible(images: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Grids of tiny images are unreadable: repeat pixels (nearest) until a side reaches ``min_side``."""
    k = max(1, -(-min_side // images.shape[1]))
    return images.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else images


def _prepare_out(out: str | Path, kind: str) -> Path:
    """Create ``out`` marked as ``kind``'s; a folder holding files hita did not write is refused."""
    from hita.jobs.generate import check_output_dir

    return check_output_dir(out, create=True, kind=kind)


def style_transfer_job(models: EditModels, content: str | Path, style: str | Path, out: str | Path,
                       slots: Sequence[int] | None = None) -> tuple[list[Path], list[str]]:
    """Read two PNGs, write ``stylized.png`` and ``grid.png`` (content | style | result) into ``out``.

    Returns the paths written and notes about the inputs (resizes)."""
    size = models.tokenizer.cfg.image_size
    c: LoadedImage = load_image(content, size, "content")
    s: LoadedImage = load_image(style, size, "style")
    out = _prepare_out(out, "style-transfer")
    res = style_transfer(models, c.pixels, s.pixels, slots)
    paths = save_pngs(res["result"][None], out, ["stylized.png"])
    grid = np.stack([c.pixels, s.pixels, res["content_recon"], res["style_recon"], res["result"]])
    paths.append(save_grid(_visible(grid), out / "grid.png", nrow=5,
                           labels=["content", "style", "content rec", "style rec", "stylized"]))
    return paths, [n for n in (c.note, s.note) if n]


def inpaint_job(models: EditModels, image: str | Path, mask: str | Path, out: str | Path, class_id: int | None,
                opts: SamplingOptions, samples: int = 4, holistic: str = "sample") -> tuple[list[Path], list[str]]:
    """Read an image and a mask, write ``inpainted_K.png`` (known pixels kept) and ``grid.png``."""
    size = models.tokenizer.cfg.image_size
    n_classes = models.executor.gpt_config.num_classes
    if class_id is not None and not 0 <= class_id < n_classes:
        raise ValueError(f"--class {class_id} out of range [0, {n_classes}) for this GPT")
    img = load_image(image, size, "image")
    coverage = load_mask(mask, img.native, size)
    out = _prepare_out(out, "inpaint")
    res = inpaint(models, img.pixels, coverage, class_id, opts, samples, holistic)
    paths = save_pngs(res["composite"], out, [f"inpainted_{k}.png" for k in range(samples)])
    paths += save_pngs(res["raw"], out, [f"inpainted_{k}_raw.png" for k in range(samples)])
    grid = np.concatenate([np.stack([img.pixels, res["masked"], res["recon"]]), res["composite"]])
    labels = ["image", "masked", "recon"] + [f"fill {k}" for k in range(samples)]
    paths.append(save_grid(_visible(grid), out / "grid.png", nrow=len(grid), labels=labels))
    return paths, [n for n in (img.note,) if n]
