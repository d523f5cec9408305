"""Training task: fit SP-Mamba on the studies curated as normal, publish the model atomically.

MONAI Label's ``BasicTrainTask`` assumes labelled segmentation (``final`` labels, Dice), so this task subclasses
``TrainTask`` directly and calls ``spmamba.train.train_detector``. It still runs in MONAI Label's own machinery:
``POST /train/spmamba`` starts ``python -m monailabel.interfaces.utils.app -m train`` in a subprocess (status at
``GET /train/``, stop with ``DELETE /train/``), and this object's ``__call__`` runs in that subprocess.

Progress goes to ``<model_dir>/train_stats.json`` (atomic writes), which ``stats()`` serves in ``/info/``'s
``train_stats``: status, epoch, total_epochs, step/total_steps (optimisation steps over the whole training), loss,
val_score, phase, pid, model_version. The new model is written to a temporary file in the model folder and renamed
over ``spmamba.pt`` (``versions.VersionHistory.publish``, which first keeps the replaced model in
``<model_dir>/versions`` for rollback), so a killed training leaves the previous model intact and the inference task
picks the new one up by its modification time, without a restart.

Several processes (``--conf train_processes N``): the task runs the same training data-parallel in N local processes
(``spmamba.launch.train_in_processes``: torchrun under the hood, the usable cores shared among them), with the same
progress, stop and pause (relayed through files) and the same publishing.

Sharing the CPU with the server: the task uses torch threads = the usable cores and pauses between optimisation steps while a detection holds its marker in
``<model_dir>/.foreground`` (``Detection.run``; ``spmamba.cpu.foreground_busy``), so a clinician's detection gets
the cores; ``train_stats`` then shows ``phase: "paused"`` with the ``reason``.

A training whose preset is weaker (tiny < fast < paper) than the served model's is refused with 409 unless the
request says ``"force": true``; then ``train_stats`` and the ``POST /train`` answer carry a ``warning``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

from fastapi import HTTPException
from monailabel.interfaces.tasks.train import TrainTask
from spmamba.atomic import write_json
from spmamba.methods import min_epochs

from ..configs import AppSettings
from ..configs.settings import library_presets
from ..errors import bad_request, conflict, method_title
from ..scoring.anomaly import in_task_subprocess
from ..versions import VersionHistory, read_model_info, served_path, weaker_preset_message

logger = logging.getLogger(__name__)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    try:  # a zombie (killed, not yet reaped) is not alive
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class AnomalyTrain(TrainTask):
    def __init__(self, settings: AppSettings):
        super().__init__(f"Train {method_title(settings.method)} on the studies curated as normal "
                         "(info.curation == 'normal')")
        self.settings = settings

    # ------------------------------------------------------------------ info
    def config(self) -> Dict[str, Any]:
        return {
            "preset": self.settings.preset,
            "max_epochs": self.settings.epochs or 0,  # 0 = the preset's default
            "device": self.settings.device,
            "unflagged_normal": self.settings.unflagged_normal,
            "min_normals": self.settings.min_normals,
            "train_processes": self.settings.train_processes,
        }

    def stats(self) -> Dict[str, Any]:
        try:
            with open(self.settings.stats_path) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not _pid_alive(stats.get("pid")):
            stats["status"] = "STOPPED"
            stats["detail"] = "the training process ended without finishing (stopped or killed)"
        return stats

    # ------------------------------------------------------------------ checks
    def _params(self, request: Dict[str, Any]) -> Dict[str, Any]:
        preset = str(request.get("preset") or self.settings.preset)
        presets = library_presets(self.settings.method)
        if preset not in presets:
            raise bad_request(f"unknown preset {preset!r} of method {self.settings.method}: choose one of "
                              f"{', '.join(presets)}")
        epochs = request.get("max_epochs", request.get("epochs")) or self.settings.epochs
        if epochs is not None:
            try:
                epochs = int(epochs)
            except (TypeError, ValueError):
                raise bad_request(f"max_epochs must be an integer, not {epochs!r}") from None
            if epochs < 1:
                epochs = None  # 0 = preset default
            elif epochs < min_epochs(self.settings.method):
                raise bad_request(f"max_epochs {epochs}: method {self.settings.method} trains in "
                                  f"{min_epochs(self.settings.method)} stages, one epoch at least each")
        force = request.get("force", False)
        if isinstance(force, str):
            force = force.strip().lower() in ("1", "true", "yes", "on")
        return {"preset": preset, "epochs": epochs, "force": bool(force)}

    def history(self) -> VersionHistory:
        s = self.settings
        return VersionHistory(s.model_dir, s.published_model, s.keep_versions, s.model)

    def preset_warning(self, request: Dict[str, Any]) -> Optional[str]:
        """A warning when this request's preset is weaker (tiny < fast < paper) than the served model's."""
        served = read_model_info(served_path(self.settings.published_model, self.settings.model))
        return weaker_preset_message(self._params(request)["preset"], served, self.settings.method)

    def training_images(self, datastore) -> List[str]:
        """The files of the studies to train on. Studies from a PACS are fetched (when not cached) only in the
        training subprocess: the server's precheck counts them; a series that cannot be fetched or read is left
        out with a warning."""
        ids = datastore.training_studies(self.settings.unflagged_normal)
        if getattr(datastore, "remote", False) and not in_task_subprocess():
            return list(ids)
        paths = []
        for image_id in ids:
            try:
                path = datastore.get_image_uri(image_id)
            except HTTPException as e:
                logger.warning(f"Training: study {image_id} left out: {e.detail}")
                continue
            if path and os.path.isfile(path):
                paths.append(path)
        return paths

    def precheck(self, request: Dict[str, Any], datastore) -> List[str]:
        """Raise a 4xx (in the server, before a subprocess is started) when training cannot start."""
        self._params(request)
        images = self.training_images(datastore)
        need = self.settings.min_normals
        if len(images) < need:
            how = "marked normal" + (" or unreviewed" if self.settings.unflagged_normal else "")
            raise conflict(
                f"too few normal studies to train: {len(images)} {how}, at least {need} needed. Mark studies with "
                f"PUT /datastore/image/info?image=ID and info={{\"curation\": \"normal\"}}"
            )
        warning = self.preset_warning(request)
        if warning and not self._params(request)["force"]:
            raise conflict(f"training refused: {warning} Send \"force\": true with the training parameters to "
                           "train and publish it anyway, or train a preset at least as strong.")
        return images

    # ------------------------------------------------------------------ run (in MONAI Label's train subprocess)
    def __call__(self, request, datastore):
        from spmamba.cpu import foreground_busy, set_threads, usable_cores
        from spmamba.launch import train_in_processes

        s = self.settings
        if in_task_subprocess():
            # torch threads = the usable cores; no lower priority: a clinician's detection is served first by the
            # pause below, and a niced training starved behind any busy program (a Stop under load then could not
            # calibrate within stop_max_s)
            set_threads(usable_cores())
        os.makedirs(s.model_dir, exist_ok=True)
        if os.path.exists(s.stop_path):
            os.unlink(s.stop_path)
        started = time.time()
        stats: Dict[str, Any] = {
            "status": "RUNNING",
            "pid": os.getpid(),
            "start_ts": int(started),
            "phase": "loading",
            "epoch": 0,
            "total_epochs": None,
            "loss": None,
            "val_score": None,
        }
        try:
            params = self._params(request)
            images = self.precheck(request, datastore)
        except Exception as e:
            detail = getattr(e, "detail", None) or str(e)
            write_json(s.stats_path, {**stats, "status": "ERROR", "detail": detail, "pid": None})
            raise RuntimeError(detail) from e
        stats.update({"preset": params["preset"], "n_studies": len(images), "total_epochs": params["epochs"],
                      "processes": s.train_processes})
        warning = self.preset_warning(request)
        if warning:
            stats["warning"] = warning
        write_json(s.stats_path, stats)
        last_write = [0.0]

        def progress(p: Dict[str, Any]) -> None:
            # step/total_steps: optimisation steps over the whole training (done / planned); epoch_step and
            # steps_per_epoch within the epoch; other phases (prepare, calibrate ...) count in phase_step/_total
            for k in ("phase", "epoch", "total_epochs"):
                if p.get(k) is not None:
                    stats[k] = p[k]
            if p.get("global_step") is not None:
                stats["step"], stats["total_steps"] = p["global_step"], p.get("total_global_steps")
            if p.get("phase") == "train":
                stats["epoch_step"], stats["steps_per_epoch"] = p.get("step"), p.get("total_steps")
            elif p.get("step") is not None:
                stats["phase_step"], stats["phase_total_steps"] = p["step"], p.get("total_steps")
            if p.get("stage") is not None:  # multi-stage methods (Spatial-MSMA): the stage being trained
                stats["stage"] = p["stage"]
            if p.get("phase") == "paused":  # a detection runs in the server: waiting between steps
                stats["pause_reason"], stats["pauses"] = p.get("reason"), p.get("pauses")
            else:
                stats.pop("pause_reason", None)
            for k in ("loss", "val_score"):
                if k in p:
                    stats[k] = _finite(p[k])
            if stats.get("val_score") is not None:
                stats["best_metric"] = stats["val_score"]
            stats["elapsed_s"] = round(time.time() - started, 1)
            now = time.time()
            if now - last_write[0] > 0.5 or p.get("phase") != "train":
                last_write[0] = now
                write_json(s.stats_path, stats)
            logger.info(f"progress: {json.dumps({k: stats.get(k) for k in ('phase', 'epoch', 'total_epochs', 'loss', 'val_score')})}")

        extra: Dict[str, Any] = {}
        if s.slice_axis is not None:
            from spmamba.methods import get_method
            from spmamba.preprocessing import Preprocessing

            extra["preprocessing"] = Preprocessing(**{**get_method(s.method).preprocessing_defaults,
                                                      "slice_axis": s.slice_axis})
        try:
            detector = train_in_processes(  # train_detector itself with one process
                images,
                processes=s.train_processes,
                method=s.method,
                config=params["preset"],
                epochs=params["epochs"],
                device=s.device,
                encoder_weights=s.encoder_weights,
                teacher_pretrain=s.teacher_pretrain,
                progress=progress,
                should_stop=lambda: os.path.exists(s.stop_path),
                stop_time_limit=s.stop_calibration_s,  # DELETE /train/ waits at most stop_max_s
                # between steps, wait while a detection runs in the server (it holds a marker there)
                paused=lambda: foreground_busy(s.foreground_dir),
                align=s.align,
                align_reference=s.align_reference,
                fusion=None if s.fusion == "auto" else s.fusion,
                intensity_search_mm=s.intensity_search_mm,
                **extra,
            )
            training = detector.meta.get("training") or {}
            if training.get("stop_reason") == "stopped" and not training.get("steps"):
                # stopped before the first optimisation step: nothing learnt, keep the served model
                stats.update({"status": "STOPPED", "phase": "stopped", "pid": None, "stopped_early": True,
                              "detail": "stopped before the first training step: the served model is unchanged",
                              "elapsed_s": round(time.time() - started, 1), "end_ts": int(time.time())})
                write_json(s.stats_path, stats)
                logger.info("Training stopped before its first step; nothing published")
                return stats
            stats["phase"] = "publishing"
            write_json(s.stats_path, stats)
            # atomic publish (rename over spmamba.pt); the replaced model is kept in <model_dir>/versions
            published = self.history().publish(detector, extra={"n_studies": len(images)})
        except Exception as e:
            stats.update({"status": "ERROR", "detail": f"{type(e).__name__}: {e}", "pid": None})
            stats["elapsed_s"] = round(time.time() - started, 1)
            write_json(s.stats_path, stats)
            raise
        finally:
            stopped = os.path.exists(s.stop_path)
            if stopped:  # the request is answered: never leave it for the next training
                try:
                    os.unlink(s.stop_path)
                except OSError:
                    pass
        cal = detector.calibration
        stats["calibration_volumes"] = getattr(cal, "n_volumes", None)
        stats["held_out_volumes"] = training.get("n_held_out_volumes")
        if training.get("steps") is not None:  # the training's own steps, whatever phase reported last
            stats["step"], stats["total_steps"] = training["steps"], training.get("total_steps")
        stats.update(
            {
                "status": "DONE",
                "stopped_early": stopped or bool(training.get("stopped_early")),
                "paused_s": training.get("paused_s"),  # waited for detections in the server
                "previous_version": published.get("previous_version"),
                "versions_kept": len(self.history().list()),
                "phase": "done",
                "pid": None,
                "model_version": detector.version,
                "model_path": s.published_model,
                "total_time": round(time.time() - started, 1),
                "elapsed_s": round(time.time() - started, 1),
                "end_ts": int(time.time()),
            }
        )
        write_json(s.stats_path, stats)
        logger.info(f"Published {method_title(s.method)} model {detector.version} to {s.published_model}")
        return stats
