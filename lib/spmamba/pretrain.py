"""A reusable in-domain teacher file (``spmamba pretrain``): the encoder of a method with a teacher (SP-Mamba),
pretrained self-supervised on normal volumes (``spmamba.models.pretrain``), written atomically in torchvision's
ResNet format so that ``spmamba train --encoder-weights FILE`` (``train_detector(encoder_weights=FILE)``) starts
from it; the model then records ``meta["teacher"] = {"source": "file", ...}`` with the file's own record.

The volumes are split as ``train_detector`` splits them (``split_normals(n, val_fraction, seed)``): only the
training share is used, so a model trained on the same folder with the same ``val_fraction`` and ``seed``
calibrates on volumes its teacher never saw.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .atomic import atomic_path
from .detector import resolve_device
from .io import Volume
from .methods import DEFAULT_METHOD, get_method
from .models.pretrain import TEACHER_FORMAT, encoder_state_torchvision
from .preprocessing import Preprocessing
from .train import (TrainingDataError, _load_all, check_teacher_pretrain, prepare_volumes, split_normals,
                    standardise_volumes)

__all__ = ["pretrain_teacher", "TEACHER_FORMAT"]

#: under a time limit, the share kept for re-estimating the BatchNorm statistics and writing the file
_AFTER_SHARE = 0.1


def pretrain_teacher(volumes: Sequence[Union[str, Path, Volume]], out: Union[str, Path], *,
                     objective: str = "inpaint", config: Any = None, method: Optional[str] = None,
                     steps: Optional[int] = None, time_limit: Optional[float] = None,
                     encoder_weights: str = "none", val_fraction: float = 0.2, seed: int = 0,
                     device: Union[str, torch.device] = "auto", preprocessing: Optional[Preprocessing] = None,
                     progress: Optional[Callable[[dict], None]] = None,
                     should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Pretrain the teacher of a new ``method`` model (default spmamba; ``config``: its preset, default the
    method's) on the training share of ``volumes`` with ``objective`` for ``steps`` steps (None: the method's
    default; with ``time_limit`` (seconds, the whole call) until 90% of it), re-estimate its BatchNorm statistics
    on the clean slices, and write ``out`` atomically: ``{"format": "spmamba-teacher", "format_version": 1,
    "arch", "image_size", "preset", "state_dict" (torchvision names, conv1..layer3), "teacher" (the record)}``.

    ``should_stop()`` ends the pretraining cleanly (the steps done are kept). Returns the record (``objective``,
    ``steps``, ``seconds``, ``slices_seen``, ``stop_reason`` ..., ``n_volumes``, ``train_ids``, ``encoder_norm``,
    ``written``: False, and no file, when it stopped before the first step). Raises ``TrainingDataError`` for
    unusable volumes and ``ValueError`` for bad options."""
    check_teacher_pretrain(method, objective, steps)
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit={time_limit}: must be > 0 seconds")
    t_start = time.time()
    deadline = t_start + float(time_limit) if time_limit is not None else None
    emit = progress or (lambda _d: None)
    out = Path(out)
    emit({"phase": "load", "step": 0, "total_steps": len(volumes), "unit": "vol"})
    vols = _load_all(volumes, lambda i, k: emit({"phase": "load", "step": i, "total_steps": k, "unit": "vol"}))
    if len(vols) < 2:
        raise TrainingDataError(f"{len(vols)} normal volume(s) given; pretraining needs at least 2 (one is held "
                                "out, as training holds it out for calibration)")
    train_idx, _ = split_normals(len(vols), val_fraction, seed)
    train_vols = [vols[i] for i in train_idx]
    cls = get_method(method or DEFAULT_METHOD)
    cfg = cls.get_config(config if config is not None else cls.default_preset)
    torch.manual_seed(seed)
    model = cls.build(cfg, encoder_weights=encoder_weights).to(resolve_device(device))
    prep = preprocessing or Preprocessing(**dict(cls.preprocessing_defaults))
    emit({"phase": "prepare", "step": 0, "total_steps": len(train_vols), "unit": "vol"})
    data = model.training_data(standardise_volumes(prepare_volumes(
        train_vols, prep, lambda i, k: emit({"phase": "prepare", "step": i, "total_steps": k, "unit": "vol"})), prep))
    pre_deadline = None
    if deadline is not None:
        pre_deadline = deadline - _AFTER_SHARE * max(0.0, deadline - time.time())
    record = model.pretrain(data, objective, steps=steps, seed=seed, deadline=pre_deadline,
                            should_stop=should_stop, progress=emit, encoder_weights=encoder_weights)
    record.update(n_volumes=len(train_vols), n_held_out_volumes=len(vols) - len(train_vols), n_slices=len(data),
                  train_ids=[Path(v.path).name if v.path else f"volume{i}" for i, v in enumerate(train_vols)],
                  preset=getattr(cfg, "name", None), seed=seed, val_fraction=val_fraction)
    if record.get("source") != "in-domain":  # stopped before the first step: nothing learnt, nothing written
        record.update(written=False, total_seconds=round(time.time() - t_start, 2))
        return record
    phase = model.preparation_phase(encoder_weights)
    if phase is not None:  # BatchNorm statistics of clean slices, not of the corrupted ones pretraining saw
        emit({"phase": phase, "step": 0, "total_steps": 1, "unit": "batch"})
        record[phase] = model.prepare(
            data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))], progress=lambda b, k:
            emit({"phase": phase, "step": b, "total_steps": k, "unit": "batch"}),
            should_stop=(lambda: time.time() > deadline) if deadline is not None else None)
    record.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), written=True,
                  total_seconds=round(time.time() - t_start, 2))
    payload = {"format": TEACHER_FORMAT, "format_version": 1, "arch": getattr(cfg, "encoder", None),
               "image_size": getattr(cfg, "image_size", None), "preset": getattr(cfg, "name", None),
               "state_dict": encoder_state_torchvision(model.encoder), "teacher": record}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, fsync=True) as tmp:
        torch.save(payload, tmp)
    return record
