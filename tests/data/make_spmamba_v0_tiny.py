"""How tests/data/spmamba_v0_tiny.pt and its expected heatmap were written, with the code before the method seam
(commit 1d0d337; run from the repository root). Kept as a record: re-running it with newer code would defeat the
test."""
import os

import numpy as np
import torch

from spmamba.io import Volume
from spmamba.train import train_detector, calibrate
from spmamba.detector import Detector
rng = np.random.default_rng(0)
def ph(shape=(24, 28, 6)):
    a = np.zeros(shape, np.float32); a[4:20, 5:23, :] = 1 + 0.1 * rng.standard_normal((16, 18, shape[2])); return a
vols = [Volume(ph(), np.diag([2.0, 2.0, 3.0, 1.0])) for _ in range(4)]
det = train_detector(vols, config="tiny", max_steps=1, device="cpu", origin="fixture")
# shrink: every large weight becomes a strided view of 2048 random values with the same std (the file then stores
# 2048 values per tensor); the model is then recalibrated so the file is consistent
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in list(det.model.named_parameters()) + list(det.model.named_buffers()):
        if p.numel() <= 2048 or not p.is_floating_point():
            continue
        base = torch.randn(2048, generator=g) * p.float().std() + p.float().mean()
        dims = p.shape
        strides, primes = [], [1, 3, 7, 11, 13, 17, 19][:len(dims)]
        strides = list(reversed(primes))
        while sum((d - 1) * s for d, s in zip(dims, strides)) >= 2048:
            strides = [max(1, s // 2) if i < len(strides) - 1 else s for i, s in enumerate(strides)]
            if all(s == 1 for s in strides[:-1]) and sum((d - 1) * s for d, s in zip(dims, strides)) >= 2048:
                base = torch.randn(sum(d - 1 for d in dims) + 1, generator=g) * p.float().std() + p.float().mean()
                break
        view = base.as_strided(tuple(dims), tuple(strides))
        p.data = view
det.calibration = calibrate(det, vols[:2])
det.invalidate_version()
out = "tests/data/spmamba_v0_tiny.pt"
det.save(out)
print(os.path.getsize(out))
loaded = Detector.load(out, device="cpu")
x = np.zeros((24, 28, 6), np.float32); r2 = np.random.default_rng(7)
x[4:20, 5:23, :] = 1 + 0.1 * r2.standard_normal((16, 18, 6)); x[10:14, 12:16, 2:4] += 1.0
aff = np.diag([2.0, 2.0, 3.0, 1.0])
res = loaded.detect(x, aff)
np.savez("tests/data/spmamba_v0_tiny_expected.npz", input=x, affine=aff, heatmap=res.heatmap,
         score=np.float64(res.score), slice_scores=np.array(res.slice_scores, dtype=np.float64))
print(loaded.version, res.score, res.heatmap.max())
