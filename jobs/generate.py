"""Generate many images through any executor and write them as PNG files plus a labelled grid.

Everything a user can set is checked before a model is loaded or a step is run: the class list is
bounded before it is expanded, the output folder must be creatable and writable, the batch must fit
in memory. Images are written batch by batch (never all held in RAM); the grid keeps at most
:data:`GRID_MAX` images. ``complete.json`` is written last, so a folder without it is a partial run
(interrupted, or failed) and says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hita.runtimes.executor import StepExecutor
from hita.runtimes.loop import generate_images, to_uint8
from hita.runtimes.sampling import SamplingOptions
from hita.util.files import atomic_write, check_claimable, claim_folder
from hita.util.images import save_grid, save_pngs

__all__ = [
    "GenerationOutput",
    "generate_to_dir",
    "parse_classes",
    "check_output_dir",
    "check_batch_fits",
    "MAX_IMAGES",
    "MAX_RESIZE",
    "GRID_MAX",
    "MARKER",
]

MAX_IMAGES = 1_000_000      # one run; FID-50k runs fit 20 times over
MAX_RESIZE = 4096           # pixels per side
GRID_MAX = 256              # images shown in grid.png (the PNG files hold them all)
GRID_CELL = 256             # grid cells are at most this many pixels a side (--resize 4096 stays bounded)
MARKER = "complete.json"
_RANGE = re.compile(r"^(-?\d{1,18})(?:\s*-\s*(-?\d{1,18}))?$")


@dataclass(frozen=True)
class GenerationOutput:
    pngs: list[Path]
    grid: Path
    class_ids: list[int]
    seconds: float


def _old_generate_run(folder: Path) -> bool:
    """A folder completed by ``hita generate`` before run markers existed: its complete.json lists
    exactly the PNG files it holds (plus grid.png)."""
    try:
        done = json.loads((folder / MARKER).read_text())
        names = set(done["files"]) | {"grid.png", MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {e.name for e in folder.iterdir()} <= names


def check_output_dir(out_dir: str | Path, create: bool = False, kind: str | None = None) -> Path:
    """Prove ``out_dir`` can take files before any work: it is a folder (or can be made in a
    writable folder). Creates it only with ``create``, so a refused command leaves nothing behind.

    With ``kind`` (``"generate"``, ``"demo"``) the folder must also be new, empty or an earlier run
    of that job (:func:`hita.util.files.check_claimable`), and ``create`` marks it as that job's:
    a folder of someone else's files is never written into.

    Raises:
        ValueError: it is a file or device, it (or the folder it would go in) is not writable, or it
            holds files hita did not write.
    """
    out = Path(out_dir)
    if kind is not None:
        check_claimable(out, kind, "--out", owned=_old_generate_run if kind == "generate" else None)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose a folder path")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--out {out}: {base} is not a folder; choose a folder path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {base} is not writable; choose a writable folder")
    if create and kind is not None:
        return claim_folder(out, kind, "--out", owned=_old_generate_run if kind == "generate" else None)
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot create it ({e.strerror or e}); choose a writable folder") from None
    return out


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_batch_fits(executor: StepExecutor, batch_size: int, use_cfg: bool) -> None:
    """Refuse a batch whose KV cache alone exceeds the memory this machine has free.

    Raises:
        ValueError: with the estimate and the largest batch that fits.
    """
    rows = batch_size * (2 if use_cfg else 1)
    need = executor.kv_cache_bytes(rows)
    free = _available_memory() if executor.device.type == "cpu" else None
    if executor.device.type == "cuda":
        free = torch.cuda.mem_get_info(executor.device)[0]
    if free is not None and need > 0.8 * free:
        per = max(1, executor.kv_cache_bytes(2 if use_cfg else 1))
        raise ValueError(
            f"--batch-size {batch_size}: the KV cache needs {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB "
            f"are free; use --batch-size {max(1, int(0.8 * free) // per)} or less"
        )


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
    the batch size nor on the runtime (equal logits draw equal tokens). The PNGs of a batch are
    written as soon as it is done; ``complete.json`` (the files, the options) is written last.

    Args:
        resize: optional output size (the reference evaluates at 256 from the 336 decoder output).
        class_names: label per class id for the grid; defaults to the ids.
        nrow: images per grid row; defaults to one row per distinct class when the ids are grouped.
    """
    from tqdm import tqdm

    ids = list(class_ids)
    if not ids:
        raise ValueError("no class ids given; pass --classes 1,2,3")
    if len(ids) > MAX_IMAGES:
        raise ValueError(f"{len(ids)} images requested; one run makes at most {MAX_IMAGES}")
    if resize is not None and not 1 <= resize <= MAX_RESIZE:
        raise ValueError(f"--resize {resize} must be in 1..{MAX_RESIZE}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_output_dir(out_dir, kind="generate")
    check_batch_fits(executor, min(batch_size, len(ids)), opts.use_cfg)  # before anything is created
    out = check_output_dir(out_dir, create=True, kind="generate")
    (out / MARKER).unlink(missing_ok=True)  # this folder is partial until the run ends
    start = time.perf_counter()
    names = [f"{i:04d}_class{c}.png" for i, c in enumerate(ids)]
    pngs: list[Path] = []
    shown: list[torch.Tensor] = []
    bar = tqdm(total=len(ids), desc="images", unit="img", disable=not progress or len(ids) <= batch_size)
    for a in range(0, len(ids), batch_size):
        chunk = ids[a : a + batch_size]
        imgs, _ = generate_images(executor, torch.tensor(chunk, dtype=torch.long), opts,
                                  progress=progress and len(ids) <= batch_size, row_offset=a)
        u8 = to_uint8(imgs, size=resize)                                    # [b, H, W, 3]
        pngs += save_pngs(u8, out, names[a : a + len(chunk)])
        if sum(len(t) for t in shown) < GRID_MAX:
            keep = GRID_MAX - sum(len(t) for t in shown)
            thumbs = u8 if u8.shape[1] <= GRID_CELL else to_uint8(imgs[:keep], size=GRID_CELL)
            shown.append(thumbs[:keep])
        bar.update(len(chunk))
    bar.close()
    grid_ids = ids[: sum(len(t) for t in shown)]
    label = {c: (class_names[c] if class_names and c < len(class_names) else str(c)) for c in grid_ids}
    if nrow is None:
        per_class = [grid_ids.count(c) for c in dict.fromkeys(grid_ids)]
        grouped = all(n == per_class[0] for n in per_class) and grid_ids == sorted(grid_ids, key=grid_ids.index)
        nrow = per_class[0] if grouped and len(per_class) > 1 else min(len(grid_ids), 8)
    grid = save_grid(torch.cat(shown), out / "grid.png", nrow=nrow, labels=[label[c] for c in grid_ids])
    seconds = time.perf_counter() - start
    marker = {"images": len(ids), "files": names, "class_ids": ids, "runtime": executor.name,
              "options": dataclasses.asdict(opts), "resize": resize,
              "seconds": round(seconds, 2)}
    atomic_write(out / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=1, default=str)))
    return GenerationOutput(pngs, grid, ids, seconds)


