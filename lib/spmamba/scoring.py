"""Volume post-processing (numpy): volume scores from slice scores, 3-D smoothing inside the foreground,
calibration thresholds, what a heatmap calls abnormal and its connected regions, the fusion of two z-scale maps.

A model's own anomaly maps and image scores (torch) are in ``spmamba.models.anomaly_maps``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = [
    "abnormal_voxels",
    "aggregate_slice_scores",
    "smooth_within_mask",
    "calibrate_threshold",
    "find_regions",
    "FUSIONS",
    "fuse_maps",
    "INTENSITY_SEARCH_MM",
]


def aggregate_slice_scores(scores: np.ndarray, top_k: int = 3) -> float:
    """Volume score = mean of the top-k slice scores.

    One slice's score is a max over pixels, so a single noisy slice would dominate a plain max; the mean of the
    k highest slices still rewards a lesion that spans a few slices and damps isolated hot spots.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    k = min(top_k, scores.size)
    return float(np.sort(scores)[-k:].mean())


def smooth_within_mask(volume: np.ndarray, mask: np.ndarray, sigma_voxels: Sequence[float]) -> np.ndarray:
    """3-D Gaussian smoothing of ``volume`` that only averages voxels inside ``mask`` (normalised convolution:
    blur(v * m) / blur(m)), so the zeros outside the brain do not drag the values at its surface down.

    Why: SP-Mamba scores each slice on its own, so slice maps jitter from one slice to the next; averaging
    across slices (about one voxel) favours lesions, which span slices, over single-slice noise.
    ``sigma_voxels``: one sigma per axis, in voxels. Returns float32, 0 outside the mask.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    w = ndimage.gaussian_filter(m.astype(np.float32), sigma_voxels)
    v = ndimage.gaussian_filter(np.where(m, volume, 0.0).astype(np.float32), sigma_voxels)
    return np.where(m, v / np.maximum(w, 1e-6), 0.0).astype(np.float32)


def calibrate_threshold(normal_values: np.ndarray, false_positive_rate: float) -> float:
    """Threshold above which only ``false_positive_rate`` of the held-out normal values lie (a quantile)."""
    v = np.asarray(normal_values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no held-out normal values to calibrate a threshold on")
    if not 0 < false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    return float(np.quantile(v, 1.0 - false_positive_rate, method="higher"))


def abnormal_voxels(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """The one rule for what a heatmap calls abnormal: voxels **at or above** the calibrated pixel threshold
    (``heatmap >= threshold``, compared in the heatmap's own floating type, so a float32 heatmap read back from a
    file gives the same voxels), as a bool array of the heatmap's shape. Regions (:func:`find_regions`), the app's
    label map, the CLI's overlays and the lesion metrics (``spmamba.metrics``) all use it."""
    hm = np.asarray(heatmap)
    return hm >= (hm.dtype.type(threshold) if np.issubdtype(hm.dtype, np.floating) else threshold)


def find_regions(heatmap: np.ndarray, threshold: float, affine: Optional[np.ndarray] = None,
                 min_voxels: int = 1, max_regions: int = 20) -> list[dict]:
    """Connected regions (26-connectivity) of the abnormal voxels (:func:`abnormal_voxels`: ``heatmap >= threshold``),
    strongest peak first.

    Each region: label (1-based, in the returned order), n_voxels, volume_mm3, peak, mean,
    peak_voxel, centroid_voxel [i, j, k] and centroid_ras [x, y, z] (affine applied; identity if None).
    """
    from scipy import ndimage

    hm = np.asarray(heatmap)
    if hm.ndim == 2:
        hm = hm[..., None]
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    voxel_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    mask = abnormal_voxels(hm, threshold)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones_like(hm, dtype=np.float32), labels, index)
    peaks = ndimage.maximum(hm, labels, index)
    means = ndimage.mean(hm, labels, index)
    peak_pos = ndimage.maximum_position(hm, labels, index)
    centroids = ndimage.center_of_mass(mask.astype(np.float32), labels, index)
    regions = []
    for i in np.argsort(-np.asarray(peaks)):
        if counts[i] < min_voxels:
            continue
        c = np.asarray(centroids[i], dtype=np.float64)
        ras = aff @ np.append(c, 1.0)
        regions.append({
            "n_voxels": int(counts[i]),
            "volume_mm3": float(counts[i] * voxel_mm3),
            "peak": float(peaks[i]),
            "mean": float(means[i]),
            "peak_voxel": [int(v) for v in peak_pos[i]],
            "centroid_voxel": [float(v) for v in c],
            "centroid_ras": [float(v) for v in ras[:3]],
        })
        if len(regions) >= max_regions:
            break
    for k, r in enumerate(regions, 1):
        r["label"] = k
    return regions


#: how :func:`fuse_maps` combines a model's position-normalised map with the intensity |z| map (both >= 0, z-scale)
FUSIONS = ("geometric", "mean", "max")
#: the fused intensity |z| map's search distance (mm) for new models (``Detector.intensity_search_mm``,
#: ``baselines.search_zscore``): about the residual misregistration after the default (deformable) alignment
INTENSITY_SEARCH_MM = 4.0


def fuse_maps(model_z: np.ndarray, intensity_z: np.ndarray, fusion: str = "geometric") -> np.ndarray:
    """One anomaly map from two z-scale maps of the same shape (a model's position-normalised map and the |z| of
    the voxel's intensity against the normals at that position), float32:

    * ``geometric``: sqrt(model_z * intensity_z): high only where both depart from normal; the ranking of voxels
      does not depend on either map's scale (no weight to tune);
    * ``mean``: (model_z + intensity_z) / 2: high where either departs strongly;
    * ``max``: the larger of the two."""
    a = np.maximum(np.asarray(model_z, dtype=np.float32), 0.0)
    b = np.maximum(np.asarray(intensity_z, dtype=np.float32), 0.0)
    if a.shape != b.shape:
        raise ValueError(f"fuse_maps: maps of shapes {a.shape} and {b.shape}")
    if fusion == "geometric":
        return np.sqrt(a * b)
    if fusion == "mean":
        return (a + b) * np.float32(0.5)
    if fusion == "max":
        return np.maximum(a, b)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
