"""Anomaly-detection methods behind one seam (``base``) and a registry by name (``registry``); see
docs/ARCHITECTURE.md for how to add one."""
from .base import SLICE, VOLUME, AnomalyModel, PreparedVolume, SliceModel, TrainingSettings, VolumeModel
from .registry import DEFAULT_METHOD, UnknownMethod, get_method, method_names, register_method


def method_presets(name: str) -> list[str]:
    """The preset names of a method."""
    return list(get_method(name).PRESETS)


def min_epochs(name: str) -> int:
    """The fewest epochs a training of the method can have: one per training stage (``TRAINING_STAGES``)."""
    return max(1, len(get_method(name).TRAINING_STAGES))


__all__ = ["AnomalyModel", "SliceModel", "VolumeModel", "PreparedVolume", "TrainingSettings", "SLICE", "VOLUME",
           "DEFAULT_METHOD", "UnknownMethod", "get_method", "method_names", "register_method", "method_presets", "min_epochs"]
