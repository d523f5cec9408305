"""The one training loop (used by the CLI, the MONAI Label trainer and the benchmarks) for every method of the
registry (``spmamba.methods``): a model on normal volumes, then calibration of the pixel and volume thresholds on
held-out normal volumes. Its named steps, each usable on its own:

1. ``split_normals``: training / held-out (calibration) volumes;
2. ``build_or_resume``: a new Detector for the method and preset, or the one in a checkpoint; alignment, if asked;
3. ``fit``: the method's preparation hook (SP-Mamba: encoder norm adaptation), then either the shared optimisation
   loop (methods with ``training_settings``: AdamW, lr x0.1 at 80% of the epochs, gradient clipping, no
   augmentation; only ``trainable_parameters`` learn) or the method's one-pass ``fit`` (statistical methods); the
   deadline, stop-request and progress bookkeeping the steps share is a ``TrainingBudget``, what it did a
   ``FitState``;
4. ``calibrate``: thresholds on the held-out normals;
5. ``publish``: the calibrated model, saved atomically.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import distributed
from .checkpoint import load_checkpoint, weights_digest
from .detector import DEFAULT_FUSION, Calibration, Detector, resolve_device, search_distance
from .io import Volume, VolumeError, load_volume
from .methods import DEFAULT_METHOD, PreparedVolume, get_method
from .preprocessing import Preprocessing, fit_landmarks, prepare_slices, standardise_intensity, to_canonical
from .registration import (ALIGN_METHODS, AffineAligner, AlignmentError, auto_spacing, calibrate_floor,
                           make_reference, mni152_fits)
from .scoring import FUSIONS, calibrate_threshold

__all__ = ["train_detector", "TrainingDataError", "calibrate", "MIN_VOLUMES", "split_normals", "build_or_resume",
           "prepare_volumes", "publish", "fit", "FitState", "TrainingBudget", "PRETRAIN_SHARE",
           "check_teacher_pretrain", "standardise_volumes", "stage_end_epochs"]

log = logging.getLogger(__name__)
MIN_VOLUMES = 3  # at least 2 to train on + 1 held out for calibration
#: under a deadline, the teacher's pretraining gets at most this share of the time left for training
PRETRAIN_SHARE = 0.25
#: under a deadline, the learning rate drops (x0.1) once this share of the optimisation's time has passed
LR_DROP_SHARE = 0.8
# per held-out volume, at most this many foreground heatmap values enter the pixel-threshold quantile
_PIXELS_PER_VOLUME = 200_000


class TrainingDataError(ValueError):
    """The training data cannot be used (too few volumes, unreadable files, no foreground ...)."""


def _load_all(volumes: Sequence[Union[str, Path, Volume]],
              progress: Optional[Callable[[int, int], None]] = None) -> list[Volume]:
    out = []
    for v in volumes:
        if isinstance(v, Volume):
            out.append(v)
        else:
            try:
                out.append(load_volume(v))
            except VolumeError as e:
                raise TrainingDataError(f"cannot train on {v}: {e}") from e
        if progress is not None:
            progress(len(out), len(volumes))
    return out


def split_normals(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the training and of the held-out (calibration) volumes among ``n`` normals, each in the order the
    training uses them: a seeded permutation, its first max(1, round(val_fraction * n)) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return [int(i) for i in order[n_val:]], [int(i) for i in order[:n_val]]


def prepare_volumes(vols: list[Volume], prep: Preprocessing,
                    progress: Optional[Callable[[int, int], None]] = None) -> list[PreparedVolume]:
    """The Detector's preprocessing of each volume (canonical slice-first grid, scaled intensities, foreground)."""
    out = []
    for i, v in enumerate(vols):
        norm, fg, keep, canon = prepare_slices(v.array, v.affine, prep)
        if not keep:
            raise TrainingDataError(f"{v.path or 'a volume'}: no slice has foreground; is it blank?")
        out.append(PreparedVolume(norm, fg, keep, canon.spacing_slice_first(prep.slice_axis)))
        if progress is not None:
            progress(i + 1, len(vols))
    return out


def standardise_volumes(prepared: list[PreparedVolume], prep: Preprocessing) -> list[PreparedVolume]:
    """Intensity standardisation for training (``preprocessing.standardise_intensity``): when ``prep.standardise``
    is on and ``prep`` has no landmarks yet (a new model), fit them on these normals (``fit_landmarks``) and store
    them in ``prep`` (so every later detection uses them); then map every volume onto them. Without
    standardisation the volumes are returned as they are."""
    if not prep.standardise:
        return prepared
    if prep.intensity_landmarks is None:
        prep.intensity_landmarks = fit_landmarks((v.norm, v.fg) for v in prepared)
        log.info("intensity landmarks fitted on %d normals: %s", len(prepared), prep.intensity_landmarks)
        return [v._replace(norm=standardise_intensity(v.norm, v.fg, prep.intensity_landmarks, prep.intensity_max))
                for v in prepared]
    return prepared  # prepare_volumes already standardised them with the stored landmarks


def build_or_resume(method: Optional[str] = None, config: Any = None, *, encoder_weights: str = "none",
                    preprocessing: Optional[Preprocessing] = None, device: Union[str, torch.device] = "auto",
                    resume: Optional[Union[str, Path]] = None) -> tuple[Detector, Optional[dict]]:
    """A new Detector with an untrained model of ``method`` (default spmamba) built from ``config`` (a preset
    name of that method - default its ``default_preset`` -, a config or a dict), or the Detector in the checkpoint
    ``resume`` (whose method must match ``method`` when given). Returns (detector, the resume file's payload or
    None)."""
    if resume:
        obj = load_checkpoint(resume)
        detector = Detector.from_payload(obj, device=device, source=f"resume file {resume}")
        if method is not None and detector.method_name != method:
            raise TrainingDataError(f"resume file {resume} holds a {detector.method_name} model, not {method}")
        return detector, obj
    cls = get_method(method or DEFAULT_METHOD)
    cfg = cls.get_config(config if config is not None else cls.default_preset)
    prep = preprocessing or Preprocessing(**dict(cls.preprocessing_defaults))
    return Detector(cls.build(cfg, encoder_weights=encoder_weights), prep, device=device), None


def publish(detector: Detector, path: Union[str, Path], training_state: Optional[dict] = None) -> Path:
    """Save the (calibrated) detector atomically, with the state to resume its training when given."""
    return detector.save(path, training_state=training_state)


