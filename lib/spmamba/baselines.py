"""Reference detectors and position-aware statistics for volumes on a common grid.

* :class:`VoxelwiseStats` - per-voxel mean and standard deviation of a stack of same-shaped arrays (normal
  volumes, or the heatmaps a detector produced on normal volumes) and the z-score of a new array against them.
* :class:`VoxelwiseBaseline` - the classic statistical baseline: per-voxel mean/std of intensity-normalised normal
  volumes (intensities standardised to the normals' landmarks, the variance pooled over neighbouring voxels);
  heatmap = |z| (lightly smoothed, zero outside the foreground); volume score = mean of the top-k voxels.
* :func:`position_normalise` - the same statistics applied to a detector's heatmaps ("position-aware
  normalisation"): each voxel's anomaly value is compared with what the detector gives at that position on
  normal volumes, which removes the hot spots normal anatomy causes in the same place in every scan.

All of these assume the volumes share one voxel grid (registered to a template, as in the synthetic phantoms);
arrays of another shape are refused.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

from .preprocessing import fit_landmarks, normalise_intensity, standardise_intensity
from .scoring import smooth_within_mask

__all__ = ["VoxelwiseStats", "VoxelwiseAccumulator", "VoxelwiseBaseline", "position_normalise", "topk_mean",
           "search_zscore", "zscore_heatmap"]


def topk_mean(heatmap: np.ndarray, k: int = 50, region: Optional[np.ndarray] = None) -> float:
    """Mean of the k highest values of ``heatmap`` (inside ``region`` when given): a volume score that a single
    voxel cannot dominate."""
    v = np.asarray(heatmap, dtype=np.float64)
    v = v[region] if region is not None else v.ravel()
    if v.size == 0:
        return 0.0
    k = max(1, min(int(k), v.size))
    return float(np.partition(v, v.size - k)[-k:].mean())


@dataclass
class VoxelwiseStats:
    """Per-voxel mean and (floored) standard deviation of same-shaped arrays, and optionally their *support*: the
    voxels that are foreground in at least ``SUPPORT_SHARE`` of the fitted volumes (bool, same shape; None when the
    volumes came without foregrounds, e.g. statistics written before supports existed)."""

    mean: np.ndarray
    std: np.ndarray
    n: int
    support: Optional[np.ndarray] = None

    # A voxel is judged only where most normals have tissue: at the rim, where one subject's brain reaches a
    # voxel that few normals cover (residual warp after an affine alignment, partial volume), the statistics
    # compare tissue with background and give the largest z-scores of every normal volume (measured on the
    # phantoms: restricting the voxel-wise baseline to the support tripled its pixel AP). A majority keeps the
    # support about as large as a typical brain.
    SUPPORT_SHARE = 0.5

    @classmethod
    def fit(cls, arrays: Iterable, std_floor: float = 0.5,
            pool_sigma: "float | Sequence[float]" = 0.0) -> "VoxelwiseStats":
        """Streams the arrays (Welford). Each item is an array, or an ``(array, foreground)`` pair: with pairs the
        statistics also get their ``support`` (every item must then be a pair). ``std_floor``: the std is raised
        to at least ``std_floor`` times the median std over voxels that vary, so voxels that barely vary in the
        normals (background, few samples) do not give huge z-scores.

        ``pool_sigma`` (voxels, one per axis or one for all; 0 = off): the per-voxel variance is averaged with a
        Gaussian of this sigma over its neighbours (inside the support when there is one) before the square root.
        Why: from a few normals (16 in a typical training) each voxel's own variance is a noisy estimate (a
        chi-square with n - 1 degrees of freedom), and the voxels where it happens to come out small give a normal
        volume its highest z-scores; neighbouring voxels vary alike, so pooling them is a better estimate (measured
        on the unregistered phantoms, sigma 2 voxels: pixel AP of the voxel-wise method 0.087 -> 0.12, of SP-Mamba's
        position-normalised maps 0.090 -> 0.12, image AUROC +0.04-0.08). The mean stays per voxel."""
        acc = VoxelwiseAccumulator()
        for item in arrays:
            acc.add(*(item if isinstance(item, tuple) else (item,)))
        return acc.stats(std_floor, pool_sigma)

    def judged(self, region: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """``region`` (bool, the grid's shape; None = everywhere) restricted to the support, where there is one;
        None when neither restricts anything."""
        if self.support is None:
            return region
        return self.support if region is None else np.asarray(region, dtype=bool) & self.support

    def zscore(self, array: np.ndarray) -> np.ndarray:
        a = np.asarray(array, dtype=np.float32)
        if a.shape != self.mean.shape:
            raise ValueError(f"array shape {a.shape} differs from the statistics' grid {self.mean.shape}; "
                             "voxel-wise statistics need volumes on one common grid")
        return (a - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": int(self.n),
                **({"support": self.support} if self.support is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "VoxelwiseStats":
        support = d.get("support")
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32), int(d["n"]),
                   None if support is None else np.asarray(support, dtype=bool))


class VoxelwiseAccumulator:
    """Streaming (Welford) per-voxel mean and variance for :meth:`VoxelwiseStats.fit`, fed one array at a time with
    :meth:`add` (lets one pass over the normals feed several statistics)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.shape, self.covered = 0, None, None, None, None

    def add(self, array: np.ndarray, fg: Optional[np.ndarray] = None) -> None:
        """``array``: one volume (every one the same shape); ``fg``: its foreground, given for every array or none."""
        a = np.asarray(array, dtype=np.float64)
        if self.shape is None:
            self.shape, self.mean, self.m2 = a.shape, np.zeros(a.shape), np.zeros(a.shape)
            self.covered = None if fg is None else np.zeros(a.shape, np.int32)
        elif a.shape != self.shape:
            raise ValueError(f"all arrays must share one grid: got {a.shape} after {self.shape}")
        if (fg is None) != (self.covered is None):
            raise ValueError("give every array with its foreground, or none")
        if fg is not None:
            if np.shape(fg) != self.shape:
                raise ValueError(f"a foreground of shape {np.shape(fg)} for an array of shape {self.shape}")
            self.covered += np.asarray(fg, dtype=bool)
        self.n += 1
        d = a - self.mean
        self.mean += d / self.n
        self.m2 += d * (a - self.mean)

    def stats(self, std_floor: float = 0.5, pool_sigma: "float | Sequence[float]" = 0.0) -> "VoxelwiseStats":
        """The statistics so far (``VoxelwiseStats.fit`` says what ``std_floor`` and ``pool_sigma`` do)."""
        n, shape = self.n, self.shape
        if n < 2:
            raise ValueError("VoxelwiseStats needs at least 2 arrays")
        support = None if self.covered is None else self.covered >= VoxelwiseStats.SUPPORT_SHARE * n
        var = self.m2 / (n - 1)
        if np.any(np.asarray(pool_sigma, dtype=float) > 0):
            domain = support if support is not None and support.any() else np.ones(shape, dtype=bool)
            pooled = smooth_within_mask(var.astype(np.float32), domain, pool_sigma).astype(np.float64)
            var = np.where(domain, pooled, var)
        std = np.sqrt(var)
        varying = std[std > 1e-8]
        floor = std_floor * float(np.median(varying)) if varying.size else 1e-6
        return VoxelwiseStats(self.mean.astype(np.float32), np.maximum(std, max(floor, 1e-6)).astype(np.float32), n,
                              support)


def position_normalise(heatmap: np.ndarray, stats: VoxelwiseStats, region: Optional[np.ndarray] = None,
                       clip_negative: bool = True, search: "int | Sequence[int]" = 0) -> np.ndarray:
    """Heatmap -> z-score against the heatmaps of normal volumes at the same positions (>= 0 when
    ``clip_negative``; only values above normal are anomalous); 0 outside ``region`` when given and outside the
    statistics' support. ``search`` (voxels): the smallest z-score within that box (``search_zscore``; the product
    does not search the model's maps: they are smooth, measured without gain in docs/BENCHMARKS.md)."""
    z = search_zscore(heatmap, stats, search, absolute=False)
    if clip_negative:
        z = np.maximum(z, 0.0)
    region = stats.judged(region)
    if region is not None:
        z = np.where(region, z, 0.0)
    return z.astype(np.float32)


def zscore_heatmap(norm: np.ndarray, fg: np.ndarray, stats: VoxelwiseStats,
                   smooth_sigma: "float | Sequence[float]" = 1.0,
                   search: "int | Sequence[int]" = 0) -> np.ndarray:
    """|z| of normalised intensities against normal statistics, Gaussian-smoothed (``smooth_sigma`` voxels, one per
    axis or one for all; 0 = off), 0 outside the foreground ``fg`` and outside the statistics' support. Same shape
    as ``norm``, float32.

    ``search`` (voxels, one per axis or one for all; 0 = off): each voxel's |z| is the smallest against the
    statistics at any position within this box around it (``search_zscore``), before the smoothing."""
    z = search_zscore(norm, stats, search)
    if np.any(np.asarray(smooth_sigma, dtype=float) > 0):
        z = ndimage.gaussian_filter(z, smooth_sigma)
    return np.where(stats.judged(np.asarray(fg, dtype=bool)), z, 0.0).astype(np.float32)


def search_zscore(array: np.ndarray, stats: VoxelwiseStats, radius: "int | Sequence[int]" = 0,
                  absolute: bool = True) -> np.ndarray:
    """min over offsets d in the box [-radius, radius] (voxels, per axis) of |array(p) - mean(p + d)| / std(p + d)
    (``absolute=False``: of the signed (array(p) - mean(p + d)) / std(p + d), for maps where only high is abnormal):
    each voxel is compared with the normals at its own position and at its neighbours' (the statistics' edge values
    beyond the grid). Same shape as ``array``, float32; radius 0 is the plain (|z|) z-score.

    Why: after registration a subject's anatomy still sits up to a voxel or two from the normals' (residual warp,
    partial volume). At a tissue boundary (ventricle, cortex) the plain |z| compares the voxel with the normals' other
    tissue and gives a normal volume its highest scores; some neighbouring position holds the tissue the voxel really
    is, so its smallest |z| is low. A lesion departs from every tissue nearby and keeps a high score, whatever its
    size: the search removes misregistration, not small foci (docs/BENCHMARKS.md, "local search")."""
    a = np.asarray(array, dtype=np.float32)
    if a.shape != stats.mean.shape:
        raise ValueError(f"array shape {a.shape} differs from the statistics' grid {stats.mean.shape}; "
                         "voxel-wise statistics need volumes on one common grid")
    r = np.broadcast_to(np.asarray(radius, dtype=int), (a.ndim,))
    if np.any(r < 0):
        raise ValueError(f"search radius must be >= 0 voxels, got {tuple(int(x) for x in r)}")
    r = np.minimum(r, np.asarray(a.shape) - 1)  # no offsets beyond the grid (a 2-D image's single slice)
    if not r.any():
        z = stats.zscore(a)
        return np.abs(z) if absolute else z
    pad = [(int(x), int(x)) for x in r]
    mean, inv = np.pad(stats.mean, pad, mode="edge"), np.pad(1.0 / stats.std, pad, mode="edge")
    best = np.full(a.shape, np.inf, dtype=np.float32)
    for offset in itertools.product(*(range(2 * int(x) + 1) for x in r)):
        win = tuple(slice(o, o + n) for o, n in zip(offset, a.shape))
        diff = a - mean[win]
        np.minimum(best, (np.abs(diff) if absolute else diff) * inv[win], out=best)
    return best


class VoxelwiseBaseline:
    """Per-voxel mean/std of intensity-normalised normal volumes; |z| heatmap; top-k-mean volume score.

    On plain arrays; the same method behind the Detector (files, calibration, CLI, app) is the registered method
    "voxelwise" (``spmamba.methods.voxelwise``)."""

    def __init__(self, smooth_sigma: float = 1.0, top_k: int = 50, std_floor: float = 0.5, pool_sigma: float = 2.0,
                 standardise: bool = True, search: int = 2):
        self.smooth_sigma = float(smooth_sigma)
        self.search = int(search)  # voxels (search_zscore)
        self.top_k = int(top_k)
        self.std_floor = float(std_floor)
        self.pool_sigma = float(pool_sigma)
        self.standardise = bool(standardise)
        self.landmarks: Optional[list] = None  # fitted when standardise (preprocessing.fit_landmarks)
        self.stats: Optional[VoxelwiseStats] = None

    def _normalised(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        norm, fg = normalise_intensity(volume)
        if self.landmarks is not None:
            norm = standardise_intensity(norm, fg, self.landmarks)
        return norm, fg

    def fit(self, volumes: Iterable[np.ndarray]) -> "VoxelwiseBaseline":
        scaled = [normalise_intensity(v) for v in volumes]  # (norm, fg)
        self.landmarks = fit_landmarks(scaled) if self.standardise else None
        if self.landmarks is not None:
            scaled = [(standardise_intensity(n, f, self.landmarks), f) for n, f in scaled]
        self.stats = VoxelwiseStats.fit(scaled, self.std_floor, pool_sigma=self.pool_sigma)
        return self

    def heatmap(self, volume: np.ndarray) -> np.ndarray:
        if self.stats is None:
            raise RuntimeError("call fit() on normal volumes first")
        norm, fg = self._normalised(volume)
        return zscore_heatmap(norm, fg, self.stats, self.smooth_sigma, search=self.search)

    def score(self, heatmap: np.ndarray) -> float:
        return topk_mean(heatmap, self.top_k)

    def detect(self, volume: np.ndarray) -> tuple[np.ndarray, float]:
        h = self.heatmap(volume)
        return h, self.score(h)
