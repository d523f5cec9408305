"""The voxel-wise statistical baseline as a method ("voxelwise"): per-voxel mean and standard deviation of the
intensity-normalised normal volumes (all on one grid, e.g. registered to a template or aligned with
``--align affine``), each voxel's variance pooled with its neighbours' (``pool_sigma``); heatmap = |z| (each
voxel's smallest against the normals within ``search`` voxels, ``baselines.search_zscore``) smoothed with a
Gaussian of ``smooth_sigma`` voxels, 0 outside the foreground and outside the normals' support
(``VoxelwiseStats.support``); volume score = mean of the ``top_k`` highest voxels. Fitted in one pass (no gradient
training)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch

from ...baselines import VoxelwiseStats, topk_mean, zscore_heatmap
from ..base import PreparedVolume, VolumeModel

__all__ = ["VoxelwiseConfig", "VoxelwiseModel"]


@dataclass(frozen=True)
class VoxelwiseConfig:
    name: str = "default"
    smooth_sigma: float = 1.0  # voxels
    top_k: int = 50
    std_floor: float = 0.5  # see VoxelwiseStats.fit
    # each voxel's variance pooled with its neighbours' (Gaussian sigma in voxels; VoxelwiseStats.fit says why);
    # files written before it existed were fitted without (0) and keep their statistics
    pool_sigma: float = 2.0
    # each voxel's |z| is the smallest against the normals within this many voxels (per axis; 0 = the plain |z|;
    # baselines.search_zscore says why); files written before it existed keep the plain |z|
    search: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.smooth_sigma < 0 or self.top_k < 1 or self.std_floor < 0 or self.pool_sigma < 0:
            raise ValueError("voxelwise: smooth_sigma, std_floor and pool_sigma must be >= 0 and top_k >= 1")
        if isinstance(self.search, bool) or not isinstance(self.search, int) or self.search < 0:
            raise ValueError(f"voxelwise: search is a whole number of voxels, 0 or more (got {self.search!r})")


class VoxelwiseModel(VolumeModel):
    """Buffers ``mean`` and ``std``: (n, h, w) float32 on the canonical slice-first grid of the normals; ``n``;
    ``support``: (n, h, w) bool, where most normals are foreground (empty in files written before it existed: no
    restriction)."""

    method: ClassVar[str] = "voxelwise"
    PRESETS: ClassVar[Mapping[str, VoxelwiseConfig]] = {"default": VoxelwiseConfig()}
    default_preset: ClassVar[str] = "default"
    # every slice counts, and the method smooths its own maps (in voxels)
    preprocessing_defaults: ClassVar[Mapping[str, Any]] = {"min_foreground": 0.0, "heatmap_sigma_mm": 0.0}
    fuse_intensity: ClassVar[bool] = False  # its map is the intensity |z| map

    @classmethod
    def get_config(cls, spec: Any, **overrides: Any) -> VoxelwiseConfig:
        if isinstance(spec, VoxelwiseConfig):
            cfg = spec
        elif isinstance(spec, dict):
            known = {f.name for f in fields(VoxelwiseConfig)}
            if set(spec) - known:
                raise ValueError(f"unknown voxelwise settings {sorted(set(spec) - known)}")
            # stored before pooling / the search existed: fitted without pooling, scored with the plain |z|
            cfg = VoxelwiseConfig(**{"pool_sigma": 0.0, "search": 0, **spec})
        elif spec in cls.PRESETS:
            cfg = cls.PRESETS[spec]
        else:
            raise ValueError(f"unknown preset {spec!r} for method voxelwise; choose one of {sorted(cls.PRESETS)}")
        cfg = replace(cfg, **overrides) if overrides else cfg
        cfg.validate()
        return cfg

    def __init__(self, config: Any = "default"):
        super().__init__()
        self.config = self.get_config(config)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))
        self.register_buffer("n", torch.zeros((), dtype=torch.int64))
        self.register_buffer("support", torch.zeros(0, dtype=torch.bool))

    _BUFFERS = ("mean", "std", "n", "support")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The grid is only known from the file: the buffers take the stored shapes. Files written before the
        support existed have none (their heatmaps stay as they were)."""
        missing = {"mean", "std", "n"} - set(state_dict)
        extra = set(state_dict) - set(self._BUFFERS)
        if (missing or extra) and strict:
            raise RuntimeError(f"voxelwise state: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for k in self._BUFFERS:
            if k in state_dict:
                setattr(self, k, state_dict[k].detach().clone().to(getattr(self, k).device))
        return None

    def training_data(self, volumes: Sequence[PreparedVolume]) -> list:
        return list(volumes)

    def fit(self, data: Sequence[PreparedVolume], progress: Optional[Callable[[int, int], None]] = None) -> None:
        def arrays():
            for i, v in enumerate(data):
                yield v.norm, v.fg
                if progress is not None:
                    progress(i + 1, len(data))

        stats = VoxelwiseStats.fit(arrays(), self.config.std_floor, pool_sigma=self.config.pool_sigma)
        self.mean = torch.from_numpy(stats.mean)
        self.std = torch.from_numpy(stats.std)
        self.n = torch.tensor(stats.n, dtype=torch.int64)
        self.support = torch.from_numpy(stats.support)

    def _stats(self) -> VoxelwiseStats:
        if self.mean.numel() == 0:
            raise RuntimeError("the voxelwise model is not fitted yet")
        return VoxelwiseStats(self.mean.cpu().numpy(), self.std.cpu().numpy(), int(self.n),
                              self.support.cpu().numpy() if self.support.numel() else None)

    def score_volume(self, volume: PreparedVolume) -> tuple[np.ndarray, float]:
        stats = self._stats()
        if volume.norm.shape != stats.mean.shape:
            raise ValueError(
                f"the voxelwise model compares voxels by position and needs volumes on its grid {stats.mean.shape} "
                f"(slice axis first, RAS order); this volume gives {volume.norm.shape}. Register the volume to the "
                "template (or train with --align affine).")
        heat = zscore_heatmap(volume.norm, volume.fg, stats, self.config.smooth_sigma, search=self.config.search)
        return heat, topk_mean(heat, self.config.top_k)
