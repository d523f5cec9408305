"""Spatial-MSMA as a method ("spatial_msma"): localised multiscale score matching (Mahmood et al., "Spatial-MSMA:
localized multiscale score matching"; public code ``ahsanMah/sade``, MIT), a 3-D volume model trained in two
stages.

1. Score network (stage "score"): a noise-conditioned 3-D residual U-Net (``network.ScoreUNet``: BigGAN-style
   FiLM residual blocks, GroupNorm, sinusoidal embedding of log sigma, output divided by sigma) trained by denoising
   score matching under the variance-exploding SDE (``network.dsm_loss``; sigma = sigma_min (sigma_max /
   sigma_min) ** t, t uniform in [0, 1]). ``sigma_max`` is a setting or, when it is None, set before the first step
   to the largest distance between two training volumes (Song & Ermon 2020; the preparation phase "noise_scale").
2. Flow (stage "flow", score network frozen): per voxel, the L2 norms of the scores at ``levels`` noise scales
   (geometric from sigma_max to sigma_min) pooled over the 3 x 3 x 3 neighbourhood (``network.pooled_score_norms``)
   form an L-dim feature, standardised per level with the training volumes' statistics; a conditional normalising
   flow (``network.build_flow``, normflows) models its density given a sinusoidal 3-D position encoding of the
   voxel (``network.position_encoding``) and, with ``global_context``, the volume's mean standardised feature
   (a linear embedding of it). It learns by maximum likelihood on random foreground voxels of the training volumes;
   their features are computed once per volume and cached.

Detection: heatmap = the negative log-likelihood of each foreground voxel's feature (0 outside the foreground; a
value below 0 is clipped to 0), on the working grid, resized back onto the Detector's canonical grid; volume score =
mean of the ``top_k`` highest heatmap voxels.

Working grid: the foreground's bounding box of the canonical volume resampled (trilinear) to ``grid`` (a fixed
shape, so volumes batch and positions are comparable across volumes; brains registered to a template line up
best). Intensities: the Detector's scaled intensities (normal tissue in [0, 1]) mapped to [-1, 1], background -1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...baselines import topk_mean
from ..base import MethodConfig, PreparedVolume, TrainingSettings, VolumeModel
from .network import (ScoreUNet, build_flow, dsm_loss, largest_pairwise_distance, pooled_score_norms,
                      position_encoding, sigma_at, sigma_schedule)

__all__ = ["SpatialMSMAConfig", "SpatialMSMA", "PRESETS", "FeatureSamples"]

STAGES = ("score", "flow")


@dataclass(frozen=True)
class SpatialMSMAConfig(MethodConfig):
    """Architecture, noise schedule, features, flow and scoring of a Spatial-MSMA model; ``training`` says how it is
    optimised (one optimiser for both stages; ``score_share`` of the epochs - or of the optimisation time under a
    time limit - train the score network, the rest the flow)."""

    name: str = "paper"
    grid: tuple = (80, 112, 96)  # working grid (slice, row, column), each divisible by 2 ** (len(channels) - 1)
    channels: tuple = (64, 128, 256, 256)
    blocks: int = 2  # residual blocks per level, down and up
    groups: int = 32  # GroupNorm groups (fewer where a layer has fewer channels)
    emb_dim: int = 128  # noise embedding
    sigma_min: float = 0.06
    sigma_max: Optional[float] = None  # None: the largest distance between two training volumes
    levels: int = 20  # noise levels of the features
    flow_hidden: int = 256
    flow_blocks: int = 2  # (permutation, spline coupling) pairs after the autoregressive flow
    position_dim: int = 48  # channels of the position encoding (divisible by 6)
    global_context: bool = True
    global_dim: int = 16  # embedding of the volume's mean feature
    voxels_per_volume: int = 4096  # flow training voxels drawn per volume and step
    score_share: float = 0.7
    top_k: int = 200  # voxels of the volume score (top-k mean of the heatmap)
    training: TrainingSettings = field(default_factory=lambda: TrainingSettings(
        batch_size=4, base_lr=8e-4, weight_decay=0.0, grad_clip=1.0, epochs=1000))

    LABEL = "spatial_msma"
    TUPLE_SETTINGS = ("grid", "channels")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"], d["channels"] = list(self.grid), list(self.channels)
        return d

    @property
    def context_dim(self) -> int:
        return self.position_dim + (self.global_dim if self.global_context else 0)

    def validate(self) -> None:
        step = 2 ** (len(self.channels) - 1)
        if len(self.grid) != 3 or any(g < step or g % step for g in self.grid):
            raise ValueError(f"spatial_msma: grid {self.grid} must be 3 sizes, each a multiple of {step} "
                             f"(2 ** (levels of channels - 1))")
        if not self.channels or any(c < 1 for c in self.channels) or self.blocks < 1 or self.groups < 1:
            raise ValueError("spatial_msma: channels, blocks and groups must be >= 1")
        if self.emb_dim < 2 or self.emb_dim % 2:
            raise ValueError("spatial_msma: emb_dim must be even")
        if not 0 < self.sigma_min or (self.sigma_max is not None and self.sigma_max <= self.sigma_min):
            raise ValueError("spatial_msma: need 0 < sigma_min < sigma_max")
        if self.levels < 2:
            raise ValueError("spatial_msma: levels must be >= 2 (the flow couples the features)")
        if self.position_dim < 6 or self.position_dim % 6:
            raise ValueError("spatial_msma: position_dim must be a positive multiple of 6")
        if self.flow_hidden < 1 or self.flow_blocks < 0 or self.global_dim < 1 or self.voxels_per_volume < 1:
            raise ValueError("spatial_msma: flow_hidden, global_dim and voxels_per_volume must be >= 1, "
                             "flow_blocks >= 0")
        if not 0.0 < self.score_share < 1.0:
            raise ValueError("spatial_msma: score_share must be in (0, 1)")
        if self.top_k < 1:
            raise ValueError("spatial_msma: top_k must be >= 1")


PRESETS: dict[str, SpatialMSMAConfig] = {
    # As published, for a GPU: 2 mm MNI brains (96 x 112 x 80 in the paper) on a grid of the same size, a 4-level
    # residual U-Net of 2 blocks per level, 20 noise levels from 0.06, the public code's flow (256 hidden units).
    "paper": SpatialMSMAConfig(),
    # For a CPU workstation: ~4 mm working grid, a slim 3-level U-Net, 10 noise levels, a small flow.
    "fast": SpatialMSMAConfig(
        name="fast", grid=(48, 56, 48), channels=(16, 32, 64), blocks=1, groups=8, emb_dim=32, levels=10,
        flow_hidden=64, flow_blocks=1, position_dim=24, global_dim=8, voxels_per_volume=2048, top_k=50,
        training=TrainingSettings(batch_size=2, base_lr=8e-3, weight_decay=0.0, grad_clip=1.0, epochs=400)),
    # For tests only: seconds.
    "tiny": SpatialMSMAConfig(
        name="tiny", grid=(16, 16, 16), channels=(4, 8), blocks=1, groups=2, emb_dim=8, levels=3, flow_hidden=8,
        flow_blocks=1, position_dim=6, global_dim=2, voxels_per_volume=64, top_k=10, score_share=0.5,
        training=TrainingSettings(batch_size=2, base_lr=8e-3, weight_decay=0.0, grad_clip=1.0, epochs=4)),
}


def working_box(fg: np.ndarray) -> tuple[slice, slice, slice]:
    """The foreground's bounding box (the whole volume when it has none)."""
    idx = np.nonzero(fg)
    if not idx[0].size:
        return tuple(slice(0, s) for s in fg.shape)  # type: ignore[return-value]
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)  # type: ignore[return-value]


