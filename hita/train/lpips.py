"""LPIPS-VGG16 perceptual distance (Zhang et al. 2018; the taming / LlamaGen ``vgg.pth`` weights).

Architecture: fixed input scaling, VGG16 ``features`` (torchvision layout) read at relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3; each activation unit-normalised over channels, squared difference,
a learned non-negative 1×1 conv to one channel, spatial mean, summed over the five layers.

Nothing is downloaded. Two local files are needed:

* ``vgg``: VGG16 weights with torchvision's key names (``features.0.weight`` ... ``features.28.bias``;
  ``classifier.*`` entries are ignored), ``.pth`` or ``.safetensors``;
* ``lpips``: the linear-layer weights (``lin0.model.1.weight`` [1, 64, 1, 1] ... ``lin4``; the LPIPS
  ``v0.1/vgg.pth`` file, also shipped by taming / LlamaGen as ``vgg.pth``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

# VGG16 conv layer widths ('M' = 2×2 max-pool), torchvision's ``features`` indices follow from it.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in ``features``
CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)  # 30 modules: indices 0..29, as torchvision's vgg16().features[:30]


def _read(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [B]`` distances for images in [-1, 1]. Frozen, always in eval mode."""

    shift: Tensor
    scale: Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # the lin layers' dropout is off, as in the reference

    @classmethod
    def from_files(cls, vgg: str | os.PathLike, lpips: str | os.PathLike) -> "LPIPS":
        model = cls()
        vsd = {k: v for k, v in _read(vgg).items() if k.startswith("features.")}
        lsd = _read(lpips)
        sd = {k: v for k, v in vsd.items()}
        for i in range(len(CHANNELS)):
            for name in (f"lin{i}.model.1.weight", f"lin{i}.weight"):
                if name in lsd:
                    sd[f"lins.{i}.weight"] = lsd[name]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"LPIPS weights do not fit ({first}); pass torchvision VGG16 weights (features.*) as the VGG "
                "file and the LPIPS v0.1 vgg.pth (lin0.model.1.weight ...) as the LPIPS file"
            ) from None
        return model

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self._taps((x - self.shift) / self.scale)
        fy = self._taps((y - self.shift) / self.scale)
        total = 0.0
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # (B, C, h, w) unit over channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean(dim=(2, 3))  # (B, 1)
        return total.flatten()  # (B,)
