"""Hita tokenizer: checkpoint key contract (spec 2), decode causality with shift_k (spec 1.5), cosine
VQ lookups (spec 1.4), the DINOv2 branch and the Hita-U feature head (spec 1.3, 1.6).

Full-size presets are built on the meta device (shapes only, no memory); behaviour is checked on the
``tiny`` preset and on a toy configuration with a small ViT standing in for DINOv2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hita.config import TokenizerConfig
from hita.models import HitaTokenizer, TokenizerOutput
from hita.models.dinov2 import DinoV2, DinoV2Features, antialiased_resize, dinov2_vitl14_reg4, load_dinov2
from hita.models.tokenizer import DecodeTransformer

TOP_LEVEL_ORDER = [
    "encoder", "decoder", "encode_transformer", "decode_transformer", "quantize", "quant_conv",
    "post_quant_conv", "slot_quantize", "pre_slots_quant", "post_slots_quant",
]


def _meta(name: str) -> HitaTokenizer:
    with torch.device("meta"):
        return HitaTokenizer(TokenizerConfig.from_name(name))


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Expected Hita-V key table, written out from spec section 2 (independent of the model code)
# ----------------------------------------------------------------------------------------------


def _res(out: dict, p: str, cin: int, cout: int) -> None:
    out.update({f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
                f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.conv1.bias": (cout,),
                f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
                f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)})
    if cin != cout:
        out.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})


def _attn(out: dict, p: str, c: int) -> None:
    out.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        out.update({f"{p}.{n}.weight": (c, c, 1, 1), f"{p}.{n}.bias": (c,)})


def _conv3(out: dict, p: str, cout: int, cin: int) -> None:
    out.update({f"{p}.weight": (cout, cin, 3, 3), f"{p}.bias": (cout,)})


def _layer(out: dict, p: str, flavour: str) -> None:
    for n in ("norm1", "norm2"):
        out.update({f"{p}.{n}.weight": (512,), f"{p}.{n}.bias": (512,)})
    if flavour == "cross":
        out.update({f"{p}.attn1.to_{n}.weight": (512, 512) for n in "qkv"})
        out.update({f"{p}.attn1.to_out.0.weight": (512, 512), f"{p}.attn1.to_out.0.bias": (512,)})
    else:
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({f"{p}.attn1.{n}.weight": (512, 512), f"{p}.attn1.{n}.bias": (512,)})
    out.update({f"{p}.ffnet.w12.weight": (2736, 512), f"{p}.ffnet.w12.bias": (2736,),
                f"{p}.ffnet.w3.weight": (512, 1368), f"{p}.ffnet.w3.bias": (512,)})


def expected_hita_v() -> dict[str, tuple[int, ...]]:
    e: dict[str, tuple[int, ...]] = {}
    # CNN encoder (spec 2.2): levels 128,128,256,256,512; 2 res each; attn on level 4; downsample 0..3.
    _conv3(e, "encoder.conv_in", 128, 3)
    cin = 128
    for i, c in enumerate((128, 128, 256, 256, 512)):
        for j in range(2):
            _res(e, f"encoder.conv_blocks.{i}.res.{j}", cin if j == 0 else c, c)
        if i == 4:
            for j in range(2):
                _attn(e, f"encoder.conv_blocks.{i}.attn.{j}", c)
        else:
            _conv3(e, f"encoder.conv_blocks.{i}.downsample.conv", c, c)
        cin = c
    _res(e, "encoder.mid.0", 512, 512), _attn(e, "encoder.mid.1", 512), _res(e, "encoder.mid.2", 512, 512)
    e.update({"encoder.norm_out.weight": (512,), "encoder.norm_out.bias": (512,)})
    _conv3(e, "encoder.conv_out", 512, 512)
    # CNN decoder (spec 2.1): blocks 512,256,256,128,128; 3 res each; attn on block 0; no upsample on 4.
    _conv3(e, "decoder.conv_in", 512, 512)
    _res(e, "decoder.mid.0", 512, 512), _attn(e, "decoder.mid.1", 512), _res(e, "decoder.mid.2", 512, 512)
    cin = 512
    for k, c in enumerate((512, 256, 256, 128, 128)):
        for j in range(3):
            _res(e, f"decoder.conv_blocks.{k}.res.{j}", cin if j == 0 else c, c)
        if k == 0:
            for j in range(3):
                _attn(e, f"decoder.conv_blocks.{k}.attn.{j}", c)
        if k != 4:
            _conv3(e, f"decoder.conv_blocks.{k}.upsample.conv", c, c)
        cin = c
    e.update({"decoder.norm_out.weight": (128,), "decoder.norm_out.bias": (128,)})
    _conv3(e, "decoder.conv_out", 3, 128)
    # Holistic encoder (spec 2.2).
    et = "encode_transformer"
    e.update({f"{et}.carrier_tokens": (1, 128, 512), f"{et}.pos_embed": (1, 441, 512),
              f"{et}.proj.mlp.0.weight": (512, 1024), f"{et}.proj.mlp.1.weight": (512,),
              f"{et}.proj.mlp.1.bias": (512,), f"{et}.proj.mlp.3.weight": (512, 512),
              f"{et}.proj.mlp.4.weight": (512,), f"{et}.proj.mlp.4.bias": (512,)})
    for n in ("norm_pre1", "norm_pre2"):
        e.update({f"{et}.{n}.weight": (512,), f"{et}.{n}.bias": (512,)})
    for i in range(3):
        _layer(e, f"{et}.transformer1.layers.{i}", "cross")
        _layer(e, f"{et}.transformer2.layers.{i}", "attention3")
    # Fusion decoder (spec 2.1).
    dt = "decode_transformer"
    e.update({f"{dt}.position_embedding": (1, 441, 512), f"{dt}.slot_position_embedding": (1, 128, 512),
              f"{dt}.norm.weight": (512,), f"{dt}.norm.bias": (512,)})
    for i in range(3):
        _layer(e, f"{dt}.transformer.layers.{i}", "attention3")
    # Quantisers and projections.
    e.update({
        "quantize.embedding.weight": (16384, 8), "quantize.codebook_used": (65536,),
        "slot_quantize.embedding.weight": (16384, 12), "slot_quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 512, 1, 1), "quant_conv.bias": (8,),
        "post_quant_conv.weight": (512, 8, 1, 1), "post_quant_conv.bias": (512,),
        "pre_slots_quant.weight": (12, 512), "pre_slots_quant.bias": (12,),
        "post_slots_quant.weight": (512, 12), "post_slots_quant.bias": (512,),
    })
    return e


HITA_U_EXTRA = {
    "decode_transformer.mask_embedding": (1, 1, 512),
    "decode_transformer.norm_vfm.weight": (512,), "decode_transformer.norm_vfm.bias": (512,),
    "decode_transformer.proj.weight": (1024, 512), "decode_transformer.proj.bias": (1024,),
}

MODULE_PARAMS = {
    "encoder": 30_478_080, "decoder": 43_629_443, "encode_transformer": 20_020_256,
    "decode_transformer": 9_763_856, "quantize": 131_072, "slot_quantize": 196_608,
    "quant_conv": 4_104, "post_quant_conv": 4_608, "pre_slots_quant": 6_156, "post_slots_quant": 6_656,
}


# ----------------------------------------------------------------------------------------------
# Key contract (meta device)
# ----------------------------------------------------------------------------------------------


def test_hita_v_state_dict_matches_spec_table():
    tok = _meta("hita-v")
    got, want = _shapes(tok), expected_hita_v()
    assert len(want) == 501
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    # Registration order = state-dict order (spec 1.2).
    tops = list(dict.fromkeys(k.split(".")[0] for k in got))
    assert tops == TOP_LEVEL_ORDER
    for name, n in MODULE_PARAMS.items():
        assert _n_params(getattr(tok, name)) == n, name
    assert _n_params(tok) == 104_240_839
    assert tok.state_dict()["quantize.codebook_used"].dtype == torch.float32


def test_hita_u_adds_exactly_the_vfm_head_keys():
    tok = _meta("hita-u")
    want = {**expected_hita_v(), **HITA_U_EXTRA}
    assert len(want) == 506 and _shapes(tok) == want
    assert _n_params(tok.decode_transformer) == 10_290_704
    assert _n_params(tok) == 104_767_687


def test_dinov2_architecture_and_keys():
    with torch.device("meta"):
        vit = dinov2_vitl14_reg4()
    assert _n_params(vit) == 304_372_736
    sd = _shapes(vit)
    assert len(sd) == 4 + 2 + 24 * 14 + 2
    assert sd["cls_token"] == (1, 1, 1024) and sd["pos_embed"] == (1, 1370, 1024)
    assert sd["register_tokens"] == (1, 4, 1024) and sd["mask_token"] == (1, 1024)
    assert sd["patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert sd["blocks.23.attn.qkv.weight"] == (3072, 1024) and sd["blocks.0.mlp.fc1.weight"] == (4096, 1024)
    assert sd["blocks.5.ls1.gamma"] == (1024,) and sd["norm.weight"] == (1024,)


def test_backbone_never_enters_state_dict_and_is_optional_on_load():
    tok = _meta("hita-u")
    before = tok.state_dict()
    with torch.device("meta"):
        vit = dinov2_vitl14_reg4()
    tok.attach_backbone(vit)
    assert tok.backbone is not None and _n_params(tok) == 104_767_687 + 304_372_736
    assert all("backbone" not in k for k in tok.state_dict())
    assert list(tok.state_dict()) == list(before)
    # A released file (no backbone keys) loads strictly into a model with a backbone attached ...
    res = tok.load_state_dict(before, strict=True, assign=True)
    assert not res.missing_keys and not res.unexpected_keys
    # ... and a dump that does carry backbone keys loads strictly into one without.
    bare = _meta("hita-u")
    full = dict(before, **{f"encode_transformer.backbone.pretrained_encoder.{k}": v
                           for k, v in vit.state_dict().items()})
    bare.load_state_dict(full, strict=True, assign=True)


def test_encode_without_backbone_says_how_to_fix():
    tok = _meta("hita-v")
    with pytest.raises(RuntimeError, match="load_backbone"):
        tok.encode(torch.zeros(1, 3, 336, 336, device="meta"))
    with pytest.raises(ValueError, match=r"\(B, 3, 336, 336\)"):
        tok.encode(torch.zeros(1, 3, 256, 256, device="meta"))
    with pytest.raises(FileNotFoundError, match="local path"):
        tok.load_backbone("no/such/dinov2.pth")


def test_load_dinov2_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "not_dino.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="does not hold dinov2_vitl14_reg4"):
        load_dinov2(path)


# ----------------------------------------------------------------------------------------------
# Tiny preset: round trip and decode causality
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = HitaTokenizer(TokenizerConfig.from_name("tiny")).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        hol, patch = tok.encode(images)
    return tok, images, hol, patch


def test_tiny_round_trip_shapes(tiny):
    tok, images, hol, patch = tiny
    cfg = tok.cfg
    assert hol.shape == (2, cfg.n_holistic) and patch.shape == (2, cfg.n_patch)
    assert hol.dtype == patch.dtype == torch.int64
    assert 0 <= int(hol.min()) and int(hol.max()) < cfg.codebook_size
    with torch.no_grad():
        out = tok.decode(hol, patch)
        fused = tok.fuse(hol, patch)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert fused.shape == (2, cfg.dim, cfg.grid, cfg.grid)
    with pytest.raises(ValueError, match="patch_ids must be"):
        tok.decode(hol, patch[:, :-1])


def _changed_cells(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return (a != b).flatten(2).any(dim=1).any(dim=0).nonzero().flatten().tolist()  # raster cell ids


def test_last_shift_k_patch_tokens_never_reach_pixels(tiny):
    tok, _, hol, patch = tiny
    k = tok.cfg.shift_k
    other = patch.clone()
    other[:, -k:] = (other[:, -k:] + 1 + torch.arange(k)) % tok.cfg.codebook_size
    with torch.no_grad():
        assert torch.equal(tok.decode(hol, other), tok.decode(hol, patch))


@pytest.mark.parametrize("j", [0, 17, 59])
def test_patch_token_j_first_changes_cell_j_plus_shift_k(tiny, j):
    tok, _, hol, patch = tiny
    other = patch.clone()
    other[:, j] = (other[:, j] + 7) % tok.cfg.codebook_size
    with torch.no_grad():
        changed = _changed_cells(tok.fuse(hol, patch), tok.fuse(hol, other))
    assert changed[0] == j + tok.cfg.shift_k  # cells before it are bit-identical


def test_late_holistic_tokens_first_change_the_first_cells(tiny):
    tok, _, hol, patch = tiny
    cfg = tok.cfg
    for i, first in ((cfg.n_holistic - cfg.shift_k + 1, 1), (cfg.n_holistic - 1, cfg.shift_k - 1), (0, 0)):
        other = hol.clone()
        other[:, i] = (other[:, i] + 5) % cfg.codebook_size
        with torch.no_grad():
            assert _changed_cells(tok.fuse(hol, patch), tok.fuse(other, patch))[0] == first


def test_codebook_rows_are_renormalised_at_lookup(tiny):
    tok, _, hol, patch = tiny
    with torch.no_grad():
        ref = tok.decode(hol, patch)
        saved = {n: q.embedding.weight.clone() for n, q in (("p", tok.quantize), ("s", tok.slot_quantize))}
        try:
            for q in (tok.quantize, tok.slot_quantize):
                # Powers of two scale exactly, so the normalised rows (and the output) are bit-identical.
                scale = 2.0 ** torch.randint(-3, 4, (q.n_codes, 1)).float()
                q.embedding.weight.mul_(scale)
            assert torch.equal(tok.decode(hol, patch), ref)
            tok.quantize.embedding.weight.mul_(3.7)
            torch.testing.assert_close(tok.decode(hol, patch), ref, rtol=1e-5, atol=1e-5)
        finally:
            tok.quantize.embedding.weight.copy_(saved["p"])
            tok.slot_quantize.embedding.weight.copy_(saved["s"])


def test_reconstruct_matches_decode_and_trains():
    torch.manual_seed(0)
    tok = HitaTokenizer(TokenizerConfig.from_name("tiny")).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok.reconstruct(images)
    assert isinstance(out, TokenizerOutput) and out.vfm_loss is None
    with torch.no_grad():
        hol, patch = tok.encode(images)
        torch.testing.assert_close(out.recon, tok.decode(hol, patch), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.holistic_ids, hol) and torch.equal(out.patch_ids, patch)
    assert out.quant_loss.dim() == 0 and out.quant_loss.item() > 0
    tok.train()
    out = tok.reconstruct(images)
    (out.recon.square().mean() + out.quant_loss).backward()
    assert tok.encoder.conv_in.weight.grad is not None  # straight-through reaches the encoder
    assert torch.equal(tok.quantize.codebook_used[-tok.cfg.n_patch * 2:], out.patch_ids.flatten().float())


# ----------------------------------------------------------------------------------------------
# DINOv2 branch and the Hita-U head (toy ViT standing in for ViT-L)
# ----------------------------------------------------------------------------------------------


def _toy_u() -> HitaTokenizer:
    cfg = TokenizerConfig(
        "toy-u", image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, dim=64, depth=2,
        num_heads=4, head_dim=16, mlp_dim=192, dropout=0.0, n_holistic=16, shift_k=4, codebook_size=512,
        backbone="dinov2_vitl14_reg4", backbone_dim=32, backbone_image_size=28, vfm_recon=True, vfm_grid=2,
    )
    tok = HitaTokenizer(cfg)
    tok.attach_backbone(DinoV2(dim=32, depth=1, n_heads=2, patch_size=14, base_grid=3, n_registers=4))
    return tok


def test_hita_u_path_gives_a_vfm_loss_and_keeps_backbone_frozen():
    torch.manual_seed(0)
    tok = _toy_u().train()
    assert not tok.backbone.training and not tok.backbone.pretrained_encoder.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok.reconstruct(images)
    assert out.recon.shape == (2, 3, 32, 32) and out.vfm_loss.dim() == 0
    assert 0.0 <= out.vfm_loss.item() <= 2.0
    out.vfm_loss.backward()
    # The feature loss trains the holistic path (through the straight-through slots), not the pixels.
    assert tok.decode_transformer.proj.weight.grad is not None
    assert tok.pre_slots_quant.weight.grad is not None
    assert tok.decoder.conv_out.weight.grad is None
    assert all(p.grad is None for p in tok.backbone.parameters())
    assert all("backbone" not in k for k in tok.state_dict())
    hol, patch = tok.eval().encode(images)
    assert hol.shape == (2, 16) and patch.shape == (2, 64)


def test_dinov2_wrapper_drops_registers_and_normalises_input():
    torch.manual_seed(0)
    vit = DinoV2(dim=32, depth=1, n_heads=2, patch_size=14, base_grid=3, n_registers=4)
    wrap = DinoV2Features(vit, image_size=42)  # 3x3 grid = base grid: no pos-embed resize
    images = torch.rand(1, 3, 42, 42) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    full = vit.forward_features(((images + 1) / 2 - mean) / std)  # (1, 1 + 4 + 9, 32)
    got = wrap(images)
    assert got.shape == (1, 10, 32)
    torch.testing.assert_close(got, torch.cat([full[:, :1], full[:, 5:]], dim=1))


def test_dinov2_pos_embed_is_resized_antialiased_to_the_grid():
    torch.manual_seed(0)
    vit = DinoV2(dim=8, depth=1, n_heads=2, patch_size=14, base_grid=37, n_registers=4)
    pos = vit.position_embedding(16, 16)
    assert pos.shape == (1, 257, 8)
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.flatten(2).transpose(1, 2))
    assert torch.equal(pos[:, :1], vit.pos_embed[:, :1])


def test_resize_336_to_224_is_gaussian_3x3_sigma_quarter_then_bicubic():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    # Independent reference: 2-D kernel, numpy reflect padding, explicit sum.
    k1 = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.25**2))
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    blurred = sum(k2[a, b] * padded[..., a:a + 12, b:b + 12] for a in range(3) for b in range(3))
    want = F.interpolate(torch.from_numpy(blurred), size=(8, 8), mode="bicubic", align_corners=True)
    torch.testing.assert_close(antialiased_resize(x, 8), want)  # 12 -> 8 is the same 1.5x factor
    assert antialiased_resize(x, 12) is x


def test_vfm_queries_use_the_16_1_over_21_factor():
    torch.manual_seed(0)
    head = DecodeTransformer(TokenizerConfig.from_name("hita-u")).eval()
    with torch.no_grad():
        grid = head.position_embedding.reshape(1, 21, 21, 512).permute(0, 3, 1, 2)
        by_factor = F.interpolate(grid, scale_factor=16.1 / 21, mode="bicubic", align_corners=False)
        by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
        queries = head.vfm_queries() - head.mask_embedding
        torch.testing.assert_close(queries, by_factor.flatten(2).transpose(1, 2))
        # Regression guard: the plain 16x16 resize samples different coordinates.
        assert not torch.allclose(queries, by_size.flatten(2).transpose(1, 2))
        pred = head.vfm(torch.randn(2, 128, 512))
        assert pred.shape == (2, 256, 1024)
        slots = torch.randn(1, 128, 512)
        moved = slots.clone()
        moved[:, -1] += 1.0
        # Queries attend to every holistic token, the last one included.
        assert (head.vfm(slots) != head.vfm(moved)).flatten(1).any(dim=1).all()


# ----------------------------------------------------------------------------------------------
# Full size
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_hita_v_decode_runs():
    torch.manual_seed(0)
    tok = HitaTokenizer(TokenizerConfig.from_name("hita-v")).eval()
    hol = torch.randint(0, 16384, (1, 128))
    patch = torch.randint(0, 16384, (1, 441))
    with torch.inference_mode():
        out = tok.decode(hol, patch)
    assert out.shape == (1, 3, 336, 336) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
