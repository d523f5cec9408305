"""The method seam: what every anomaly-detection method implements so that the Detector, the training loop, the
CLI, the MONAI Label app and the Slicer module can use it without knowing which method it is.

A method is an ``nn.Module`` subclass of :class:`SliceModel` (2-D: scores slices of the volume, like SP-Mamba) or
:class:`VolumeModel` (3-D: scores the whole volume at once, like the voxel-wise baseline or Spatial-MSMA), registered
by name in :mod:`spmamba.methods.registry`. The Detector owns everything that is the same for every method
(reading, canonical RAS grid, intensity scaling, foreground, optional alignment, 3-D smoothing, position-aware
normalisation, calibration, versions, saving); the method owns its network/statistics, its loss and its scores.

Each method's configuration is split in two: an architecture config (a frozen dataclass with ``name``, ``to_dict``;
what the model *is*, stored in the model file) and, for methods trained by gradient descent, a
:class:`TrainingSettings` (how it is optimised) reachable as ``config.training``. Presets (``PRESETS``) are per
method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..preprocessing import slices_to_batch

__all__ = ["TrainingSettings", "MethodConfig", "AnomalyModel", "SliceModel", "VolumeModel", "PreparedVolume", "SLICE", "VOLUME"]

SLICE = "slice"
VOLUME = "volume"


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation of gradient-trained methods (the shared loop in ``spmamba.train``): AdamW with
    lr = base_lr * batch_size / 16, betas 0.9/0.999, ``weight_decay``, lr x0.1 at 80% of ``epochs``, gradient
    norm clipped at ``grad_clip``."""

    batch_size: int = 16
    base_lr: float = 0.005
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    epochs: int = 1000

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class MethodConfig:
    """What the architecture configs (frozen dataclasses with a ``training`` field of :class:`TrainingSettings`)
    share: reading one back from a model file's dict, and changing settings by name. ``LABEL`` names the method in
    errors; ``TUPLE_SETTINGS`` are the settings a model file stores as lists."""

    LABEL: ClassVar[str] = "model"
    TUPLE_SETTINGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """A config from ``to_dict``'s output; training settings found beside the architecture's (SP-Mamba files
        written before the split) move under ``training``. Unknown names: ValueError (a newer file)."""
        d = dict(d)
        training = dict(d.pop("training", None) or {})
        for k in TrainingSettings.names() & set(d):
            training[k] = d.pop(k)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.LABEL} settings {sorted(unknown)}; this file needs a newer spmamba")
        unknown = set(training) - TrainingSettings.names()
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; this file needs a newer spmamba")
        return cls(**cls._tuples(d), training=TrainingSettings(**training))

    def with_overrides(self, **kw: Any) -> Any:
        """A copy with architecture and training settings (epochs, batch_size ...) changed by name."""
        train_kw = {k: kw.pop(k) for k in TrainingSettings.names() & set(kw)}
        if train_kw:
            kw["training"] = replace(kw.get("training", self.training), **train_kw)
        return replace(self, **self._tuples(kw))

    @classmethod
    def _tuples(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if k in cls.TUPLE_SETTINGS else v for k, v in d.items()}


class PreparedVolume(NamedTuple):
    """One volume after the Detector's preprocessing (``preprocessing.prepare_slices``), slice axis first, RAS order."""

    norm: np.ndarray  # (n, h, w) float32 scaled intensities (normal tissue in [0, 1])
    fg: np.ndarray  # (n, h, w) bool foreground
    keep: list  # indices of the slices with enough foreground
    spacing: np.ndarray  # (3,) mm along (slice, row, column)


