"""A small Fashion-MNIST classifier: the judge of generated images and the feature space of our FID.

Why our own network: the embedded model draws 32×32 grey clothes, which an ImageNet Inception sees as
a few blurry pixels, so its features say little. A classifier trained on the same data tells whether
class k looks like class k, and its penultimate activations give FID, precision and recall a space
where Fashion-MNIST differences matter. It reads grey 32×32 images in [-1, 1] (RGB is averaged to
grey first, exactly how the data set was repeated to RGB for the tokenizer).

Weights are one safetensors file whose metadata holds the config (``hita_kind = "classifier"``), read
strictly like every hita checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hita.util.files import atomic_write

KIND = "classifier"


class ClassifierError(ValueError):
    """A classifier file cannot be used; the first line says why and what to do."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the network. ``widths`` are the channels of the three conv stages (two convs in the
    first two, one in the last, each stage ends in a 2× max-pool); ``feature_dim`` is the width of
    the penultimate layer, the feature space of FID / precision / recall."""

    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if self.image_size % 8 or not 8 <= self.image_size <= 512:
            raise ClassifierError(f"classifier image_size {self.image_size} must be a multiple of 8 in [8, 512]")
        if not 2 <= self.num_classes <= 10_000 or not 1 <= self.feature_dim <= 65_536:
            raise ClassifierError(f"classifier num_classes {self.num_classes} / feature_dim {self.feature_dim} out of range")
        if len(self.widths) != 3 or not all(isinstance(w, int) and 1 <= w <= 4096 for w in self.widths):
            raise ClassifierError(f"classifier widths {self.widths} must be three integers in [1, 4096]")

    @classmethod
    def from_json(cls, text: str) -> "ClassifierConfig":
        try:
            d = json.loads(text)
            d["widths"] = tuple(d["widths"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise ClassifierError(f"classifier config is unreadable ({type(e).__name__}: {e}); re-save the file") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv-pool, then ``feature_dim`` ReLU features and a linear head."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        a, b, c = cfg.widths
        self.body = nn.Sequential(
            _conv(1, a), _conv(a, a), nn.MaxPool2d(2),
            _conv(a, b), _conv(b, b), nn.MaxPool2d(2),
            _conv(b, c), nn.MaxPool2d(2),
        )
        side = cfg.image_size // 8
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, cfg.feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """x (B, 1, S, S) in [-1, 1] -> features (B, feature_dim)."""
        return self.features(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 1, S, S) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.drop(self.embed(x)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs of one pass (eval mode: dropout is the identity)."""
        f = self.embed(x)
        return f, self.head(self.drop(f))


def to_classifier_input(images: Tensor, size: int) -> Tensor:
    """uint8 (B, H, W, 3) or (B, H, W) images -> float (B, 1, size, size) in [-1, 1].

    Colour is averaged to grey (the data set is grey repeated to RGB); other sizes are resized
    bicubically with antialiasing, the way the data set was brought to 32×32.
    """
    x = images.float()
    if x.dim() == 4:
        if x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3) or (B, H, W), got {tuple(images.shape)}")
        x = x.mean(dim=-1)
    if x.dim() != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3) or (B, H, W), got {tuple(images.shape)}")
    x = x.unsqueeze(1) / 127.5 - 1.0  # (B, 1, H, W)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    return x


def save_classifier(model: FashionClassifier, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Weights + config (and e.g. the measured test accuracy) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = {"hita_kind": KIND, "hita_config": model.cfg.to_json(), **(metadata or {})}
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a classifier file (config, recipe, measured accuracy)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ClassifierError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:120]}); "
                              "pass the classifier file (e.g. hita/assets/fmnist-classifier.safetensors)") from None


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier written by :func:`save_classifier`, strictly, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"{path}: no such classifier file; pass --classifier PATH or train one with "
                              "`hita evaluate train-classifier`")
    meta = read_metadata(path)
    if meta.get("hita_kind") != KIND or "hita_config" not in meta:
        raise ClassifierError(f"{path}: is not a hita classifier (metadata hita_kind={meta.get('hita_kind')!r}); "
                              "pass a file written by `hita evaluate train-classifier`")
    model = FashionClassifier(ClassifierConfig.from_json(meta["hita_config"]))
    sd = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ClassifierError(f"{path}: does not fit its own config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, mis-shaped {wrong[:3]}); the file is damaged: re-save it")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


SHIPPED_NAME = "fmnist-classifier.safetensors"


def shipped_classifier() -> Path:
    """Path of the classifier shipped with the embedded model (``hita/assets``); one line when absent."""
    import hita.assets

    path = Path(hita.assets.__file__).resolve().parent / SHIPPED_NAME
    if not path.is_file():
        raise ClassifierError(f"the shipped classifier {path} is missing; reinstall hita, pass --classifier PATH, "
                              "or train one with `hita evaluate train-classifier --out PATH`")
    return path
