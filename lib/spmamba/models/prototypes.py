"""Window-sliding prototypes (SP-Mamba): a learnable bank of K prototypes per bottleneck position, matched
against the features in a small window around that position.

For position p and prototype k: sim_k(p) = max over q in the w x w window around p (clipped at the borders) of
cos(P[p, k], X[q]);  d(p) = min_k (1 - sim_k(p)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["prototype_distance", "prototype_distance_loop", "PrototypeBank"]


def _window_mask(H: int, W: int, window: int, device) -> torch.Tensor:
    """(HW_q, HW_p) bool: feature position q lies in the window x window neighbourhood of prototype position p."""
    r = window // 2
    rows = torch.arange(H, device=device).repeat_interleave(W)
    cols = torch.arange(W, device=device).repeat(H)
    near_r = (rows[:, None] - rows[None, :]).abs() <= r
    near_c = (cols[:, None] - cols[None, :]).abs() <= r
    return near_r & near_c


def prototype_distance(features: torch.Tensor, prototypes: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Vectorised window-sliding prototype distance.

    One matrix product gives the cosine of every feature position with every prototype; positions outside a
    prototype's window are masked out before the max (at the map's small size, e.g. 8x8, the dense product is
    cheaper than gathering windows).

    Args:
        features: (B, H, W, C) bottleneck features X.
        prototypes: (H*W, K, C) prototype bank P (row-major positions).
        window: odd window side w.
    Returns:
        d: (B, H, W), d(p) = min_k (1 - max_{q in window(p)} cos(P[p,k], X[q])).
    """
    if window % 2 != 1:
        raise ValueError(f"window must be odd, got {window}")
    B, H, W, C = features.shape
    if prototypes.shape[0] != H * W or prototypes.shape[2] != C:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} do not fit features {tuple(features.shape)}: need ({H * W}, K, {C})")
    K = prototypes.shape[1]
    x = F.normalize(features.reshape(B, H * W, C), dim=-1)  # (B, HW_q, C)
    p = F.normalize(prototypes, dim=-1).reshape(H * W * K, C)  # (HW_p * K, C)
    sims = torch.matmul(x, p.t()).view(B, H * W, H * W, K)  # (B, q, p, k)
    outside = ~_window_mask(H, W, window, features.device)  # (q, p)
    sims = sims.masked_fill(outside[None, :, :, None], float("-inf"))
    best = sims.amax(dim=1)  # (B, p, k): best feature in each prototype's window
    return (1.0 - best).amin(dim=-1).view(B, H, W)


def prototype_distance_loop(features: torch.Tensor, prototypes: torch.Tensor, window: int = 3) -> torch.Tensor:
    """The published formula as the public code computes it (reference for tests and the benchmark): loops over
    batch, position and prototype; for each, the cosine of the prototype with the features of the window around
    the position (clipped at the borders), then the max; d = min over prototypes of (1 - max)."""
    B, H, W, C = features.shape
    K = prototypes.shape[1]
    r = window // 2
    flat = features.reshape(B, H * W, C)
    sims = features.new_empty(B, H * W, K)
    for b in range(B):
        for p in range(H * W):
            i, j = divmod(p, W)
            neighbours = [qi * W + qj for qi in range(max(0, i - r), min(H, i + r + 1))
                          for qj in range(max(0, j - r), min(W, j + r + 1))]
            for k in range(K):
                sims[b, p, k] = F.cosine_similarity(prototypes[p, k], flat[b, neighbours], dim=1).max()
    return (1 - sims).amin(dim=-1).view(B, H, W)


class PrototypeBank(nn.Module):
    """Learnable (H*W, K, C) bank; forward(features (B, H, W, C)) -> d (B, H, W). Learned only by gradient."""

    def __init__(self, size: int, n_prototypes: int, channels: int, window: int = 3):
        super().__init__()
        self.window = window
        self.prototypes = nn.Parameter(torch.randn(size * size, n_prototypes, channels) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return prototype_distance(features, self.prototypes, self.window)
