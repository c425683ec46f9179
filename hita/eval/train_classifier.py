"""The recipe that made the shipped classifier: a few CPU minutes of Adam on Fashion-MNIST at 32×32.

Kept as code (not prose) so the shipped file can be remade with one command and the recipe's numbers
live in one frozen dataclass. Images go through the same path as the tokenizer's training data
(bicubic resize to 32, grey), plus a random horizontal flip, the one augmentation clothes allow.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hita.eval.classifier import ClassifierConfig, FashionClassifier


@dataclass(frozen=True)
class ClassifierRecipe:
    """Training numbers. ``limit`` keeps the first N training images (tests use a few hundred)."""

    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and self.batch_size >= 1 and self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"classifier recipe out of range: {self}; epochs, batch size and lr must be positive")


def images_to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) data-set images -> float (N, 1, size, size) in [-1, 1], resized like the
    tokenizer's training data (PIL bicubic), so the classifier sees real images the way the models do."""
    from PIL import Image

    if images.shape[1:] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0


@torch.no_grad()
def accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, np.ndarray]:
    """Overall accuracy and the per-class accuracy array of ``model`` on (x, y)."""
    model.eval()
    pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    k = model.cfg.num_classes
    per = np.array([float((pred[y == c] == c).float().mean()) if (y == c).any() else float("nan") for c in range(k)])
    return float((pred == y).float().mean()), per


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, recipe: ClassifierRecipe = ClassifierRecipe(),
                     cfg: ClassifierConfig = ClassifierConfig(),
                     log: Callable[[str], None] = lambda s: None) -> FashionClassifier:
    """Train from scratch on (N, 1, S, S) images in [-1, 1] and int64 labels; returns the model in eval mode.

    Linear warm-up over 10 % of the steps, then cosine decay to 0, AdamW, label smoothing 0.05 (steadier logits for IS).
    """
    if recipe.limit is not None:
        train_x, train_y = train_x[: recipe.limit], train_y[: recipe.limit]
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = FashionClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = len(train_x)
    steps_per_epoch = max(1, n // recipe.batch_size)
    total = max(1, math.ceil(recipe.epochs * steps_per_epoch))
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    model.train()
    step, start = 0, time.perf_counter()
    while step < total:
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            x, y = train_x[idx], train_y[idx]
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == total:
                log(f"step {step}/{total} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    return model.eval()


def recipe_metadata(recipe: ClassifierRecipe, test_accuracy: float, per_class: np.ndarray) -> dict[str, str]:
    """String metadata stored with the weights: the recipe and what it measured on the test set."""
    import json

    return {"hita_recipe": json.dumps(asdict(recipe), sort_keys=True),
            "hita_test_accuracy": f"{test_accuracy:.4f}",
            "hita_test_accuracy_per_class": json.dumps([round(float(a), 4) for a in per_class])}