def calibrate(detector: Detector, vols: list[Volume], pixel_fpr: float = 0.001, volume_fpr: float = 0.05,
              progress: Optional[Callable[[dict], None]] = None,
              deadline: Union[None, float, Callable[[], Optional[float]]] = None,
              seconds_per_volume: Optional[float] = None,
              wait: Optional[Callable[[], Any]] = None) -> Calibration:
    """Pixel threshold: the (1 - pixel_fpr) quantile of heatmap values inside the foreground of held-out normals.
    Volume threshold: the (1 - volume_fpr) quantile of their volume scores ('higher' method: with few volumes this
    is their maximum).

    ``deadline`` (a ``time.time()`` value): the volumes are used in order while the next one is expected to end
    before it (expected = the mean detection time so far); the first volume is always used.
    ``Calibration.n_volumes`` says how many were. A callable ``deadline`` is asked before each volume (None = no
    limit), so a limit that appears during calibration (a stop request) is followed. ``wait`` is called before each
    volume (``train_detector``: waits while the training is paused). ``seconds_per_volume`` is accepted for
    compatibility (the first volume is used whatever it takes).

    With several processes (``spmamba.distributed``, torchrun) each detects its share of the volumes (the rule
    above applies to each share) and the thresholds are computed from all of them, in order, on every rank."""
    rng = np.random.default_rng(0)
    pixel_values, scores, took = [], [], []
    ended: list = []  # the time limit ended this process's share of the volumes
    if progress:
        progress({"phase": "calibrate", "step": 0, "total_steps": len(vols), "unit": "vol"})

    def detect_one(i: int, v: Volume) -> Optional[tuple[np.ndarray, float]]:
        """-> (foreground heatmap values, volume score), or None when the time limit leaves it out."""
        if ended:
            return None
        if wait is not None:
            wait()
        limit = deadline() if callable(deadline) else deadline
        if limit is not None and took:  # the first volume (of each process's share) is always used
            if time.time() + float(np.mean(took)) > limit:
                ended.append(i)
                return None
        t0 = time.perf_counter()
        res = detector.detect(v.array, v.affine)
        took.append(time.perf_counter() - t0)
        if progress:
            progress({"phase": "calibrate", "step": i + 1, "total_steps": len(vols), "unit": "vol"})
        return res.heatmap[res.foreground], res.score

    # the volumes in order (one process), or each rank its share, gathered in order on every rank: the thresholds
    # are then computed from the same values everywhere
    for done in distributed.current().map(detect_one, vols):
        if done is None:
            continue
        vals, score = done
        if vals.size > _PIXELS_PER_VOLUME:
            vals = rng.choice(vals, _PIXELS_PER_VOLUME, replace=False)
        pixel_values.append(vals)
        scores.append(score)
    if len(scores) < len(vols):
        log.info("calibration: time limit; %d of %d held-out volumes used", len(scores), len(vols))
    return Calibration(
        pixel_threshold=calibrate_threshold(np.concatenate(pixel_values), pixel_fpr),
        volume_threshold=calibrate_threshold(np.array(scores), volume_fpr),
        pixel_fpr=pixel_fpr, volume_fpr=volume_fpr, n_volumes=len(scores),
        normal_volume_scores=[float(s) for s in scores],
    )


def resolve_fusion(fusion: Optional[str], model: Any, position_normalise: bool) -> Optional[str]:
    """``train_detector(fusion=...)`` -> the fusion to fit (None: none). Raises ValueError for an unknown one, or
    for a fusion without position-aware normalisation (the intensity statistics compare voxels by position)."""
    if fusion is None:
        return DEFAULT_FUSION if position_normalise and getattr(model, "fuse_intensity", False) else None
    if fusion == "none":
        return None
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose none or one of {', '.join(FUSIONS)}")
    if not position_normalise:
        raise ValueError(f"fusion {fusion!r} compares intensities by position and needs position-aware "
                         "normalisation (aligned volumes, or volumes on one grid with position_normalise=True)")
    return fusion


def _check_one_grid(vols: list[Volume]) -> None:
    """Position-aware normalisation compares voxels by position: every volume must be on one grid."""
    shapes: dict[tuple, str] = {}
    for i, v in enumerate(vols):
        shapes.setdefault(tuple(to_canonical(v.array, v.affine).array.shape), str(v.path or f"volume {i}"))
    if len(shapes) > 1:
        listed = "; ".join(f"{name}: {shape}" for shape, name in list(shapes.items())[:3])
        raise TrainingDataError(
            f"position-aware normalisation needs all volumes on one grid (registered to a template), but they have "
            f"{len(shapes)} shapes in RAS order ({listed}). Register them to one template first (or train with "
            "alignment: --align affine), or train without it.")


MAX_EXCLUDED_SHARE = 0.2  # normals that fail to align are left out, up to this share of them


def _alignment_reference(detector: Detector, align: Optional[str], reference: Union[str, Path],
                         train_vols: list[Volume], emit: Callable[[dict], None],
                         resumed: bool) -> tuple[str, Optional[AffineAligner], float]:
    """``_prepare_alignment``'s choice of the setting and its reference: (mode, aligner, seconds to build it);
    ("none", None, 0.0) without alignment. A new reference is built here (and set as ``detector.alignment``)."""
    have = detector.alignment.method if detector.alignment is not None else "none"
    mode = have if align is None else str(align)
    if mode not in ALIGN_METHODS:
        raise ValueError(f"align={mode!r}: choose one of {', '.join(ALIGN_METHODS)}")
    if mode == "auto":
        if resumed:
            mode = have
        else:
            if str(reference) != "auto":
                raise ValueError("align='auto' chooses its own reference (MNI152); give align='affine' with "
                                 f"align_reference={str(reference)!r}")
            emit({"phase": "reference", "step": 0, "total_steps": 1, "unit": "vol"})
            spacing = auto_spacing(train_vols)
            if not mni152_fits(train_vols, spacing=spacing):
                log.warning("no alignment: the normals are not brains that register to the MNI152 template "
                            "(--align affine --align-reference normals aligns them to a reference built from "
                            "themselves)")
                return "none", None, 0.0
            mode, reference = "deformable", f"mni152:{spacing:g}"
    if detector.alignment is not None and mode != have:
        raise TrainingDataError(f"the resumed model aligns its inputs (align={have}); resume it with the same "
                                "setting, or train a new model")
    if mode == "none":
        return "none", None, 0.0
    t0 = time.time()
    if detector.alignment is None:
        emit({"phase": "reference", "step": 0, "total_steps": len(train_vols), "unit": "vol"})
        try:
            ref = make_reference(reference, train_vols, progress=lambda i, k: emit(
                {"phase": "reference", "step": i, "total_steps": k, "unit": "vol"}))
        except AlignmentError as e:
            raise TrainingDataError(f"cannot build the alignment reference from the normals: {e}") from e
        except ValueError as e:
            raise TrainingDataError(str(e)) from e
        detector.alignment = AffineAligner(ref, deformable=mode == "deformable")
    return mode, detector.alignment, time.time() - t0


