"""An image folder with one sub-folder per class (ImageNet's train layout).

Classes are the sub-folder names in sorted order (label = position). Every file must be an image:
a stray file is reported by name at scan time instead of being skipped, so a data set is never
silently smaller than its folder. Hidden files (names starting with '.') are ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hita.data.dataset import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".jfif")


class ImageFolder:
    """``root/<class>/<image>`` files; ``limit`` keeps the first ``limit`` files in sorted order."""

    default_augment = "crop-flip"

    def __init__(self, root: str | Path, limit: int | None = None):
        self.root = Path(root)
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        class_dirs = [p for p in entries if p.is_dir()]
        loose = [p for p in entries if not p.is_dir()]
        if not class_dirs:
            what = f"only files such as {loose[0].name}" if loose else "nothing"
            raise DataError(
                f"data folder {self.root} holds {what}; put the images in one sub-folder per class "
                "(root/<class>/<image>.png), or pass 'fashion-mnist'"
            )
        if loose:
            raise DataError(
                f"{loose[0]} lies directly in the data folder; move it into a class sub-folder or out of {self.root}"
            )
        files: list[Path] = []
        labels: list[int] = []
        for label, d in enumerate(class_dirs):
            for p in sorted(q for q in d.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(
                        f"{p} is not an image (extension {p.suffix or 'none'!r}; accepted: "
                        f"{' '.join(IMAGE_EXTENSIONS)}); remove it or move it out of {self.root}"
                    )
                files.append(p)
                labels.append(label)
        if not files:
            raise DataError(f"data folder {self.root} has class folders but no images; add images to them")
        if limit is not None:
            files, labels = files[:limit], labels[:limit]
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(d.name for d in class_dirs)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            raise DataError(f"cannot decode image {path} ({type(e).__name__}); replace or remove the file") from None

    def describe(self) -> str:
        return f"image folder {self.root} ({len(self)} images, {self.num_classes} classes)"
