"""SP-Mamba's anomaly maps and image scores (torch): feature distances, blur and the image score terms.

Shapes: feature lists hold (B, C, h, w) tensors; maps are (B, S, S) at the model's input size S. Post-processing of
assembled volumes (volume scores, 3-D smoothing, thresholds, regions) is ``spmamba.scoring``'s.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

__all__ = ["feature_distance_map", "gaussian_blur", "contrast_term", "concentration_term", "image_score"]


def feature_distance_map(enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor], size: int,
                         weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Mean over levels of (1 - cos(f_enc, f_dec)) upsampled bilinearly to size x size. -> (B, S, S).

    ``weights``: one per level for a weighted mean (None or all equal: the paper's plain mean); levels of weight 0
    are not computed."""
    weights = [1.0] * len(enc) if weights is None else [float(w) for w in weights]
    if len(weights) != len(enc):
        raise ValueError(f"{len(weights)} level weights for {len(enc)} feature levels")
    if sum(weights) <= 0:
        raise ValueError("every level weight is 0: at least one level must count")
    maps = []
    for fe, fd, w in zip(enc, dec, weights):
        if w == 0:
            continue
        d = 1.0 - F.cosine_similarity(fe, fd, dim=1)  # (B, h, w)
        maps.append(F.interpolate(d.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False))
    kept = [w for w in weights if w != 0]
    if len(set(kept)) == 1:  # equal weights: the plain mean (bit for bit what model files written before got)
        return torch.stack(maps, 0).mean(0).squeeze(1)
    return (sum(w * m for w, m in zip(kept, maps)) / sum(kept)).squeeze(1)


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