def _prepare_alignment(detector: Detector, align: Optional[str], reference: Union[str, Path],
                       train_vols: list[Volume], val_vols: list[Volume], emit: Callable[[dict], None],
                       resumed: bool = False) -> tuple[list[Volume], list[Volume], Optional[dict]]:
    """Alignment for training (``registration``): set ``detector.alignment`` (a new reference, or the resumed
    model's), register every training and held-out normal to it, calibrate the similarity floor on them, and return
    the training volumes on the reference grid, the held-out volumes that aligned (on their own grids: calibration
    detects them like any input) and a summary; ``(train_vols, val_vols, None)`` without alignment. Normals that
    fail to align are left out and listed in the summary's ``excluded`` (at most ``MAX_EXCLUDED_SHARE``).

    ``align``: None follows a resumed model (a new one: none); "auto" aligns a new model to MNI152 when the
    normals are brains that fit it (``registration.mni152_fits``, on a grid of ``auto_spacing``), else trains
    without alignment and says why (a resumed model follows its own setting)."""
    ranks = distributed.current()
    # the setting and the reference: decided (and built) once, by rank 0 when torchrun started several processes
    mode, aligner, t_ref = ranks.once(lambda: _alignment_reference(detector, align, reference, train_vols, emit,
                                                                   resumed))
    if mode == "none":
        return train_vols, val_vols, None
    detector.alignment = aligner
    every = train_vols + val_vols
    aligned, val_kept, sims, secs, excluded = [], [], [], [], []
    emit({"phase": "align", "step": 0, "total_steps": len(every), "unit": "vol"})

    def align_one(i: int, v: Volume) -> tuple:
        """-> (name, (array, affine, similarity, seconds) on the reference grid or None, AlignmentError or None)"""
        name = str(v.path or f"volume {i}")
        try:
            al = aligner.align(v.array, v.affine, name=name, check_floor=False)
        except AlignmentError as e:
            return name, None, e
        finally:
            emit({"phase": "align", "step": i + 1, "total_steps": len(every), "unit": "vol"})
        return name, (al.array, al.affine, al.similarity, al.seconds), None

    # each rank registers its share of the normals (one process: all, in order)
    for i, (name, al, error) in enumerate(ranks.map(align_one, every)):
        if error is not None:
            # one odd scan (cropped, another contrast) is left out and reported, not used misaligned; many mean
            # the setting or the data is wrong
            excluded.append(name)
            log.warning("left out of training: %s", error)
            if len(excluded) > MAX_EXCLUDED_SHARE * len(every):
                raise TrainingDataError(f"cannot train with alignment: {len(excluded)} of {len(every)} normals "
                                        f"fail to align (the last: {error})") from error
            continue
        array, affine, similarity, seconds = al
        sims.append(similarity)
        secs.append(seconds)
        if i < len(train_vols):
            aligned.append(Volume(array, affine, every[i].path))
        else:
            val_kept.append(every[i])
    if not aligned or not val_kept:
        raise TrainingDataError("cannot train with alignment: none of the " + ("training" if not aligned else
                                "held-out") + " normals could be aligned")
    aligner.metric_floor = calibrate_floor(sims)
    info = {"method": mode, "reference": aligner.reference.name, "reference_shape": list(aligner.reference.shape),
            "metric_floor": round(aligner.metric_floor, 4),
            "similarity": {"min": round(min(sims), 4), "median": round(float(np.median(sims)), 4),
                           "max": round(max(sims), 4)},
            "seconds_per_volume": round(float(np.mean(secs)), 3), "reference_seconds": round(t_ref, 2),
            "excluded": excluded}
    log.info("aligned %d normals to the %s reference (similarity %.3f-%.3f, floor %.3f)", len(every),
             aligner.reference.name, min(sims), max(sims), aligner.metric_floor)
    return aligned, val_kept, info


def check_teacher_pretrain(method: Optional[str], objective: Optional[str], steps: Optional[int] = None,
                           resume: Optional[Union[str, Path]] = None) -> None:
    """ValueError with a clear message unless ``objective`` (None / "none" = no pretraining) is one of the method's
    ``PRETRAIN_OBJECTIVES``, ``steps`` (None = the method's default) is >= 1 and the model is a new one."""
    if objective in (None, "none"):
        if steps is not None:
            raise ValueError("pretrain_steps is set but teacher_pretrain is none; choose an objective")
        return
    if resume:
        raise ValueError("teacher pretraining is for new models: a resumed model keeps its teacher (drop resume, "
                         "or teacher_pretrain=none)")
    cls = get_method(method or DEFAULT_METHOD)
    allowed = tuple(cls.PRETRAIN_OBJECTIVES)
    if not allowed:
        raise ValueError(f"method {cls.method} has no teacher to pretrain; use teacher_pretrain=none")
    if objective not in allowed:
        raise ValueError(f"teacher_pretrain={objective!r}: choose none or one of {', '.join(allowed)}")
    if steps is not None and int(steps) < 1:
        raise ValueError(f"pretrain_steps={steps}: must be >= 1")


