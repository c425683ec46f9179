"""Generate many images through any executor and write them as PNG files plus a labelled grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hita.runtimes.executor import StepExecutor
from hita.util.images import save_grid, save_pngs
from hita.runtimes.loop import generate_images, to_uint8
from hita.runtimes.sampling import SamplingOptions


@dataclass(frozen=True)
class GenerationOutput:
    pngs: list[Path]
    grid: Path
    class_ids: list[int]
    seconds: float


def generate_to_dir(
    executor: StepExecutor,
    class_ids: Sequence[int],
    opts: SamplingOptions,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    resize: int | None = None,
    class_names: Sequence[str] | None = None,
    nrow: int | None = None,
    progress: bool = True,
) -> GenerationOutput:
    """Generate one image per entry of ``class_ids``, in batches, and save PNGs and a grid.

    Every image draws its noise by its global index (``row_offset``), so the files depend neither on
    the batch size nor on the runtime (equal logits draw equal tokens).

    Args:
        resize: optional output size (the reference evaluates at 256 from the 336 decoder output).
        class_names: label per class id for the grid; defaults to the ids.
        nrow: images per grid row; defaults to one row per distinct class when the ids are grouped.
    """
    import time

    from tqdm import tqdm

    out_dir = Path(out_dir)
    ids = list(class_ids)
    if not ids:
        raise ValueError("no class ids given; pass --classes 1,2,3")
    start = time.perf_counter()
    chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    images = []
    bar = tqdm(total=len(ids), desc="images", unit="img", disable=not progress or len(chunks) == 1)
    for b, chunk in enumerate(chunks):
        imgs, _ = generate_images(executor, torch.tensor(chunk, dtype=torch.long), opts,
                                  progress=progress, row_offset=b * batch_size)
        images.append(to_uint8(imgs, size=resize))
        bar.update(len(chunk))
    bar.close()
    u8 = torch.cat(images)
    names = [f"{i:04d}_class{c}.png" for i, c in enumerate(ids)]
    pngs = save_pngs(u8, out_dir, names)
    label = {c: (class_names[c] if class_names and c < len(class_names) else str(c)) for c in ids}
    if nrow is None:
        per_class = [ids.count(c) for c in dict.fromkeys(ids)]
        grouped = all(n == per_class[0] for n in per_class) and ids == sorted(ids, key=ids.index)
        nrow = per_class[0] if grouped and len(per_class) > 1 else min(len(ids), 8)
    grid = save_grid(u8, out_dir / "grid.png", nrow=nrow, labels=[label[c] for c in ids])
    return GenerationOutput(pngs, grid, ids, time.perf_counter() - start)


def parse_classes(spec: str, num_classes: int, per_class: int = 1) -> list[int]:
    """``"1,2,5-7"`` → [1, 2, 5, 6, 7] (each repeated ``per_class`` times), validated."""
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                ids.extend(range(int(a), int(b) + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(f"cannot read class list {spec!r}; use e.g. --classes 1,2,5-7") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class id {bad[0]} out of range [0, {num_classes}) for this GPT; pick ids below {num_classes}")
    if not ids:
        raise ValueError("no class ids given; pass --classes 1,2,3")
    return [c for c in ids for _ in range(per_class)]
