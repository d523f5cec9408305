"""A toy method for the seam tests, registered at run time (``register_method``) or through the environment
(``SPMAMBA_METHODS=toy_method:ToyModel`` with this folder on PYTHONPATH): a one-layer convolutional "autoencoder" on
slices; heatmap = |slice - reconstruction|, slice score = its maximum. Nothing in the CLI, app or Slicer module
knows it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from spmamba.methods import SliceModel, TrainingSettings


@dataclass(frozen=True)
class ToyConfig:
    name: str = "small"
    image_size: int = 32
    channels: int = 4
    training: TrainingSettings = TrainingSettings(batch_size=4, base_lr=0.01, epochs=2)

    def to_dict(self) -> dict:
        return asdict(self)


class ToyModel(SliceModel):
    method = "toy"
    PRESETS = {"small": ToyConfig(), "smaller": ToyConfig(name="smaller", image_size=16, channels=2)}
    default_preset = "small"

    @classmethod
    def get_config(cls, spec: Any, **overrides: Any) -> ToyConfig:
        if isinstance(spec, ToyConfig):
            cfg = spec
        elif isinstance(spec, dict):
            d = dict(spec)
            cfg = ToyConfig(**{**d, "training": TrainingSettings(**d.get("training", {}))})
        elif spec in cls.PRESETS:
            cfg = cls.PRESETS[spec]
        else:
            raise ValueError(f"unknown preset {spec!r} for method toy")
        return replace(cfg, **overrides) if overrides else cfg

    def __init__(self, config: Any = "small"):
        super().__init__()
        self.config = self.get_config(config)
        c = self.config.channels
        self.net = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 1, 3, padding=1))

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return ((self.net(batch) - batch) ** 2).mean()

    def score_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = (self.net(batch) - batch).abs()[:, 0]
        return maps, maps.flatten(1).amax(1)