@dataclass
class TrainingBudget:
    """The time-limit, stop-request and progress bookkeeping the steps of one training run share.

    ``deadline``: a ``time.time()`` value or None; ``should_stop``: polled, its first True is remembered (``stop``);
    ``stop_time_limit``: seconds from that first True to the calibrated model (``stop_deadline``); ``progress``:
    receives the phase dicts (``emit``). ``seconds_per_volume`` (one detection), ``seconds_per_aligned_volume`` (one
    detection of a volume already on the model's reference grid: no registration; None = the same),
    ``seconds_per_save`` (the slowest checkpoint save so far), ``n_after`` (full detections after the optimisation:
    the held-out volumes) and ``n_after_aligned`` (the training volumes of the position statistics, already aligned)
    size the time ``reserve``d for what follows the optimisation.

    ``paused``: polled before every optimisation step (and between the batches of the preparation passes and the
    calibration volumes); while it says True the training waits (``wait_while_paused``: sleeps ``pause_poll_s`` at a
    time, still ending on a stop request or at the deadline), emitting one ``{"phase": "paused", "reason":
    pause_reason, "during": PHASE}`` event per pause. E.g. ``lambda: spmamba.cpu.foreground_busy(folder)``: a
    training that gives the cores to a clinician's detection. ``paused_seconds`` / ``pauses``: what it waited."""
    deadline: Optional[float] = None
    should_stop: Optional[Callable[[], bool]] = None
    stop_time_limit: Optional[float] = None
    progress: Optional[Callable[[dict], None]] = None
    seconds_per_volume: float = 0.0
    seconds_per_save: float = 0.0
    n_after: int = 0
    seconds_per_aligned_volume: Optional[float] = None
    n_after_aligned: int = 0
    stop_seen_at: Optional[float] = None  # when should_stop first said True
    paused: Optional[Callable[[], bool]] = None
    pause_reason: str = "a detection is running"
    pause_poll_s: float = 0.15
    paused_seconds: float = 0.0
    pauses: int = 0
    started: float = field(default_factory=time.time)  # when the run began (the time limit counts from here)

    def emit(self, event: dict) -> None:
        if self.progress is not None:
            self.progress(event)

    def stop(self) -> bool:
        """Whether a stop was requested (polls ``should_stop`` until it first says True)."""
        if self.stop_seen_at is None and self.should_stop is not None and self.should_stop():
            self.stop_seen_at = time.time()
        return self.stop_seen_at is not None

    def note_stop(self) -> None:
        """A stop decided elsewhere (another rank saw the request): from now on ``stop`` says True."""
        if self.stop_seen_at is None:
            self.stop_seen_at = time.time()

    def stop_deadline(self) -> Optional[float]:
        """The time-limit deadline, or earlier when a stop asked for the result within stop_time_limit."""
        if self.stop_time_limit is None or not self.stop():
            return self.deadline
        by_stop = self.stop_seen_at + float(self.stop_time_limit)
        return by_stop if self.deadline is None else min(self.deadline, by_stop)

    def wait_while_paused(self, during: str, until: Union[None, float, Callable[[], Optional[float]]] = None,
                          resumed: Optional[dict] = None) -> float:
        """Wait while ``paused()`` says True; returns the seconds waited (0.0 when not paused). The wait also ends
        on a stop request (``stop``) and when ``time.time()`` reaches ``until`` (a ``time.time()`` value or a
        callable giving one, re-asked while waiting; None: the deadline). Emits ``{"phase": "paused", ...}`` once
        when the pause begins and ``resumed`` (e.g. the interrupted phase's last event) when it ends."""
        if self.paused is None or self.stop() or not self.paused():
            return 0.0
        t0 = time.time()
        self.pauses += 1
        log.info("training paused (%s) during %s", self.pause_reason, during)
        self.emit({"phase": "paused", "reason": self.pause_reason, "during": during, "pauses": self.pauses,
                   "paused_s": round(self.paused_seconds, 1)})
        while True:
            limit = until() if callable(until) else (self.deadline if until is None else until)
            if limit is not None and time.time() >= limit:
                log.info("pause ended by the time limit")
                break
            time.sleep(self.pause_poll_s if limit is None else max(0.0, min(self.pause_poll_s, limit - time.time())))
            if self.stop() or not self.paused():
                break
        waited = time.time() - t0
        self.paused_seconds += waited
        log.info("training resumed after a %.1f s pause", waited)
        if resumed is not None:
            self.emit(resumed)
        return waited

    def pausing(self, during: str, check: Optional[Callable[[], bool]] = None,
                until: Union[None, float, Callable[[], Optional[float]]] = None) -> Optional[Callable[[], bool]]:
        """A ``should_stop`` for a pass that polls between batches: waits while paused, then answers ``check()``
        (False without one). ``check`` itself when there is no ``paused``."""
        if self.paused is None:
            return check

        def poll() -> bool:
            self.wait_while_paused(during, until)
            return bool(check()) if check is not None else False
        return poll

    def left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return self.deadline - time.time() if self.deadline is not None else math.inf

    def reserve(self) -> float:
        """Seconds kept for what follows training: all of it when it fits in half of the time limit, else half of
        the time limit (position statistics and calibration then use fewer volumes), but never less than one
        volume. A fixed amount: capped by half of what is *left* it shrank as training went on, and a 20-minute
        training fitted its position statistics on 2 of 16 normals and calibrated on 1 of 4 (measured)."""
        if self.deadline is None:
            return 0.0
        per = 1.15 * self.seconds_per_volume
        full = self.after_seconds() + 2 * self.seconds_per_save
        return max(min(full, 0.5 * max(0.0, self.deadline - self.started)), per + self.seconds_per_save)

    def after_seconds(self, n_aligned: Optional[int] = None) -> float:
        """Expected seconds of the detections after the optimisation (with a 15% margin): ``n_after`` full ones and
        ``n_aligned`` (default ``n_after_aligned``) of volumes already on the reference grid."""
        aligned = self.seconds_per_volume if self.seconds_per_aligned_volume is None else self.seconds_per_aligned_volume
        n_aligned = self.n_after_aligned if n_aligned is None else n_aligned
        return 1.15 * (self.seconds_per_volume * self.n_after + aligned * n_aligned)


@dataclass
class FitState:
    """What ``fit`` did: epochs, optimisation steps (this run's and the resumed run's), why it stopped, the loss
    history and the optimiser and scheduler (None for one-pass methods) whose state a checkpoint keeps."""
    total_epochs: int
    steps_per_epoch: int = 1
    steps_before: int = 0  # optimisation steps of the run this one resumes
    step_total: int = 0  # ... and of this run
    planned_steps: int = 0
    epochs_done: int = 0
    stopped: bool = False
    stop_reason: Optional[str] = None  # None (finished), "stopped" (should_stop), "max_steps", "time_limit"
    history: list = field(default_factory=list)
    lr_drop_step: Optional[int] = None  # the step at which the time limit dropped the learning rate, if it did
    optimizer: Any = None
    scheduler: Any = None
    processes: int = 1  # data-parallel processes (torchrun); a step's batch is batch_per_process x processes
    batch_per_process: int = 0
    stage_changes: list = field(default_factory=list)  # multi-stage methods: {"stage", "epoch", "step"} per change

    @property
    def steps(self) -> int:
        return self.steps_before + self.step_total

    def training_state(self, epoch_done: int) -> Optional[dict]:
        """What a checkpoint needs to resume the optimisation after ``epoch_done`` epochs (None: one-pass)."""
        if self.optimizer is None:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": epoch_done, "loss_history": self.history}
        if self.processes > 1:  # a resume on another number of processes rescales the learning rate
            state["processes"] = self.processes
        if self.stage_changes:
            state["stage_changes"] = self.stage_changes
        return state


