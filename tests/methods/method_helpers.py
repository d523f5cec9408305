"""Helpers shared by the method tests (a plain module: conftest.py puts this folder on sys.path)."""
from __future__ import annotations

import numpy as np

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def box_volume(rng, lesion: bool = False, shape=(20, 24, 8)) -> np.ndarray:
    """A tiny normal-like volume: a noisy bright box in a zero background; ``lesion`` adds a brighter block inside.
    -> ``shape`` float32."""
    a = np.zeros(shape, np.float32)
    a[3:17, 4:20, 1:7] = 1 + 0.1 * rng.standard_normal((14, 16, 6))
    if lesion:
        a[8:12, 9:13, 3:5] += 1.5
    return a
