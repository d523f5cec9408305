"""The one training loop (used by the CLI and the MONAI Label trainer): SP-Mamba on the slices of normal volumes,
then calibration of the pixel and volume thresholds on held-out normal volumes.

Optimisation as published: AdamW (lr 0.005 * batch / 16, betas 0.9/0.999, weight decay 1e-4), lr x0.1 at 80% of
the epochs, gradient clipping at 5, no augmentation. Only the bottleneck, prototypes and decoder learn.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .detector import Calibration, Detector, Preprocessing, prepare_slices, resolve_device
from .models import SPMamba, get_config
from .scoring import calibrate_threshold
from .volume import Volume, VolumeError, load_volume, slices_to_batch, to_canonical

__all__ = ["train_detector", "TrainingDataError", "calibrate", "MIN_VOLUMES"]

log = logging.getLogger(__name__)
MIN_VOLUMES = 3  # at least 2 to train on + 1 held out for calibration
# per held-out volume, at most this many foreground heatmap values enter the pixel-threshold quantile
_PIXELS_PER_VOLUME = 200_000


class TrainingDataError(ValueError):
    """The training data cannot be used (too few volumes, unreadable files, no foreground ...)."""


def _load_all(volumes: Sequence[Union[str, Path, Volume]]) -> list[Volume]:
    out = []
    for v in volumes:
        if isinstance(v, Volume):
            out.append(v)
            continue
        try:
            out.append(load_volume(v))
        except VolumeError as e:
            raise TrainingDataError(f"cannot train on {v}: {e}") from e
    return out


def _slice_tensor(vols: list[Volume], prep: Preprocessing, size: int) -> torch.Tensor:
    """All foreground slices of the volumes as one (n, 1, S, S) float tensor of scaled intensities."""
    parts = []
    for v in vols:
        norm, _, keep, _ = prepare_slices(v.array, v.affine, prep)
        if not keep:
            raise TrainingDataError(f"{v.path or 'a volume'}: no slice has foreground; is it blank?")
        parts.append(slices_to_batch(norm[keep], size)[0])
    return torch.cat(parts)


def calibrate(detector: Detector, vols: list[Volume], pixel_fpr: float = 0.001, volume_fpr: float = 0.05,
              progress: Optional[Callable[[dict], None]] = None) -> Calibration:
    """Pixel threshold: the (1 - pixel_fpr) quantile of heatmap values inside the foreground of held-out normals.
    Volume threshold: the (1 - volume_fpr) quantile of their volume scores ('higher' method: with few volumes this
    is their maximum)."""
    rng = np.random.default_rng(0)
    pixel_values, scores = [], []
    for i, v in enumerate(vols):
        res = detector.detect(v.array, v.affine)
        vals = res.heatmap[res.foreground]
        if vals.size > _PIXELS_PER_VOLUME:
            vals = rng.choice(vals, _PIXELS_PER_VOLUME, replace=False)
        pixel_values.append(vals)
        scores.append(res.score)
        if progress:
            progress({"phase": "calibrate", "step": i + 1, "total_steps": len(vols)})
    return Calibration(
        pixel_threshold=calibrate_threshold(np.concatenate(pixel_values), pixel_fpr),
        volume_threshold=calibrate_threshold(np.array(scores), volume_fpr),
        pixel_fpr=pixel_fpr, volume_fpr=volume_fpr, n_volumes=len(vols),
        normal_volume_scores=[float(s) for s in scores],
    )


def _check_one_grid(vols: list[Volume]) -> None:
    """Position-aware normalisation compares voxels by position: every volume must be on one grid."""
    shapes: dict[tuple, str] = {}
    for i, v in enumerate(vols):
        shapes.setdefault(tuple(to_canonical(v.array, v.affine).array.shape), str(v.path or f"volume {i}"))
    if len(shapes) > 1:
        listed = "; ".join(f"{name}: {shape}" for shape, name in list(shapes.items())[:3])
        raise TrainingDataError(
            f"position-aware normalisation needs all volumes on one grid (registered to a template), but they have "
            f"{len(shapes)} shapes in RAS order ({listed}). Register them to one template first, or train without it.")


def _adapts_encoder_norm(setting: str, encoder_weights: str) -> bool:
    if setting == "auto":
        return encoder_weights in (None, "", "none", "random")
    return setting == "adapt"


def train_detector(
    volumes: Sequence[Union[str, Path, Volume]],
    *,
    config: Any = "fast",
    epochs: Optional[int] = None,
    device: Union[str, torch.device] = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    encoder_weights: str = "none",
    preprocessing: Optional[Preprocessing] = None,
    pixel_fpr: float = 0.001,
    volume_fpr: float = 0.05,
    progress: Optional[Callable[[dict], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    resume: Optional[Union[str, Path]] = None,
    checkpoint_path: Optional[Union[str, Path]] = None,
    max_steps: Optional[int] = None,
    position_normalise: bool = False,
) -> Detector:
    """Train SP-Mamba on normal volumes and calibrate it; see the module docstring.

    Args:
        volumes: paths or Volumes of normal scans (any shapes; slices are resized to the preset's size).
        config: preset name, SPMambaConfig or dict.
        epochs: number of epochs (default: the preset's).
        val_fraction: share of volumes held out for calibration (at least one).
        encoder_weights: "none", "imagenet" or a torchvision ResNet .pth file.
        progress: called with dicts {"phase", "epoch", "total_epochs", "step", "total_steps", "loss", ...}; in the
            "train" phase step/total_steps count within the epoch and global_step/total_global_steps over the
            whole training; other phases (prepare, calibrate ...) count their own items in step/total_steps.
        should_stop: polled every step; True ends training early (the result is still calibrated and usable).
        resume: a checkpoint written by an earlier run (with training state) to continue from.
        checkpoint_path: where to save after every epoch (atomically), with the training state for resuming.
        max_steps: stop after this many optimisation steps in total (for quick runs and tests).
        position_normalise: after training, fit per-voxel statistics of the heatmaps of the training volumes and
            z-score every heatmap against them (all volumes must share one grid; see ``Detector.position_stats``).
            Costs one detection per training volume; calibration then runs on the normalised maps.
    Returns:
        A calibrated Detector (not yet saved unless checkpoint_path was given; then that file is final too).
    """
    t_start = time.time()
    emit = progress or (lambda d: None)
    stop = should_stop or (lambda: False)
    vols = _load_all(volumes)
    if len(vols) < MIN_VOLUMES:
        raise TrainingDataError(
            f"{len(vols)} normal volume(s) given; at least {MIN_VOLUMES} are needed (some to learn from, one held out "
            "to calibrate the thresholds). Mark more studies normal or add volumes."
        )
    if position_normalise:
        _check_one_grid(vols)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vols))
    n_val = max(1, int(round(val_fraction * len(vols))))
    val_vols = [vols[i] for i in order[:n_val]]
    train_vols = [vols[i] for i in order[n_val:]]

    resume_obj = load_checkpoint(resume) if resume else None
    if resume_obj is not None:
        detector = Detector.from_payload(resume_obj, device=dev, source=f"resume file {resume}")
        cfg = detector.config
        prep = detector.preprocessing
    else:
        cfg = get_config(config)
        prep = preprocessing or Preprocessing()
        detector = Detector(SPMamba(cfg, encoder_weights=encoder_weights), prep, device=dev)
    model = detector.model
    total_epochs = int(epochs if epochs is not None else cfg.epochs)
    if total_epochs < 1:
        raise ValueError("epochs must be >= 1")

    emit({"phase": "prepare", "step": 0, "total_steps": len(train_vols)})
    data = _slice_tensor(train_vols, prep, cfg.image_size)
    n = data.shape[0]
    if resume_obj is None and _adapts_encoder_norm(cfg.encoder_norm, encoder_weights):
        emit({"phase": "encoder_norm", "step": 0, "total_steps": 1})
        with torch.no_grad():
            seen = model.adapt_encoder_norm(data)
        detector.meta["encoder_norm"] = f"adapted on {seen} training slices"
        log.info("encoder BatchNorm statistics re-estimated on %d normal slices", seen)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop the ragged last batch (BatchNorm in the bottleneck)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    milestone = max(1, int(math.floor(0.8 * total_epochs)))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=0.1)
    start_epoch = 0
    history: list[float] = []
    if resume_obj is not None and "training_state" in resume_obj:
        ts = resume_obj["training_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        start_epoch = int(ts["epoch"])
        history = list(ts.get("loss_history", []))

    def summary(epochs_done: int, stopped: bool) -> dict:
        return {
            "n_train_volumes": len(train_vols), "n_calibration_volumes": len(val_vols), "n_slices": int(n),
            "train_ids": [Path(v.path).name if v.path else f"volume{i}" for i, v in enumerate(train_vols)],
            "shapes": sorted({tuple(int(s) for s in v.array.shape) for v in vols}),
            "epochs": epochs_done, "total_epochs": total_epochs, "stopped_early": stopped,
            "steps": steps_before + step_total, "total_steps": planned_steps, "steps_per_epoch": steps_per_epoch,
            "final_loss": history[-1] if history else None, "loss_history": history[-50:],
            "encoder_weights": encoder_weights if resume_obj is None else detector.meta.get("training", {}).get("encoder_weights"),
            "train_seconds": time.time() - t_start, "device": str(dev),
            "position_normalise": detector.position_stats is not None,
            "encoder_norm": detector.meta.get("encoder_norm", "as in the weights"),
        }

    def save(epoch_done: int, stopped: bool) -> None:
        if checkpoint_path is None:
            return
        detector.meta["training"] = summary(epoch_done, stopped)
        detector.invalidate_version()
        detector.save(checkpoint_path, training_state={
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch_done,
            "loss_history": history,
        })

    step_total = 0  # optimisation steps in this run
    steps_before = start_epoch * steps_per_epoch  # ... and in the run this one resumes
    planned_steps = steps_before + steps_per_epoch * max(0, total_epochs - start_epoch)
    if max_steps is not None:
        planned_steps = min(planned_steps, steps_before + max_steps)
    stopped = False
    epoch = start_epoch
    g = torch.Generator().manual_seed(seed + start_epoch)
    for epoch in range(start_epoch, total_epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for step in range(steps_per_epoch):
            if stop() or (max_steps is not None and step_total >= max_steps):
                stopped = True
                break
            idx = perm[step * batch:(step + 1) * batch]
            out = model(data[idx].to(dev, non_blocking=True))
            loss = model.loss(out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            loss_value = loss.item()
            running += loss_value
            step_total += 1
            emit({"phase": "train", "epoch": epoch + 1, "total_epochs": total_epochs, "step": step + 1,
                  "total_steps": steps_per_epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                  "global_step": steps_before + step_total, "total_global_steps": planned_steps})
        if stopped and step == 0:
            break  # nothing learnt in this epoch
        history.append(running / max(1, step + (0 if stopped else 1)))
        scheduler.step()
        emit({"phase": "epoch", "epoch": epoch + 1, "total_epochs": total_epochs, "loss": history[-1]})
        if stopped:
            epoch += 1
            break
        save(epoch + 1, False)
    else:
        epoch = total_epochs
    epochs_done = epoch if stopped else total_epochs
    model.eval()
    if position_normalise:
        emit({"phase": "position_stats", "step": 0, "total_steps": len(train_vols)})
        detector.fit_position_stats(train_vols, lambda i, n: emit({"phase": "position_stats", "step": i,
                                                                   "total_steps": n}))
    detector.calibration = calibrate(detector, val_vols, pixel_fpr, volume_fpr, emit)
    detector.meta["training"] = summary(epochs_done, stopped)
    detector.meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    detector.invalidate_version()
    emit({"phase": "done", "epoch": epochs_done, "total_epochs": total_epochs,
          "global_step": steps_before + step_total, "total_global_steps": planned_steps,
          "loss": history[-1] if history else None,
          "val_score": float(np.mean(detector.calibration.normal_volume_scores))})
    if checkpoint_path is not None:
        detector.save(checkpoint_path, training_state={
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epochs_done,
            "loss_history": history,
        })
    return detector
