"""Inception-v3 as the FID network: our own implementation of the architecture, local weights only.

FID and IS as published (ADM's evaluator, the Hita paper's tables) use the TensorFlow Inception graph
of 2015-12-05. Its weights exist as a PyTorch state dict, ``pt_inception-2015-12-05-6726825d.pth``
(distributed with the pytorch-fid project's releases); this module builds the network those keys
describe and loads that file strictly. Nothing is downloaded.

The graph differs from the ImageNet Inception-v3 of torchvision in four places, all reproduced:
1008 output classes; the average pools of the A, C and first E blocks exclude padding from the mean;
the last E block pools its fourth branch with a max instead of an average. Inputs: uint8 RGB images,
resized to 299×299 (bilinear, ``align_corners=False``) and scaled to [-1, 1]. Outputs: the 2048-wide
pool3 features (FID, precision / recall) and the 1008 logits (IS). The TensorFlow graph resizes with
its own bilinear kernel, so numbers agree with ADM's evaluator closely but not to the last digit.
Checked against pytorch-fid 0.3.0's network (``tests/eval/test_inception_vs_pytorch_fid.py``): the same
weights give the same pool3 features and logits, bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hita.eval.features import Features

__all__ = ["FIDInception", "InceptionFeatures", "WEIGHTS_NAME", "load_inception"]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HINT = (f"{WEIGHTS_NAME} (the PyTorch port of TensorFlow's 2015-12-05 Inception graph, from the pytorch-fid "
                "project's GitHub releases, 'fid_weights'); download it on a machine with network access and pass "
                "--inception-weights PATH")
INPUT_SIZE = 299


class Conv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # The TF graph's 3x3 average pools divide by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (``pool`` channels)."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``c7`` inner channels)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, **col)
        self.branch7x7dbl_3 = Conv(c7, c7, **row)
        self.branch7x7dbl_4 = Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``max_pool`` selects the last block's pooling."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception-v3: (B, 3, 299, 299) in [-1, 1] -> pool3 (B, 2048), logits (B, 1008)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))          # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                          # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                        # (B, 288, 35, 35)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                        # (B, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))                                                # (B, 2048)
        return pool3, self.fc(pool3)


def load_inception(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> FIDInception:
    """Build the network and load ``path`` strictly (a plain state dict, read without running pickles).

    Raises:
        ValueError: no path, a missing file, or a file that is not this network (keys listed).
    """
    if path is None:
        raise ValueError(f"--features inception needs local Inception weights: {WEIGHTS_HINT}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights {path} not found; the file needed is {WEIGHTS_HINT}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ValueError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}); the file needed is "
                         f"{WEIGHTS_HINT}") from None
    model = FIDInception()
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict; the file needed is {WEIGHTS_HINT}")
    expected = model.state_dict()
    # Files saved by older PyTorch lack BatchNorm's step counters, which inference never reads.
    sd = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **sd}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: is not the FID Inception ({len(missing)} missing keys e.g. {missing[:2]}, "
                         f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(wrong)} mis-shaped); "
                         f"the file needed is {WEIGHTS_HINT}")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


class InceptionFeatures:
    """Feature extractor over :class:`FIDInception`: pool3 features and 1008 logits (for IS)."""

    name = "inception-pool3"
    feature_dim = 2048
    class_logits = False  # ImageNet's 1008 TF classes, not the generator's classes

    def __init__(self, model: FIDInception, batch_size: int = 50):
        self.model, self.batch_size = model.eval(), batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, device: str = "cpu") -> "InceptionFeatures":
        return cls(load_inception(path, device))

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Features:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"Inception takes uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
            x = x.to(self.device, torch.float32) / 255.0                         # (B, 3, H, W) in [0, 1]
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            f, z = self.model(2.0 * x - 1.0)
            feats.append(f.cpu().numpy())
            logits.append(z.cpu().numpy())
        return Features(np.concatenate(feats).astype(np.float32), np.concatenate(logits).astype(np.float32))