class AnomalyModel(nn.Module):
    """What the Detector and the training loop need from a method. Subclass SliceModel or VolumeModel.

    Class attributes: ``method`` (registry name, written into model files), ``kind`` (SLICE or VOLUME),
    ``PRESETS`` (preset name -> architecture config), ``default_preset``, ``preprocessing_defaults`` (settings of
    ``preprocessing.Preprocessing`` that differ for this method, e.g. no 3-D smoothing), ``fuse_intensity``."""

    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    PRESETS: ClassVar[Mapping[str, Any]] = {}
    default_preset: ClassVar[str] = ""
    preprocessing_defaults: ClassVar[Mapping[str, Any]] = {}
    #: whether the Detector fuses this method's position-normalised maps with the |z| map of the voxel intensities by
    #: default (``Detector.intensity_stats``); False for methods whose maps are intensity statistics already
    fuse_intensity: ClassVar[bool] = True

    config: Any

    # ------------------------------------------------------------ construction
    #: the architecture config's class, for the default :meth:`get_config`: it has ``from_dict(dict)``,
    #: ``with_overrides(**kw)`` and ``validate()``; methods whose configs do not follow that write their own
    config_class: ClassVar[Optional[type]] = None

    @classmethod
    def get_config(cls, spec: Any, **overrides: Any) -> Any:
        """A preset name, a config or a dict of settings (as stored in a model file), then overrides -> a validated
        architecture config (with ``.training`` for gradient-trained methods)."""
        if cls.config_class is None:
            raise NotImplementedError(f"{cls.__name__}: set config_class or write get_config")
        if isinstance(spec, cls.config_class):
            cfg = spec
        elif isinstance(spec, Mapping):
            cfg = cls.config_class.from_dict(spec)
        elif spec in cls.PRESETS:
            cfg = cls.PRESETS[spec]
        else:
            raise ValueError(f"unknown preset {spec!r} for method {cls.method}; choose one of "
                             f"{', '.join(cls.PRESETS)}")
        if overrides:
            cfg = cfg.with_overrides(**overrides)
        cfg.validate()
        return cfg

    @classmethod
    def build(cls, config: Any, encoder_weights: str = "none") -> "AnomalyModel":
        """A new, untrained model. ``encoder_weights`` concerns methods with a pretrained part; others ignore it."""
        return cls(config)

    # ------------------------------------------------------------ training
    @property
    def training_settings(self) -> Optional[TrainingSettings]:
        """None for methods fitted in one pass (``fit``) instead of by gradient descent."""
        return getattr(self.config, "training", None)

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    #: self-supervised objectives with which ``pretrain`` can train the method's pretrained part (a teacher) on the
    #: normal training data before the first step; () = nothing to pretrain
    PRETRAIN_OBJECTIVES: ClassVar[tuple] = ()

    def teacher_record(self, encoder_weights: str) -> Optional[dict]:
        """Where a new model's pretrained part (teacher) comes from, for ``meta["teacher"]``; None: it has none."""
        return None

    def pretrain(self, data: Any, objective: str, *, steps: Optional[int] = None, seed: int = 0,
                 deadline: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
                 progress: Optional[Callable[[dict], None]] = None, encoder_weights: str = "none") -> dict:
        """Pretrain the teacher (built from ``encoder_weights``) on ``training_data``'s result with one of
        ``PRETRAIN_OBJECTIVES`` for at most ``steps`` steps (None: the method's default), ending early on
        ``should_stop()`` or ``deadline`` (a ``time.time()`` value); progress phase "pretrain". Returns the record
        for ``meta["teacher"]``."""
        raise NotImplementedError(f"method {self.method!r} has no teacher to pretrain")

    def preparation_phase(self, encoder_weights: str) -> Optional[str]:
        """Name of a preparation run on the training data before the first step of a new model (its progress
        phase and the ``meta`` key of its note), or None."""
        return None

    def prepare(self, data: Any, progress: Optional[Callable[[int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> str:
        """Run the preparation on ``training_data``'s result (possibly shuffled); returns a note for ``meta``."""
        return ""

    def training_data(self, volumes: Sequence[PreparedVolume]) -> Any:
        """Training samples from the preprocessed normal volumes: a tensor indexed on its first axis for
        gradient-trained methods, anything ``fit`` accepts otherwise."""
        raise NotImplementedError

    #: the progress phase (and its unit) of ``training_samples``' work
    SAMPLES_PHASE: ClassVar[str] = "teacher_features"
    SAMPLES_UNIT: ClassVar[str] = "batch"

    def training_samples(self, data: Any, planned_samples: int,
                         progress: Optional[Callable[[int, int], None]] = None,
                         should_stop: Optional[Callable[[], bool]] = None) -> Any:
        """What the optimisation loop indexes (``samples[idx].to(device)`` is passed to ``training_loss``), made once
        after the preparation from ``training_data``'s result. ``planned_samples``: how many samples the planned
        steps will draw (a cache that costs one pass only pays when this is at least ``len(data)``). Default: the
        data itself; SP-Mamba adds its frozen teacher's features (``models.spmamba.TeacherFeatureCache``)."""
        return data

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch of training samples (gradient-trained methods)."""
        raise NotImplementedError

    #: the named stages of a method trained in several stages, in order (e.g. Spatial-MSMA's ("score", "flow"));
    #: () = one stage. The shared loop moves the model from one stage to the next (``begin_stage``) at the
    #: epoch - or, under a time limit, the moment - given by ``stage_shares``; each stage keeps the one optimiser
    #: (parameters a stage does not train simply get no gradient), and the stage is part of the model's state, so a
    #: checkpoint resumed in a later stage continues there.
    TRAINING_STAGES: ClassVar[tuple] = ()

    @property
    def training_stage(self) -> int:
        """Index of the current stage in ``TRAINING_STAGES`` (stored with the model)."""
        return 0

    def stage_shares(self) -> tuple:
        """Share of the epochs (and of the optimisation time under a time limit) of each stage; sums to 1."""
        return (1.0,)

    def begin_stage(self, index: int) -> None:
        """Move to stage ``index`` (e.g. freeze what the earlier stages trained); ``training_samples`` and
        ``training_loss`` then follow the stage."""
        raise NotImplementedError

    def fit(self, data: Any, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """One-pass fitting on ``training_data``'s result (methods without ``training_settings``)."""
        raise NotImplementedError


class SliceModel(AnomalyModel):
    """A 2-D method: scores square slices of side ``config.image_size``."""

    kind: ClassVar[str] = SLICE

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def score_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, S, S) scaled intensities -> (anomaly maps (n, S, S), slice scores (n,)), on the model's device."""
        raise NotImplementedError

    def training_data(self, volumes: Sequence[PreparedVolume]) -> torch.Tensor:
        """All foreground slices as one (n, 1, S, S) tensor."""
        return torch.cat([slices_to_batch(v.norm[v.keep], self.image_size)[0] for v in volumes])


class VolumeModel(AnomalyModel):
    """A 3-D method: scores a whole volume at once."""

    kind: ClassVar[str] = VOLUME

    def score_volume(self, volume: PreparedVolume) -> tuple[np.ndarray, float]:
        """-> (heatmap (n, h, w) float32 on the volume's grid, 0 where there is nothing to score; volume score)."""
        raise NotImplementedError

    def training_data(self, volumes: Sequence[PreparedVolume]) -> list:
        return list(volumes)
