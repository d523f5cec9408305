"""Methods by name. Built-in methods are listed in ``BUILTIN`` (imported when first asked for); others are added
with :func:`register_method` or named in the environment variable ``SPMAMBA_METHODS`` ("module:Class,..."; read on
the first lookup, so CLI processes and app servers started with it know those methods too)."""
from __future__ import annotations

import importlib
import os
from typing import Type

from .base import AnomalyModel

__all__ = ["BUILTIN", "DEFAULT_METHOD", "ENV_VAR", "register_method", "get_method", "method_names", "UnknownMethod"]

#: method name -> "module:Class" of its AnomalyModel subclass
BUILTIN = {
    "spmamba": "spmamba.models.spmamba:SPMamba",
    "voxelwise": "spmamba.methods.voxelwise:VoxelwiseModel",
    "memmc_mae": "spmamba.methods.memmc_mae:MemMCMAE",
    "spatial_msma": "spmamba.methods.spatial_msma:SpatialMSMA",
}
DEFAULT_METHOD = "spmamba"  # also the method of model files written before methods had names
ENV_VAR = "SPMAMBA_METHODS"

_classes: dict[str, Type[AnomalyModel]] = {}
_env_read: list[str] = []


class UnknownMethod(ValueError):
    """A method name nobody registered."""


def _import(target: str) -> Type[AnomalyModel]:
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
        raise TypeError(f"{target} is not an spmamba.methods.AnomalyModel subclass")
    return cls


def register_method(cls: Type[AnomalyModel]) -> Type[AnomalyModel]:
    """Register (or replace) a method under ``cls.method``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)) or not cls.method:
        raise TypeError("a method is an AnomalyModel subclass with a non-empty 'method' name")
    if cls.kind not in ("slice", "volume"):
        raise TypeError(f"method {cls.method!r}: kind must be 'slice' or 'volume' (subclass SliceModel or VolumeModel)")
    _classes[cls.method] = cls
    return cls


def _read_env() -> None:
    spec = os.environ.get(ENV_VAR, "")
    if spec in _env_read:
        return
    _env_read.append(spec)
    for target in filter(None, (s.strip() for s in spec.split(","))):
        register_method(_import(target))


def method_names() -> list[str]:
    """Every known method, built-in ones first."""
    _read_env()
    return list(BUILTIN) + sorted(n for n in _classes if n not in BUILTIN)


def get_method(name: str) -> Type[AnomalyModel]:
    _read_env()
    name = str(name)
    if name in _classes:
        return _classes[name]
    if name in BUILTIN:
        return register_method(_import(BUILTIN[name]))
    raise UnknownMethod(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