def to_working_grid(norm: np.ndarray, fg: np.ndarray, grid: Sequence[int]) -> torch.Tensor:
    """A canonical volume -> (2, *grid): channel 0 the intensities in [-1, 1] (background -1), channel 1 the
    foreground (0/1), both of the foreground's bounding box resized trilinearly (the mask then thresholded at 0.5)."""
    box = working_box(fg)
    x = torch.from_numpy(np.ascontiguousarray(norm[box], dtype=np.float32))
    m = torch.from_numpy(np.ascontiguousarray(fg[box], dtype=np.float32))
    x = (2.0 * x.clamp(0.0, 1.0) - 1.0) * m + (-1.0) * (1 - m)
    both = F.interpolate(torch.stack([x, m])[None], size=tuple(grid), mode="trilinear", align_corners=False)[0]
    both[1] = (both[1] >= 0.5).float()
    both[0] = torch.where(both[1] > 0, both[0], torch.full_like(both[0], -1.0))
    return both


class FeatureSamples:
    """What the shared loop indexes for Spatial-MSMA (``training_samples``): ``samples[idx]`` is the batch of working
    volumes (B, 2, *grid) while the model is in its score stage, and (B * voxels_per_volume, L + 3 + L) rows of
    [standardised feature | voxel position | the volume's mean standardised feature] of random foreground voxels of
    those volumes in its flow stage. The features are computed once per volume with the frozen score network when
    the samples are made in the flow stage (the loop makes them again at the change of stage; ``progress`` per
    volume, ``should_stop`` polled between volumes: a stop leaves them to be computed on first use), and the
    per-level standardisation is fitted then, for a model that has none yet."""

    def __init__(self, model: "SpatialMSMA", volumes: torch.Tensor,
                 progress: Optional[Callable[[int, int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None):
        self.model, self.volumes = model, volumes
        self.features: Optional[torch.Tensor] = None  # (n, L, *grid) raw pooled score norms
        self._globals: dict = {}  # volume index -> its mean standardised feature (1, L)
        if model.stage_index >= 1:
            self._cache(progress, should_stop)

    def __len__(self) -> int:
        return len(self.volumes)

    def _cache(self, progress: Optional[Callable[[int, int], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> Optional[torch.Tensor]:
        if self.features is None:
            m = self.model
            out = []
            for i in range(len(self.volumes)):
                if should_stop is not None and should_stop():
                    return None
                out.append(m.score_features(self.volumes[i:i + 1, :1].to(m.sigmas.device)).cpu())
                if progress is not None:
                    progress(i + 1, len(self.volumes))
            self.features = torch.cat(out)
            if not bool(m.standardised):
                m.fit_standardisation(self.features, self.volumes[:, 1] > 0)
        return self.features

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.model.stage_index == 0:
            return self.volumes[idx]
        feats, m = self._cache(), self.model
        k = m.config.voxels_per_volume
        rows = []
        for i in idx.tolist():
            mask = self.volumes[i, 1] > 0
            where = torch.nonzero(mask)  # (M, 3)
            pick = where[torch.randint(len(where), (k,))]
            f = m.standardise(feats[i][:, pick[:, 0], pick[:, 1], pick[:, 2]].T)  # (k, L)
            if i not in self._globals:
                self._globals[i] = m.standardise(feats[i][:, mask].T).mean(0, keepdim=True)
            g = self._globals[i].expand(k, -1)
            rows.append(torch.cat([f, pick.float(), g], dim=1))
        return torch.cat(rows)


class SpatialMSMA(VolumeModel):
    """The method "spatial_msma" of the registry; see the module docstring.

    Buffers: ``sigma_max_value`` (the VE SDE's sigma_max, 0 until set), ``stage`` (0 score network, 1 flow),
    ``feature_mean`` / ``feature_std`` (L,) and ``standardised`` (whether they are fitted)."""

    method: ClassVar[str] = "spatial_msma"
    PRESETS: ClassVar[Mapping[str, SpatialMSMAConfig]] = PRESETS
    default_preset: ClassVar[str] = "fast"
    config_class: ClassVar[type] = SpatialMSMAConfig
    TRAINING_STAGES: ClassVar[tuple] = STAGES
    SAMPLES_PHASE: ClassVar[str] = "score_features"  # the flow stage's feature cache, built on its first step
    SAMPLES_UNIT: ClassVar[str] = "vol"
    # every slice of the volume counts; the Detector's 3-D smoothing stays (the features are pooled already, 3 x 3 x 3)
    preprocessing_defaults: ClassVar[Mapping[str, Any]] = {"min_foreground": 0.0}
    fuse_intensity: ClassVar[bool] = False

    def __init__(self, config: Any = "fast"):
        super().__init__()
        self.config = cfg = self.get_config(config)
        self.score_net = ScoreUNet(1, cfg.channels, cfg.blocks, cfg.groups, cfg.emb_dim)
        self.flow = build_flow(cfg.levels, cfg.context_dim, cfg.flow_hidden, cfg.flow_blocks)
        self.global_embed = nn.Linear(cfg.levels, cfg.global_dim) if cfg.global_context else None
        self.register_buffer("sigma_max_value", torch.tensor(float(cfg.sigma_max or 0.0)))
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64))
        self.register_buffer("feature_mean", torch.zeros(cfg.levels))
        self.register_buffer("feature_std", torch.ones(cfg.levels))
        self.register_buffer("standardised", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ noise
    @property
    def sigma_max(self) -> float:
        """The VE SDE's sigma_max; a new model's is set from the training volumes before its first step (until then,
        e.g. for the training's timing of one detection, a placeholder of 100 sigma_min)."""
        s = float(self.sigma_max_value)
        return s if s > 0 else 100.0 * self.config.sigma_min

    @property
    def sigmas(self) -> torch.Tensor:
        """The L noise levels of the features (geometric, sigma_max down to sigma_min) on the model's device."""
        return sigma_schedule(self.config.sigma_min, self.sigma_max, self.config.levels).to(
            self.sigma_max_value.device)

    # ------------------------------------------------------------------ stages (the seam's multi-stage hooks)
    @property
    def stage_index(self) -> int:
        return int(self.stage)

    @property
    def training_stage(self) -> int:
        return self.stage_index

    def stage_shares(self) -> tuple:
        return (self.config.score_share, 1.0 - self.config.score_share)

    def begin_stage(self, index: int) -> None:
        """Stage 1 (flow): the score network is frozen from here on (its features are computed without
        gradients, so the optimiser leaves its weights as they are)."""
        self.stage.fill_(int(index))

    # ------------------------------------------------------------------ training
    def preparation_phase(self, encoder_weights: str) -> Optional[str]:
        return "noise_scale" if float(self.sigma_max_value) <= 0 else None

    def prepare(self, data: Any, progress: Optional[Callable[[int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> str:
        """sigma_max := the largest distance between two training volumes on the working grid."""
        d = largest_pairwise_distance(data[:, :1])
        self.sigma_max_value.fill_(max(d, 2.0 * self.config.sigma_min))
        if progress is not None:
            progress(1, 1)
        return f"sigma_max {float(self.sigma_max_value):.3g} (largest distance between {len(data)} training volumes)"

    def training_data(self, volumes: Sequence[PreparedVolume]) -> torch.Tensor:
        """(n, 2, *grid): each volume on the working grid (intensities in [-1, 1], foreground mask)."""
        return torch.stack([to_working_grid(v.norm, v.fg, self.config.grid) for v in volumes])

    def training_samples(self, data: Any, planned_samples: int,
                         progress: Optional[Callable[[int, int], None]] = None,
                         should_stop: Optional[Callable[[], bool]] = None) -> FeatureSamples:
        return FeatureSamples(self, data, progress, should_stop)

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Score stage: DSM loss of (B, 2, *grid) working volumes at sigma(t), t ~ U(0, 1). Flow stage: mean
        negative log-likelihood of (N, L + 3 + L) feature rows (``FeatureSamples``)."""
        if self.stage_index == 0:
            x = batch[:, :1]
            t = torch.rand(x.shape[0], device=x.device)
            sigma = sigma_at(t, self.config.sigma_min, self.sigma_max)
            return dsm_loss(self.score_net, x, sigma, torch.randn_like(x))
        L = self.config.levels
        return -self.log_likelihood(batch[:, :L], batch[:, L:L + 3], batch[:, L + 3:]).mean()

    # ------------------------------------------------------------------ features and density
    @torch.no_grad()
    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, *grid) working volumes -> (B, L, *grid) pooled score norms at the L noise levels (raw)."""
        scores = torch.stack([self.score_net(x, s.expand(x.shape[0])) for s in self.sigmas], dim=1)
        return pooled_score_norms(scores)

    def fit_standardisation(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        """Per-level mean and standard deviation of the (n, L, *grid) features over the (n, *grid) foreground."""
        vals = features.permute(1, 0, 2, 3, 4)[:, masks]  # (L, M)
        self.feature_mean.copy_(vals.mean(1))
        self.feature_std.copy_(vals.std(1).clamp_min(1e-6))
        self.standardised.fill_(True)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N, L) per level, with the training volumes' statistics."""
        return (features - self.feature_mean.to(features.device)) / self.feature_std.to(features.device)

    def context(self, positions: torch.Tensor, global_feature: torch.Tensor) -> torch.Tensor:
        """(N, 3) voxel positions on the working grid, (N, L) the volume's mean standardised feature -> (N, C)."""
        ctx = position_encoding(positions, self.config.position_dim)
        if self.global_embed is not None:
            ctx = torch.cat([ctx, self.global_embed(global_feature)], dim=1)
        return ctx

    def log_likelihood(self, features: torch.Tensor, positions: torch.Tensor,
                       global_feature: torch.Tensor) -> torch.Tensor:
        """log p(feature | position, volume context) of (N, L) standardised features -> (N,)."""
        return self.flow.log_prob(features, context=self.context(positions, global_feature))

    def score_volume(self, volume: PreparedVolume) -> tuple[np.ndarray, float]:
        cfg = self.config
        dev = self.sigma_max_value.device
        box = working_box(volume.fg)
        work = to_working_grid(volume.norm, volume.fg, cfg.grid).to(dev)
        mask = work[1] > 0
        heat_work = torch.zeros(cfg.grid, device=dev)
        if mask.any():
            feats = self.score_features(work[None, :1])[0]  # (L, *grid)
            pick = torch.nonzero(mask)
            f = self.standardise(feats[:, mask].T)
            g = f.mean(0, keepdim=True)
            nll = []
            for start in range(0, len(f), 65536):  # bounded memory on big grids
                sl = slice(start, start + 65536)
                nll.append(-self.log_likelihood(f[sl], pick[sl].float(), g.expand(len(f[sl]), -1)))
            heat_work[mask] = torch.cat(nll).clamp_min(0.0).float()
        size = tuple(s.stop - s.start for s in box)
        back = F.interpolate(heat_work[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
        heat = np.zeros(volume.norm.shape, dtype=np.float32)
        heat[box] = back.cpu().numpy()
        heat *= volume.fg
        return heat, topk_mean(heat, cfg.top_k, volume.fg if volume.fg.any() else None)