def _scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the learning rate (now, initial and the scheduler's base) by ``factor`` (no-op for 1)."""
    if factor == 1:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _drop_pending(scheduler: Any) -> bool:
    """Whether the MultiStepLR still has its drop ahead (not yet reached, nor made earlier by the time limit)."""
    return bool(scheduler.milestones) and scheduler.last_epoch < max(scheduler.milestones)


def stage_end_epochs(shares: Sequence[float], total_epochs: int) -> list[int]:
    """The epoch at which each stage but the last of a multi-stage method ends: the cumulative share of
    ``total_epochs``, rounded, each stage getting at least one epoch. Raises ValueError when ``total_epochs`` is
    fewer than the stages."""
    k = len(shares)
    if total_epochs < k:
        raise ValueError(f"this method trains in {k} stages: epochs must be >= {k}, got {total_epochs}")
    ends, cum = [], 0.0
    for i, share in enumerate(shares[:-1]):
        cum += float(share)
        low = (ends[-1] + 1) if ends else 1
        ends.append(min(max(int(round(cum * total_epochs)), low), total_epochs - (k - 1 - i)))
    return ends


def _prepare_model(model: Any, data: Any, budget: TrainingBudget, *, seed: int, encoder_weights: str,
                   teacher_pretrain: Optional[str], pretrain_steps: Optional[int]) -> dict:
    """``fit``'s one-time preparation of a new model: the optional teacher pretraining, then the method's preparation
    hook. Returns the notes for ``detector.meta`` (``teacher``, and the preparation phase's name)."""
    emit = budget.emit
    notes: dict = {}
    n = len(data)
    record = model.teacher_record(encoder_weights)
    if teacher_pretrain not in (None, "none"):
        pre_deadline = None
        if budget.deadline is not None:
            pre_deadline = time.time() + PRETRAIN_SHARE * max(0.0, budget.left() - budget.reserve())
        record = model.pretrain(data, teacher_pretrain, steps=pretrain_steps, seed=seed, deadline=pre_deadline,
                                should_stop=budget.stop, progress=emit, encoder_weights=encoder_weights)
        log.info("teacher pretraining (%s): %s", teacher_pretrain, record)
    if record is not None:
        notes["teacher"] = record
    prep_phase = model.preparation_phase(encoder_weights)
    if prep_phase is not None:
        norm_order, norm_stop = None, None
        if budget.deadline is not None:  # at most a quarter of the training time; a random sample if cut short
            norm_deadline = time.time() + 0.25 * max(0.0, budget.left() - budget.reserve())
            norm_order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            norm_stop = lambda: time.time() > norm_deadline  # noqa: E731
        notes[prep_phase] = model.prepare(
            data if norm_order is None else data[norm_order],
            progress=lambda b, k: emit({"phase": prep_phase, "step": b, "total_steps": k, "unit": "batch"}),
            should_stop=budget.pausing(prep_phase, norm_stop,
                                       until=norm_deadline if budget.deadline is not None else None))
        log.info("%s: %s", prep_phase, notes[prep_phase])
    return notes


def fit(detector: Detector, data: Any, budget: Optional[TrainingBudget] = None, *, total_epochs: int,
        seed: int = 0, max_steps: Optional[int] = None, encoder_weights: str = "none", prepare: bool = True,
        resume_state: Optional[dict] = None,
        on_epoch: Optional[Callable[[FitState, int], None]] = None,
        teacher_pretrain: Optional[str] = None, pretrain_steps: Optional[int] = None) -> FitState:
    """Step 3: fit ``detector.model`` on ``data`` (``model.training_data(prepare_volumes(...))``).

    For a new model (``prepare``), ``detector.meta["teacher"]`` records where the teacher comes from
    (``model.teacher_record``; methods without one record nothing). ``teacher_pretrain`` (one of the method's
    ``PRETRAIN_OBJECTIVES``; None or "none": no pretraining) first pretrains the teacher on ``data`` for
    ``pretrain_steps`` steps (None: the method's default), given at most ``PRETRAIN_SHARE`` of the time left
    under a deadline, and ended by a stop request (which then also ends the optimisation before its first step;
    the model is still calibrated). Then the method's preparation hook (when ``prepare``; SP-Mamba: encoder norm
    adaptation, given at most a quarter of the training time under a deadline, on a random sample if cut short),
    then either the shared
    optimisation loop (methods with ``training_settings``: AdamW, lr x0.1 at 80% of ``total_epochs``, gradient
    clipping; only ``trainable_parameters`` learn) or the method's one-pass ``fit``. ``budget`` (a
    ``TrainingBudget``) gives the stop requests, the deadline (a step is not started when it would eat into the
    time ``reserve``d for what follows; at least one step is always done) and progress ("train", "epoch", "fit" and
    the preparation phase). ``resume_state``: the ``training_state`` of a checkpoint to continue from;
    ``on_epoch(state, epochs_done)`` is called after every full epoch (e.g. to save a checkpoint). Leaves the
    model in eval mode and returns the ``FitState``."""
    budget = budget or TrainingBudget()
    emit = budget.emit
    model = detector.model
    ts = model.training_settings  # None: fitted in one pass
    n = len(data)
    dev = detector.device
    ranks = distributed.current()  # one process unless torchrun started several (spmamba.distributed)
    if prepare:  # one-time preparation; with several processes rank 0 does it and shares the model and the notes
        detector.meta.update(ranks.once(lambda: _prepare_model(model, data, budget, seed=seed,
                                                               encoder_weights=encoder_weights,
                                                               teacher_pretrain=teacher_pretrain,
                                                               pretrain_steps=pretrain_steps), module=model))
    if ts is not None:
        # Several processes (torchrun): each takes ``batch`` samples of every step, the step's batch is
        # batch x world, and the learning rate follows the linear scaling rule of the presets (lr = base_lr x batch
        # / 16, TrainingSettings.lr) for that batch: x world.
        batch = min(ts.batch_size, n // ranks.world)
        if batch < 1:
            raise TrainingDataError(f"{n} training samples cannot be shared by {ranks.world} processes; train with "
                                    "fewer processes or on more data")
        global_batch = batch * ranks.world
        steps_per_epoch = max(1, n // global_batch)  # drop the ragged last batch (BatchNorm in the bottleneck)
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=ts.lr * ranks.world, betas=(0.9, 0.999),
                                      weight_decay=ts.weight_decay)
        milestone = max(1, int(math.floor(0.8 * total_epochs)))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=0.1)
    else:  # fitted in one pass: one "epoch" of one step
        batch, global_batch, steps_per_epoch, params, optimizer, scheduler = n, n, 1, [], None, None
    state = FitState(total_epochs=total_epochs, steps_per_epoch=steps_per_epoch, optimizer=optimizer,
                     scheduler=scheduler, processes=ranks.world, batch_per_process=batch)
    start_epoch = 0
    if resume_state is not None and optimizer is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        # a checkpoint of a run on another number of processes: its learning rate was scaled for that many
        _scale_lr(optimizer, scheduler, ranks.world / int(resume_state.get("processes", 1)))
        start_epoch = int(resume_state["epoch"])
        state.history = list(resume_state.get("loss_history", []))
        state.stage_changes = list(resume_state.get("stage_changes", []))
    history = state.history
    state.steps_before = start_epoch * steps_per_epoch
    state.planned_steps = state.steps_before + steps_per_epoch * max(0, total_epochs - start_epoch)
    if max_steps is not None:
        state.planned_steps = min(state.planned_steps, state.steps_before + max_steps)

    def make_samples() -> Any:
        """e.g. SP-Mamba's teacher features, computed once; made again when a multi-stage method changes stage
        (outside the steps' timing, so a stage's one-time work does not count as a slow step)."""
        made = model.training_samples(
            data, (state.planned_steps - state.steps) * global_batch,
            progress=lambda b, k: emit({"phase": model.SAMPLES_PHASE, "step": b, "total_steps": k,
                                        "unit": model.SAMPLES_UNIT}),
            should_stop=budget.pausing(model.SAMPLES_PHASE, budget.stop))
        if made is not data:
            log.info("training samples prepared (%s)", type(made).__name__)
        return made

    samples = make_samples() if ts is not None else data
    stopped = False
    step_seconds = 0.0  # running estimate of one optimisation step
    epoch = start_epoch
    # Multi-stage methods (TRAINING_STAGES): each stage but the last ends at its epoch (stage_end_epochs) or, under
    # a time limit, once its cumulative share of the optimisation's time (now to the deadline less the reserve) has
    # passed, whichever is first; the model keeps its stage, so a resumed run goes on from there.
    stages = tuple(model.TRAINING_STAGES) if ts is not None else ()
    stage_ends = stage_end_epochs(model.stage_shares(), total_epochs) if len(stages) > 1 else []
    stage_times: list = []
    if stage_ends and budget.deadline is not None:
        opt_time = max(0.0, budget.left() - budget.reserve())
        shares = model.stage_shares()
        done_share = sum(shares[:model.training_stage])  # a resumed run: the stages before are done
        now = time.time()
        stage_times = [now + opt_time * max(0.0, (sum(shares[:i + 1]) - done_share) / max(1e-9, 1.0 - done_share))
                       for i in range(len(stages) - 1)]
    # Under a time limit the training usually ends long before ``total_epochs``, so the epoch milestone of the
    # published schedule (lr x0.1 at 80% of the training) would never come: the drop then also comes at 80% of the
    # time the optimisation has (from now to the deadline less what is reserved for calibration), whichever is
    # first, and happens once (the epoch milestone is then removed; a checkpoint keeps both).
    lr_drop_at = None
    if scheduler is not None and budget.deadline is not None and _drop_pending(scheduler):
        lr_drop_at = time.time() + LR_DROP_SHARE * max(0.0, budget.left() - budget.reserve())
    g = torch.Generator().manual_seed(seed + start_epoch)  # the same order of the samples on every rank
    # several processes: DistributedDataParallel, BatchNorm over the whole batch (one process: the loss itself)
    loss_of = ranks.parallel(model) if ts is not None else None
    if ranks.world > 1:  # stochastic layers (drop path): an independent draw on each rank
        torch.manual_seed(seed + ranks.rank)
    emit({"phase": "train", "epoch": start_epoch + 1, "total_epochs": total_epochs, "step": 0,
          "total_steps": steps_per_epoch, "global_step": state.steps_before,
          "total_global_steps": state.planned_steps})
    if ts is None:  # one-pass fitting
        t_step = time.perf_counter()
        model.fit(data, lambda i, k: emit({"phase": "fit", "step": i, "total_steps": k, "unit": "vol"}))
        state.step_total = 1
        step_seconds = time.perf_counter() - t_step
        emit({"phase": "train", "epoch": 1, "total_epochs": 1, "step": 1, "total_steps": 1,
              "global_step": 1, "total_global_steps": state.planned_steps})
    for epoch in range(start_epoch, total_epochs if ts is not None else 0):
        while model.training_stage < len(stage_ends):
            k = model.training_stage
            (due,) = ranks.agree(epoch >= stage_ends[k] or (bool(stage_times) and time.time() >= stage_times[k]))
            if not due:
                break
            model.begin_stage(k + 1)
            state.stage_changes.append({"stage": stages[k + 1], "epoch": epoch, "step": state.steps})
            log.info("training stage %s from epoch %d (step %d)", stages[k + 1], epoch + 1, state.steps)
            emit({"phase": "stage", "stage": stages[k + 1], "index": k + 1, "stages": list(stages),
                  "epoch": epoch + 1, "total_epochs": total_epochs, "global_step": state.steps})
            samples = make_samples()
        model.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for step in range(steps_per_epoch):
            budget.wait_while_paused(  # a pause ends when the deadline would stop the training anyway
                "train", until=lambda: None if budget.deadline is None else budget.deadline - budget.reserve(),
                resumed={"phase": "train", "epoch": epoch + 1, "total_epochs": total_epochs, "step": step,
                         "total_steps": steps_per_epoch, "global_step": state.steps,
                         "total_global_steps": state.planned_steps})
            # every rank takes the same decision (one process: these flags as they are)
            stop_asked, out_of_time, drop_due = ranks.agree(
                budget.stop(), state.step_total > 0 and step_seconds > budget.left() - budget.reserve(),
                lr_drop_at is not None and time.time() >= lr_drop_at)
            if stop_asked:
                budget.note_stop()  # also on the ranks that did not see the request themselves
                state.stop_reason = "stopped"
            elif max_steps is not None and state.step_total >= max_steps:
                state.stop_reason = "max_steps"
            elif out_of_time:
                state.stop_reason = "time_limit"
            if state.stop_reason is not None:
                stopped = True
                break
            if drop_due:
                lr_drop_at = None
                if _drop_pending(scheduler):
                    for group in optimizer.param_groups:
                        group["lr"] *= scheduler.gamma
                    scheduler.milestones.clear()
                    state.lr_drop_step = state.steps
                    log.info("lr x%g at 80%% of the time limit (step %d)", scheduler.gamma, state.steps)
            t_step = time.perf_counter()
            # this rank's share of the step's batch (one process: all of it)
            idx = perm[step * global_batch:(step + 1) * global_batch][ranks.rank * batch:(ranks.rank + 1) * batch]
            loss = loss_of(samples[idx].to(dev, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # with several processes the gradients are then the mean over the ranks
            torch.nn.utils.clip_grad_norm_(params, ts.grad_clip)
            optimizer.step()
            loss_value = ranks.mean(loss.item())  # the loss of the whole batch
            running += loss_value
            state.step_total += 1
            dt = time.perf_counter() - t_step
            step_seconds = dt if state.step_total == 1 else max(0.7 * step_seconds + 0.3 * dt, dt)
            emit({"phase": "train", "epoch": epoch + 1, "total_epochs": total_epochs, "step": step + 1,
                  "total_steps": steps_per_epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                  "global_step": state.steps, "total_global_steps": state.planned_steps})
        if stopped and step == 0:
            break  # nothing learnt in this epoch
        history.append(running / max(1, step + (0 if stopped else 1)))
        scheduler.step()
        emit({"phase": "epoch", "epoch": epoch + 1, "total_epochs": total_epochs, "loss": history[-1]})
        if stopped:
            epoch += 1
            break
        if on_epoch is not None:
            on_epoch(state, epoch + 1)
    else:
        epoch = total_epochs
    state.stopped = stopped
    state.epochs_done = epoch if stopped else total_epochs
    if loss_of is not None:
        loss_of.close()
    model.eval()
    ranks.check_same(lambda: weights_digest(model.state_dict()), "the trained weights")  # one model everywhere
    return state


def train_detector(
    volumes: Sequence[Union[str, Path, Volume]],
    *,
    method: Optional[str] = None,
    config: Any = None,
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
    position_normalise: Optional[bool] = None,
    time_limit: Optional[float] = None,
    stop_time_limit: Optional[float] = None,
    paused: Optional[Callable[[], bool]] = None,
    origin: Optional[str] = None,
    align: Optional[str] = None,
    align_reference: Union[str, Path] = "auto",
    teacher_pretrain: Optional[str] = None,
    pretrain_steps: Optional[int] = None,
    fusion: Optional[str] = None,
    intensity_search_mm: Optional[float] = None,
) -> Detector:
    """Train a model of ``method`` on normal volumes and calibrate it; see the module docstring.

    Args:
        volumes: paths or Volumes of normal scans (any shapes; slices are resized to the preset's size).
        method: a method of the registry (``spmamba.methods.method_names()``); default spmamba, or the resumed
            model's.
        config: preset name of that method (default: its ``default_preset``, "fast" for SP-Mamba), its config or a
            dict.
        epochs: number of epochs (default: the preset's; methods fitted in one pass ignore it).
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
            Costs one detection per training volume; calibration then runs on the normalised maps. Default
            (None): on when the volumes are aligned (``align="affine"``), off otherwise.
        time_limit: wall-clock seconds for the whole call, from reading the volumes to the saved, calibrated model
            (encoder norm adaptation, optimisation, position statistics, calibration). The time one detection takes
            is measured on a held-out volume first; training then stops early enough to leave time for
            calibrating the held-out volumes, and calibration uses fewer of them if time runs short. At least one
            optimisation step and one calibration volume are always done, so a limit shorter than those is
            exceeded by them.
        stop_time_limit: seconds allowed, from the moment ``should_stop`` first returns True (during training or
            while calibrating), to finish: position statistics and calibration then use fewer held-out volumes
            (at least one) so that the calibrated model is ready in time. None: all of them, however long.
        paused: polled before every optimisation step (and between the batches of the preparation passes and
            the calibration volumes); while it says True the training waits, still ending on a stop request or at
            the time limit, with one ``{"phase": "paused", "reason": ..., "during": PHASE}`` progress event per
            pause (``TrainingBudget.wait_while_paused``). E.g. ``lambda: spmamba.cpu.foreground_busy(folder)``
            gives the cores to detections that hold ``spmamba.cpu.foreground(folder)``. The time paused is in
            ``meta["training"]["paused_s"]`` (and ``pauses``).
        origin: what trained it (e.g. "spmamba train"), recorded in ``meta["training"]["origin"]``.
        align: "none", "affine" or "auto" (``registration``): "affine" registers every volume affinely to
            ``align_reference`` and trains and detects on the reference grid; stored in the model, so detection
            follows it. "auto" (what ``spmamba train`` and the app do, ``registration.DEFAULT_ALIGN``): "affine" to
            the MNI152 template (at the normals' voxel size, 2-8 mm) when the normals are brains that register to
            it, else "none" (logged). Default (None): "none" for a new model; a resumed model keeps its setting
            (with None or "auto"). Normals that fail to align are left out (at most a fifth, else
            TrainingDataError naming one); the similarity floor is calibrated on them.
        align_reference: with "affine": "auto" (MNI152 when the normals are brains that register to it, else "normals"),
            "normals" (built from the training normals: the median-sized one, then the mean of
            all aligned to it; normals that fail to align are left out), "mni152" (nilearn's skull-stripped MNI152 T1 template at 2 mm; "mni152:SPACING"
            for another spacing) or a volume file. Ignored when resuming (the model's reference is kept).
        teacher_pretrain: "none" (default) or one of the method's ``PRETRAIN_OBJECTIVES`` (SP-Mamba: "inpaint",
            "denoise"; ``models.pretrain``): self-supervised pretraining of the teacher on the training slices
            before distillation, for ``pretrain_steps`` steps (None: the method's default), within at most
            ``PRETRAIN_SHARE`` of the time left under ``time_limit``; ended cleanly by a stop request. Not with
            ``resume`` (the resumed model's teacher is kept). ``meta["teacher"]`` records the teacher either way.
        fusion: with position-aware normalisation, how the normalised heatmap is fused with the |z| map of the
            voxel intensities against the training normals (``scoring.fuse_maps``: "geometric", "mean", "max"),
            or "none". Default (None): ``detector.DEFAULT_FUSION`` for methods that fuse (``fuse_intensity``) when
            position-aware normalisation is on, else none. Fitted in the same pass as the position statistics.
        intensity_search_mm: with a fusion, the |z| map's search distance in mm (``Detector.intensity_search_mm``,
            ``baselines.search_zscore``); None: ``Detector.INTENSITY_SEARCH_MM``; 0: the plain |z|.
    Returns:
        A calibrated Detector (not yet saved unless checkpoint_path was given; then that file is final too).
    """
    check_teacher_pretrain(method, teacher_pretrain, pretrain_steps, resume)
    # one process, or one of those torchrun started (then in their process group, on this process's own GPU)
    ranks, dev = distributed.setup(resolve_device(device))
    t_start = ranks.broadcast(time.time())  # the time limit counts from rank 0's start on every rank
    budget = TrainingBudget(deadline=t_start + float(time_limit) if time_limit is not None else None,
                            should_stop=should_stop, stop_time_limit=stop_time_limit,
                            progress=progress if ranks.main else None,  # rank 0 alone reports progress
                            paused=paused, started=t_start)
    emit = budget.emit
    emit({"phase": "load", "step": 0, "total_steps": len(volumes), "unit": "vol"})
    vols = _load_all(volumes, lambda i, k: emit({"phase": "load", "step": i, "total_steps": k, "unit": "vol"}))
    if len(vols) < MIN_VOLUMES:
        raise TrainingDataError(
            f"{len(vols)} normal volume(s) given; at least {MIN_VOLUMES} are needed (some to learn from, one held out "
            "to calibrate the thresholds). Mark more studies normal or add volumes."
        )
    torch.manual_seed(seed)
    train_idx, val_idx = split_normals(len(vols), val_fraction, seed)
    val_vols = [vols[i] for i in val_idx]
    train_vols = [vols[i] for i in train_idx]

    detector, resume_obj = build_or_resume(method, config, encoder_weights=encoder_weights,
                                           preprocessing=preprocessing, device=dev, resume=resume)
    prep = detector.preprocessing
    train_vols, val_vols, align_info = _prepare_alignment(detector, align, align_reference, train_vols, val_vols,
                                                          emit, resumed=resume_obj is not None)
    if position_normalise is None:  # aligned volumes share one grid: position-aware normalisation by default
        position_normalise = detector.alignment is not None
    if position_normalise and detector.alignment is None:
        _check_one_grid(vols)
    fusion = resolve_fusion(fusion, detector.model, bool(position_normalise))
    if intensity_search_mm is not None:
        search_distance(intensity_search_mm)  # refused before any training, not after it
    if intensity_search_mm is not None and fusion is None:
        raise ValueError("an intensity search distance applies to the fused intensity map, and this training fits "
                         "none (fusion none, no position-aware normalisation, or a method whose map is the intensity "
                         "map already: the voxel-wise method has its own setting, search)")
    model = detector.model
    ts = model.training_settings  # None: fitted in one pass
    total_epochs = int(epochs if epochs is not None else ts.epochs) if ts is not None else 1
    if total_epochs < 1:
        raise ValueError("epochs must be >= 1")
    if ts is not None and len(model.TRAINING_STAGES) > 1:
        stage_end_epochs(model.stage_shares(), total_epochs)  # enough epochs for every stage, before any work

    emit({"phase": "prepare", "step": 0, "total_steps": len(train_vols), "unit": "vol"})
    data = model.training_data(standardise_volumes(prepare_volumes(
        train_vols, prep, lambda i, k: emit({"phase": "prepare", "step": i, "total_steps": k, "unit": "vol"})), prep))
    n = len(data)
    ranks.check_same(prep.intensity_landmarks, "the intensity landmarks")  # each rank fitted them itself

    # Time budget (time_limit): what follows training (position statistics, calibration, the final save) needs
    # about one detection per volume; measure one now (the time does not depend on the weights). The position
    # statistics detect training volumes already on the reference grid: no registration, no mapping back.
    budget.n_after = len(val_vols)
    budget.n_after_aligned = len(train_vols) if position_normalise else 0
    if budget.deadline is not None:
        def measure() -> tuple[float, float]:  # -> seconds of one detection, and of one already aligned
            emit({"phase": "measure", "step": 0, "total_steps": 1, "unit": "vol"})
            t0 = time.perf_counter()
            measured = detector.detect(val_vols[0].array, val_vols[0].affine)
            seconds = time.perf_counter() - t0
            t = measured.timings
            emit({"phase": "measure", "step": 1, "total_steps": 1, "unit": "vol"})
            return seconds, (seconds if "align_s" not in t else t["prepare_s"] + t["model_s"])
        budget.seconds_per_volume, budget.seconds_per_aligned_volume = ranks.once(measure)

    n_calibration_used = len(val_vols)

    def summary(st: FitState, epochs_done: int, stopped: bool) -> dict:
        return {
            "n_train_volumes": len(train_vols), "n_calibration_volumes": n_calibration_used,
            "n_held_out_volumes": len(val_vols), "n_slices": int(n),
            "train_ids": [Path(v.path).name if v.path else f"volume{i}" for i, v in enumerate(train_vols)],
            "shapes": sorted({tuple(int(s) for s in v.array.shape) for v in vols}),
            "epochs": epochs_done, "total_epochs": st.total_epochs, "stopped_early": stopped,
            "steps": st.steps, "total_steps": st.planned_steps, "steps_per_epoch": st.steps_per_epoch,
            "final_loss": st.history[-1] if st.history else None, "loss_history": st.history[-50:],
            "encoder_weights": encoder_weights if resume_obj is None else detector.meta.get("training", {}).get("encoder_weights"),
            "train_seconds": time.time() - t_start, "device": str(dev),
            "position_normalise": detector.position_stats is not None,
            "encoder_norm": detector.meta.get("encoder_norm", "as in the weights"),
            "stop_reason": st.stop_reason, "time_limit_s": time_limit, "origin": origin,
            "alignment": align_info, "teacher": detector.meta.get("teacher"),
            "paused_s": round(budget.paused_seconds, 1), "pauses": budget.pauses,
            "lr_drop_step": st.lr_drop_step, "intensity_landmarks": prep.intensity_landmarks,
            "fusion": detector.fusion if detector.intensity_stats is not None else "none",
            "intensity_search_mm": detector.intensity_search_mm if detector.intensity_stats is not None else None,
            "processes": st.processes,
            **({"stage": type(detector.model).TRAINING_STAGES[detector.model.training_stage],
                "stage_changes": st.stage_changes} if type(detector.model).TRAINING_STAGES else {}),
            **({"batch_per_process": st.batch_per_process, "step_batch": st.batch_per_process * st.processes,
                "lr": st.optimizer.param_groups[0].get("initial_lr")} if st.optimizer is not None else {}),
        }

    def save(st: FitState, epoch_done: int) -> None:
        if checkpoint_path is None or not ranks.main:  # rank 0 alone writes the checkpoints
            return
        t0 = time.perf_counter()
        detector.meta["training"] = summary(st, epoch_done, False)
        detector.invalidate_version()
        publish(detector, checkpoint_path, st.training_state(epoch_done))
        budget.seconds_per_save = max(budget.seconds_per_save, time.perf_counter() - t0)

    state = fit(detector, data, budget, total_epochs=total_epochs, seed=seed, max_steps=max_steps,
                encoder_weights=encoder_weights, prepare=resume_obj is None,
                resume_state=resume_obj.get("training_state") if resume_obj is not None else None,
                on_epoch=save, teacher_pretrain=teacher_pretrain, pretrain_steps=pretrain_steps)
    epochs_done = state.epochs_done
    budget.deadline = budget.stop_deadline()  # a stop request bounds what follows (position statistics, calibration)
    if position_normalise:
        fit_vols = train_vols
        if budget.deadline is not None:  # a share of the time left, the rest stays for calibration
            available = budget.left() - budget.seconds_per_save
            needed = budget.after_seconds()
            if available < needed:
                keep = max(min(2, len(train_vols)), int(len(train_vols) * max(0.0, available) / max(1e-6, needed)))
                fit_vols = train_vols[:keep]
        fit_vols = train_vols[:ranks.broadcast(len(fit_vols))]  # rank 0's clock decides for every rank
        emit({"phase": "position_stats", "step": 0, "total_steps": len(fit_vols), "unit": "vol"})
        detector.fit_position_stats(fit_vols, lambda i, n: emit({"phase": "position_stats", "step": i,
                                                                 "total_steps": n, "unit": "vol"}),
                                    aligned=detector.alignment is not None, fusion=fusion,
                                    map_volumes=ranks.map,  # several processes: each detects its share
                                    intensity_search_mm=intensity_search_mm)

    def calibration_deadline() -> Optional[float]:
        limit = budget.stop_deadline()
        return None if limit is None else limit - budget.seconds_per_save
    detector.calibration = calibrate(
        detector, val_vols, pixel_fpr, volume_fpr, emit, deadline=calibration_deadline,
        seconds_per_volume=budget.seconds_per_volume or None,
        wait=lambda: budget.wait_while_paused("calibrate", until=lambda: (
            None if calibration_deadline() is None
            else calibration_deadline() - 1.15 * budget.seconds_per_volume)))
    n_calibration_used = detector.calibration.n_volumes
    detector.meta["training"] = summary(state, epochs_done, state.stopped)
    detector.meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    detector.invalidate_version()
    emit({"phase": "done", "epoch": epochs_done, "total_epochs": total_epochs,
          "global_step": state.steps, "total_global_steps": state.planned_steps,
          "loss": state.history[-1] if state.history else None,
          "val_score": float(np.mean(detector.calibration.normal_volume_scores))})
    ranks.check_same(asdict(detector.calibration), "the calibration")
    if checkpoint_path is not None and ranks.main:
        publish(detector, checkpoint_path, state.training_state(epochs_done))
    ranks.barrier()  # no rank leaves (and may end its process) while rank 0 still writes
    return detector
