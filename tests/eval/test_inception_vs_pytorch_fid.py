"""Our FID Inception against pytorch-fid's (0.3.0): the same weights give the same pool3 features and
1008 logits, bit for bit.

pytorch-fid is the PyTorch port that made ``pt_inception-2015-12-05-6726825d.pth`` from the TensorFlow
graph ADM's evaluator uses; its network is torchvision's Inception-v3 with the FID graph's changes.
Neither package is a dependency of hita: ``.ci/run`` installs both, without their dependencies, into
``.venv/crosscheck`` (the command is :data:`FIX`), and the comparison runs in a subprocess so that
torchvision never enters the test process. The weights are random (no download), with BatchNorm
statistics and affine terms drawn away from their defaults so every term of every layer counts; a
deliberate change (an average pool where the last block has a max pool) must be seen.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIDE = Path(os.environ.get("HITA_CROSSCHECK", ROOT / ".venv" / "crosscheck"))
FIX = "pip install --no-deps --target .venv/crosscheck torchvision==0.28.0 pytorch-fid==0.3.0"

SCRIPT = r"""
import json, sys, types
import numpy as np, torch
sys.path.append(sys.argv[1])
# The torchvision wheel is built against CUDA torch; its C++ ops (nms, ...) do not load on CPU torch and
# registering their meta kernels fails at import. Inception needs none of them.
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import pytorch_fid.inception as pfi
from hita.eval.inception import FIDInception, InceptionFeatures

torch.manual_seed(0)
ours = FIDInception().eval()
sd = ours.state_dict()
g = torch.Generator().manual_seed(1)
for k, v in sd.items():
    if k.endswith(("running_mean", "bn.bias")):
        v.copy_(0.1 * torch.randn(v.shape, generator=g))
    elif k.endswith(("running_var", "bn.weight")):
        v.copy_(0.5 + torch.rand(v.shape, generator=g))
ours.load_state_dict(sd)
pfi.load_state_dict_from_url = lambda *a, **k: sd  # what pytorch-fid would otherwise download
ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
net = pfi.fid_inception_v3().eval()
imgs = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
got = InceptionFeatures(ours)(imgs)
with torch.no_grad():
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    pool3 = ref(x)[0].flatten(1).numpy()
    x299 = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    logits = net(2 * x299 - 1).numpy()
ours.Mixed_7c.max_pool = False
changed = InceptionFeatures(ours)(imgs)
print(json.dumps({
    "pool3": float(np.abs(got.features - pool3).max()), "pool3_scale": float(np.abs(pool3).max()),
    "logits": float(np.abs(got.logits - logits).max()), "logits_scale": float(np.abs(logits).max()),
    "changed": float(np.abs(changed.features - pool3).max()),
}))
"""


def test_same_features_and_logits_as_pytorch_fid():
    if not (SIDE / "pytorch_fid").is_dir() or not (SIDE / "torchvision").is_dir():
        pytest.skip(f"pytorch-fid / torchvision not in {SIDE}; install them for this cross-check: {FIX}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(SIDE)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["pool3_scale"] > 0.1 and d["logits_scale"] > 0.05  # real activations, not zeros
    # Same ops on the same CPU in the same order: equal to float32 rounding (observed: 0.0 exactly).
    assert d["pool3"] <= 1e-6 * d["pool3_scale"] and d["logits"] <= 1e-6 * d["logits_scale"], d
    assert d["changed"] > 1e-3 * d["pool3_scale"], d  # the check can fail
