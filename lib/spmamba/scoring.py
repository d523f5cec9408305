"""Anomaly maps, image / volume scores, calibration thresholds and suspicious regions.

Shapes: feature lists hold (B, C, h, w) tensors; maps are (B, S, S) at the model's input size S.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

__all__ = [
    "abnormal_voxels",
    "feature_distance_map",
    "gaussian_blur",
    "contrast_term",
    "concentration_term",
    "image_score",
    "aggregate_slice_scores",
    "smooth_within_mask",
    "calibrate_threshold",
    "find_regions",
]


def feature_distance_map(enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Mean over levels of (1 - cos(f_enc, f_dec)) upsampled bilinearly to size x size. -> (B, S, S)."""
    maps = []
    for fe, fd in zip(enc, dec):
        d = 1.0 - F.cosine_similarity(fe, fd, dim=1)  # (B, h, w)
        maps.append(F.interpolate(d.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False))
    return torch.stack(maps, 0).mean(0).squeeze(1)


_BLURS: dict[tuple[float, str], GaussianFilter] = {}


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, S, S) maps (MONAI's separable filter, truncated at 4 sigma, zero padding)."""
    if sigma <= 0:
        return maps
    key = (float(sigma), str(maps.device))
    if key not in _BLURS:
        _BLURS[key] = GaussianFilter(spatial_dims=2, sigma=sigma, truncated=4.0).to(maps.device)
    return _BLURS[key](maps.unsqueeze(1)).squeeze(1)


def contrast_term(maps: torch.Tensor) -> torch.Tensor:
    """C = mean |DoG(A; sigma 0.5, 1.0)| per map. (B, S, S) -> (B,)."""
    dog = gaussian_blur(maps, 0.5) - gaussian_blur(maps, 1.0)
    return dog.abs().mean(dim=(-2, -1))


def concentration_term(maps: torch.Tensor) -> torch.Tensor:
    """K = mean_p ||p - p*|| * (A(p) - A(p*))^2 with p* = argmax A (pixel units). (B, S, S) -> (B,)."""
    B, H, W = maps.shape
    flat = maps.reshape(B, -1)
    peak_val, peak_idx = flat.max(dim=1)
    rows = torch.arange(H, device=maps.device, dtype=maps.dtype).view(1, H, 1)
    cols = torch.arange(W, device=maps.device, dtype=maps.dtype).view(1, 1, W)
    pr = (peak_idx // W).to(maps.dtype).view(B, 1, 1)
    pc = (peak_idx % W).to(maps.dtype).view(B, 1, 1)
    dist = torch.sqrt((rows - pr) ** 2 + (cols - pc) ** 2)
    return (dist * (maps - peak_val.view(B, 1, 1)) ** 2).mean(dim=(-2, -1))


def image_score(maps: torch.Tensor, beta: float = 3750.0, gamma: float = -0.08, use_terms: bool = True) -> torch.Tensor:
    """SP-Mamba's image score max(A) + beta * contrast + gamma * concentration. (B, S, S) -> (B,)."""
    score = maps.amax(dim=(-2, -1))
    if use_terms:
        score = score + beta * contrast_term(maps) + gamma * concentration_term(maps)
    return score


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

