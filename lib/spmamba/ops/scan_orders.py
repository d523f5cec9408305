"""Scan orders: which position of an SxS feature map a 1-D sequence visits at each step.

Every order is a permutation ``perm`` of the row-major flat indices 0..S*S-1: sequence step j visits pixel
``perm[j]``. Its inverse ``argsort(perm)`` maps the scanned sequence back onto the grid. A map x of shape
(..., S*S) is scanned with ``x[..., perm]`` and restored with ``y[..., inverse]``.

Orders:
* ``raster_scan_order(S)``: row by row, left to right.
* ``hilbert_scan_order(S)``: the Hilbert curve (S a power of two), starting at the top-left corner (0, 0) and
  ending at the top-right corner (0, S-1); every step moves to a 4-neighbour.
* ``ch_scan_order(S)`` (Circular-Hilbert, SP-Mamba): S/4 concentric square rings from the outside in, each
  walked clockwise from its top-left corner (top row left->right, right column down, bottom row right->left,
  left column up), then the inner (S/2)x(S/2) block in Hilbert order starting at its top-left corner, which is
  a 4-neighbour of the last ring cell. Defined for S a power of two, S >= 4; other sizes raise ValueError
  (the model only produces maps of side 2**k).

The 8 directions of SP-Mamba's SS2D apply one base order to 4 orientations of the map (identity, transpose,
rot90, transpose of rot90) and also walk each of them backwards (``direction_permutations``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "raster_scan_order",
    "hilbert_scan_order",
    "ch_scan_order",
    "scan_order",
    "inverse_permutation",
    "direction_permutations",
    "SCAN_ORDERS",
]


def _check_power_of_two(S: int, name: str, minimum: int = 1) -> None:
    if not isinstance(S, (int, np.integer)) or S < minimum or (S & (S - 1)) != 0:
        raise ValueError(
            f"{name} scan order needs a square map whose side is a power of two >= {minimum}, got {S}; "
            "choose an input size of 2**k pixels (e.g. 128 or 256)"
        )


def raster_scan_order(S: int) -> np.ndarray:
    """Row-major order: the identity permutation of S*S indices."""
    if S < 1:
        raise ValueError(f"raster scan order needs S >= 1, got {S}")
    return np.arange(S * S, dtype=np.int64)


def _hilbert_d2xy(n: int, d: int) -> tuple[int, int]:
    """Position (x, y) of step d on the Hilbert curve of an n x n grid (n a power of two); (0,0) -> (n-1,0)."""
    x = y = 0
    t = d
    s = 1
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        t //= 4
        s *= 2
    return x, y


def _hilbert_cells(n: int) -> list[tuple[int, int]]:
    """(row, col) cells of an n x n block in Hilbert order, from (0, 0) to (0, n-1)."""
    # d2xy walks from (x=0,y=0) to (x=n-1,y=0); reading x as the column and y as the row gives row 0 at both ends.
    return [(y, x) for x, y in (_hilbert_d2xy(n, d) for d in range(n * n))]


def hilbert_scan_order(S: int) -> np.ndarray:
    """Hilbert-curve order of an SxS map (S a power of two)."""
    _check_power_of_two(S, "Hilbert")
    return np.array([r * S + c for r, c in _hilbert_cells(S)], dtype=np.int64)


def _ring_cells(S: int, k: int) -> list[tuple[int, int]]:
    """Cells of ring k (0 = outermost) of an SxS grid, clockwise from its top-left corner."""
    lo, hi = k, S - 1 - k
    cells = [(lo, c) for c in range(lo, hi + 1)]  # top row, left -> right
    cells += [(r, hi) for r in range(lo + 1, hi + 1)]  # right column, down
    cells += [(hi, c) for c in range(hi - 1, lo - 1, -1)]  # bottom row, right -> left
    cells += [(r, lo) for r in range(hi - 1, lo, -1)]  # left column, up
    return cells


def ch_scan_order(S: int) -> np.ndarray:
    """Circular-Hilbert order of an SxS map: S/4 rings outside-in, then the inner (S/2)^2 block in Hilbert order."""
    _check_power_of_two(S, "Circular-Hilbert", minimum=4)
    cells: list[tuple[int, int]] = []
    n_rings = S // 4
    for k in range(n_rings):
        cells += _ring_cells(S, k)
    inner = S // 2
    cells += [(n_rings + r, n_rings + c) for r, c in _hilbert_cells(inner)]
    order = np.array([r * S + c for r, c in cells], dtype=np.int64)
    assert len(order) == S * S and len(np.unique(order)) == S * S
    return order


SCAN_ORDERS = {"raster": raster_scan_order, "hilbert": hilbert_scan_order, "ch": ch_scan_order}


def scan_order(name: str, S: int) -> np.ndarray:
    """The base order called ``name`` ("raster", "hilbert" or "ch") for an SxS map."""
    try:
        fn = SCAN_ORDERS[name]
    except KeyError:
        raise ValueError(f"unknown scan order {name!r}; choose one of {sorted(SCAN_ORDERS)}") from None
    return fn(S)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """inverse[perm[j]] = j."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=perm.dtype)
    return inv


def _orientation_grids(S: int) -> list[np.ndarray]:
    """Flat indices of the grid seen in 4 orientations: identity, transpose, rot90, transpose of rot90."""
    grid = np.arange(S * S, dtype=np.int64).reshape(S, S)
    rot = np.rot90(grid, k=1)  # same convention as torch.rot90(x, 1, dims=(-2, -1))
    return [grid, grid.T, rot, rot.T]


@lru_cache(maxsize=64)
def _direction_permutations_np(name: str, S: int, n_directions: int) -> np.ndarray:
    if n_directions not in (1, 2, 4, 8):
        raise ValueError(f"n_directions must be 1, 2, 4 or 8, got {n_directions}")
    base = scan_order(name, S)
    n_orient = max(1, n_directions // 2)
    forward = [g.reshape(-1)[base] for g in _orientation_grids(S)[:n_orient]]
    perms = forward + ([p[::-1] for p in forward] if n_directions >= 2 else [])
    return np.stack(perms[:n_directions]).astype(np.int64)


def direction_permutations(name: str, S: int, n_directions: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutations for SS2D's multi-direction scan and their inverses.

    Returns:
        perms: (K, S*S) long; direction k visits flat pixel ``perms[k, j]`` at step j.
            Directions 0..K/2-1 are the base order on the orientations (identity, transpose, rot90,
            transpose of rot90); directions K/2..K-1 are the same walks reversed.
        inverses: (K, S*S) long, ``inverses[k, perms[k, j]] = j``.
    """
    perms = _direction_permutations_np(name, S, n_directions)
    invs = np.stack([inverse_permutation(p) for p in perms])
    return torch.from_numpy(perms.copy()), torch.from_numpy(invs)