def parse_classes(spec: str, num_classes: int, per_class: int = 1) -> list[int]:
    """``"1,2,5-7"`` → [1, 2, 5, 6, 7] (each repeated ``per_class`` times), validated.

    Every id and range is checked against ``num_classes`` *before* anything is expanded, and the
    total against :data:`MAX_IMAGES`, so a typo such as ``0-300000000`` fails at once.
    """
    if not 1 <= per_class <= MAX_IMAGES:
        raise ValueError(f"--per-class {per_class} must be in 1..{MAX_IMAGES}")
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = _RANGE.match(part)
        if m is None:
            raise ValueError(f"cannot read class list {spec!r}; use e.g. --classes 1,2,5-7")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f"class range {part!r} runs backwards; write it as {hi}-{lo}")
        for c in (lo, hi):
            if c < 0:
                raise ValueError(f"class id {c} is negative; class ids start at 0")
            if not c < num_classes:
                raise ValueError(
                    f"class id {c} out of range [0, {num_classes}) for this GPT; pick ids below {num_classes}"
                )
        ranges.append((lo, hi))
    if not ranges:
        raise ValueError("no class ids given; pass --classes 1,2,3")
    total = sum(hi - lo + 1 for lo, hi in ranges) * per_class
    if total > MAX_IMAGES:
        raise ValueError(f"{total} images requested; one run makes at most {MAX_IMAGES}")
    return [c for lo, hi in ranges for c in range(lo, hi + 1) for _ in range(per_class)]
