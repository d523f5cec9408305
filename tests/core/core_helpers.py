"""Helpers shared by the core tests (a plain module, so any test order can import it)."""
from __future__ import annotations

import numpy as np

from spmamba.io import Volume


def small_volumes(n, shape=(24, 28, 6), seed=0):
    """``n`` tiny normal-like volumes: a noisy bright box in a zero background, 2 x 2 x 3 mm voxels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.zeros(shape, np.float32)
        a[4:20, 5:23, :] = 1 + 0.1 * rng.standard_normal((16, 18, shape[2]))
        out.append(Volume(a, np.diag([2.0, 2.0, 3.0, 1.0])))
    return out
