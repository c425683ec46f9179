"""Loss terms, LPIPS-VGG and the discriminators, with weights the tests make themselves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hita.train.discriminators import BatchNormLocal, DinoDiscriminator, DinoViT, PatchGAN
from hita.train.losses import gpt_loss, hinge_d_loss, reconstruction_loss, softplus_g_loss
from hita.train.lpips import LPIPS, vgg16_features


def test_reconstruction_losses():
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(x, y, "mse").item() == pytest.approx(2 * 0.25)  # reference: rec(MSE) + MSE
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(0.5 + 0.25)
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        reconstruction_loss(x, y, "huber")


def test_adversarial_and_ce_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.0) / 2))
    assert softplus_g_loss(fake).item() == pytest.approx(F.softplus(torch.tensor([2.0, 0.0])).mean().item())
    logits = torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    ce_h, ce_p = gpt_loss(logits, logits, ids, ids)
    assert ce_h.item() == pytest.approx(F.cross_entropy(logits.reshape(6, 5), ids.flatten()).item())


def _lpips_files(tmp_path):
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in torchvision files
    torch.save(vgg, tmp_path / "vgg16.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "lpips_vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"


def test_lpips_loads_local_weights_and_measures_distance(tmp_path):
    vgg, lin = _lpips_files(tmp_path)
    model = LPIPS.from_files(vgg, lin)
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same, d_other = model(x, x), model(x, x.flip(-1))
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2))
    assert (d_other > 0).all()
    model.train()
    assert not model.training
    with pytest.raises(ValueError, match="LPIPS weights do not fit"):
        LPIPS.from_files(vgg, vgg)


def test_patchgan_layout():
    d = PatchGAN()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # pix2pix NLayer, ndf 64, 3 layers
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def _dino_file(tmp_path):
    torch.manual_seed(0)
    vit = DinoViT(dim=64, depth=12, n_heads=1, patch_size=16, image_size=32)
    torch.save({f"module.backbone.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "dino.pth")
    return tmp_path / "dino.pth"


def test_dino_discriminator_from_local_vit(tmp_path):
    vit = DinoViT.from_file(_dino_file(tmp_path))
    assert vit.dim == 64 and len(vit.blocks) == 12
    assert all(torch.all(b.attn.qkv.bias[64:128] == 0) for b in vit.blocks)  # key bias zeroed
    disc = DinoDiscriminator(vit, input_size=32)
    assert all(not k.startswith("_vit") and "blocks" not in k for k in disc.state_dict())  # heads only
    logits = disc(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert logits.shape == (4, 5 * 4)  # 5 hooks × 2×2 patch tokens
    assert disc(torch.rand(4, 3, 48, 48) * 2 - 1).shape == (4, 20)  # cropped or resized to 32
    with pytest.raises(FileNotFoundError, match="no such DINO"):
        DinoViT.from_file(tmp_path / "missing.pth")


def test_batchnorm_local_uses_virtual_batches():
    bn = BatchNormLocal(3, virtual_bs=2)
    x = torch.randn(4, 3, 5)
    y = bn(x)
    ref = torch.cat([F.batch_norm(x[i:i + 2].transpose(0, 1).reshape(3, -1).T[:, :, None], None, None,
                                  training=True).reshape(2, 5, 3) for i in (0, 2)])
    assert torch.allclose(y, ref.transpose(1, 2), atol=1e-5)
