"""The main job on the embedded default model: export → generate through ONNX Runtime → parity.

This is what `hita demo` runs on a fresh machine, offline, on the CPU. The export is cached: an
existing artifacts folder is reused only when its manifest verifies (every file's sha256) and records
the embedded checkpoints' hashes; anything else is re-exported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hita.runtimes.parity import ParityReport
from hita.util.files import claim_folder


@dataclass(frozen=True)
class DemoResult:
    artifacts: Path
    exported: bool          # False: the cached export was reused
    grid: Path
    images: int
    parity: ParityReport
    seconds: float


def _cached(artifacts: Path, gpt: Path, tok: Path) -> bool:
    from hita.export.errors import ArtifactError
    from hita.export.manifest import load_manifest
    from hita.jobs.sources import exported_from

    try:
        m = load_manifest(artifacts, expect_engine="onnx")
    except ArtifactError:
        return False
    return exported_from(m, gpt, tok)


def _old_demo(folder: Path) -> bool:
    """A demo folder from before run markers: only its grid and its verified ONNX export."""
    from hita.export.manifest import is_hita_folder

    names = {e.name for e in folder.iterdir()}
    return names <= {"grid.png", "artifacts-onnx"} and is_hita_folder(folder / "artifacts-onnx")


def run_demo(
    out_dir: str | Path = "out/demo",
    per_class: int = 8,
    seed: int = 0,
    cfg_scale: float = 3.0,
    scale: int = 4,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Export the default model (if needed), draw a labelled grid (one row per class) through ONNX
    Runtime, and check ONNX Runtime against eager PyTorch.

    Args:
        per_class: images per class (grid columns).
        cfg_scale: guidance for the grid (the small model's classes read better with guidance).
        scale: nearest-neighbour upscaling of the grid cells so 32x32 samples are visible.
    """
    from hita.assets import default_model
    from hita.checkpoint import load_gpt, load_tokenizer
    from hita.export.onnx import export_onnx
    from hita.util.images import save_grid
    from hita.runtimes.loop import generate_images, to_uint8
    from hita.runtimes.onnxrt import OrtExecutor
    from hita.runtimes.parity import check_parity
    from hita.runtimes.sampling import SamplingOptions
    from hita.runtimes.torch_eager import TorchExecutor

    t0 = time.perf_counter()
    out_dir = claim_folder(out_dir, "demo", "--out", owned=_old_demo)  # never write into someone else's folder
    d = default_model()
    artifacts = out_dir / "artifacts-onnx"
    exported = not _cached(artifacts, d.gpt, d.tokenizer)
    gpt, tok = load_gpt(d.gpt), load_tokenizer(d.tokenizer)
    if exported:
        log(f"exporting the default model to ONNX -> {artifacts}")
        export_onnx(gpt, tok, artifacts, checkpoints={"gpt": d.gpt, "tokenizer": d.tokenizer},
                    progress=log if progress else False)
    else:
        log(f"reusing verified ONNX export {artifacts}")
    ort = OrtExecutor(artifacts)
    n_classes = ort.gpt_config.num_classes
    ids = torch.arange(n_classes).repeat_interleave(per_class)              # [C * per_class]
    opts = SamplingOptions(cfg_scale=cfg_scale, seed=seed)
    log(f"generating {len(ids)} images ({per_class} per class) through ONNX Runtime")
    images, _ = generate_images(ort, ids, opts, progress=progress)
    u8 = to_uint8(images)                                                   # [n, H, W, 3]
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    labels = [d.class_names[i] if i < len(d.class_names) else str(i) for i in ids.tolist()]
    grid = save_grid(u8, out_dir / "grid.png", nrow=per_class, labels=labels)
    log("checking ONNX Runtime against eager PyTorch")
    eager = TorchExecutor(gpt, tok)
    report = check_parity(eager, ort, list(range(n_classes)), opts)
    return DemoResult(artifacts, exported, grid, len(ids), report, time.perf_counter() - t0)
