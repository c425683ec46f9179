"""What a calibration run collects: a frozen options object and its named presets.

A calibration set is a recording of the generator's own sampling runs, so its options are sampling
options (seed, guidance, temperature) plus how much to record. Everything that changes the recorded
tensors is here and goes into the set's manifest; a set is reproducible from it and the checkpoints.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

__all__ = ["CollectOptions", "PRESETS", "MAX_IMAGES", "MiB"]

MiB = 2**20
MAX_IMAGES = 4096  # a bound on what one set may hold, checked before any work


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class CollectOptions:
    """How ``hita calibrate`` samples and what it keeps.

    Fields:
        name: preset name (recorded; ``"custom"`` when edited).
        images: number of images generated; image ``i`` asks for ``classes[i % len(classes)]``.
        batch_images: images per loop run. With guidance the executor runs ``2 * batch_images`` rows
            (conditional rows, then null-class rows). Every run has the same rows, so every recorded
            decode-step feed has one fixed shape (histogram calibrators need that).
        classes: class ids to cycle through; empty = every class of the GPT.
        seed: key of the shared noise stream (image ``i`` uses noise row ``i``).
        cfg_scale, temperature, top_k, top_p: sampling options of the runs (the reference's
            defaults: guidance 1.5 at temperature 1): calibrating on the activations the deployed
            sampler produces, CFG rows included.
        max_bytes: size budget of the set; a request that needs more is refused before sampling.
        probe_positions: decode positions whose eager logits are kept as a fingerprint of the
            weights (a set is refused for a graph that does not reproduce them).
    """

    name: str = "default"
    images: int = 16
    batch_images: int = 1
    classes: tuple[int, ...] = ()
    seed: int = 0
    cfg_scale: float = 1.5
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_bytes: int = 2048 * MiB
    probe_positions: int = 3

    def __post_init__(self) -> None:
        if not _int(self.images) or not 1 <= self.images <= MAX_IMAGES:
            raise ValueError(f"images must be an integer in 1..{MAX_IMAGES}, got {self.images!r}")
        if not _int(self.batch_images) or not 1 <= self.batch_images <= self.images:
            raise ValueError(
                f"batch_images must be an integer in 1..images ({self.images}), got {self.batch_images!r}"
            )
        if self.images % self.batch_images:
            raise ValueError(
                f"images ({self.images}) must be a multiple of batch_images ({self.batch_images}): every run "
                "records the same rows so all feeds share one shape; change --images or --batch-images"
            )
        if not isinstance(self.classes, tuple) or not all(_int(c) and c >= 0 for c in self.classes):
            raise ValueError(f"classes must be a tuple of class ids >= 0, got {self.classes!r}")
        if not _int(self.max_bytes) or self.max_bytes < MiB:
            raise ValueError(f"max_bytes must be at least 1 MiB, got {self.max_bytes!r}")
        if not _int(self.probe_positions) or not 1 <= self.probe_positions <= 16:
            raise ValueError(f"probe_positions must be in 1..16, got {self.probe_positions!r}")
        if not isinstance(self.cfg_scale, numbers.Real) or not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")

    @property
    def batches(self) -> int:
        return self.images // self.batch_images

    def sampling(self):
        """The :class:`~hita.runtimes.sampling.SamplingOptions` of the runs (validated there)."""
        from hita.runtimes.sampling import SamplingOptions

        return SamplingOptions(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p, seed=self.seed)

    def class_list(self, num_classes: int) -> list[int]:
        """The class id of every image, cycling through ``classes`` (or all classes).

        Raises:
            ValueError: a class id outside ``[0, num_classes)``.
        """
        pool = list(self.classes) or list(range(num_classes))
        bad = [c for c in pool if c >= num_classes]
        if bad:
            raise ValueError(f"class id {bad[0]} out of range [0, {num_classes}) for this GPT; pass --classes "
                             f"within 0..{num_classes - 1}")
        return [pool[i % len(pool)] for i in range(self.images)]

    def with_changes(self, **changes: Any) -> "CollectOptions":
        """A copy with ``changes``; named ``custom`` unless a name is given."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes and "name" not in changes:
            changes["name"] = "custom"
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CollectOptions":
        d = dict(d)
        d["classes"] = tuple(d.get("classes", ()))
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> "CollectOptions":
        """A preset by exact name.

        Raises:
            ValueError: unknown name (the message lists the presets).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown calibration preset {name!r}; use one of {', '.join(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, CollectOptions] = {
    # CI and quick checks on the embedded model: 4 images in 2 runs of 2 images (4 rows each).
    "ci": CollectOptions(name="ci", images=4, batch_images=2, max_bytes=64 * MiB),
    # The default: 16 images, one image (2 rows with guidance) per run, as a batch-1 deployment sees it.
    "default": CollectOptions(name="default"),
    # Large GPTs by hand: every final cache of GPT-B costs ~42 MB per row, so 8 images ~ 680 MB.
    "gpt-b": CollectOptions(name="gpt-b", images=8, batch_images=1, max_bytes=1024 * MiB),
}
