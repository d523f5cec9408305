"""Training in several local processes from one call, for programs that are not started by ``torchrun`` themselves
(the MONAI Label app's training task, ``--conf train_processes N``).

``train_in_processes(volumes, processes=N, ...)`` runs ``spmamba.train.train_detector`` under ``torchrun
--standalone --nproc_per_node N`` (data-parallel: ``spmamba.distributed``) and returns the calibrated Detector, as
``train_detector`` would. The callables that cannot cross a process boundary are relayed through files in a
private run folder, polled every ``poll_s``:

* ``progress``: rank 0 appends each progress event as a JSON line to ``progress.jsonl``; this process reads them
  and calls ``progress`` with each, in order;
* ``should_stop``: when it first says True, this process creates ``stop``; every training process polls it (and
  treats this process's disappearance as a stop request too);
* ``paused``: while it says True, ``pause`` exists; the training processes wait between steps while it does.

The trained model comes back through ``model.pt`` (written atomically by rank 0, once calibrated; the ranks then
leave the process group together); an error of the training (``TrainingDataError``, ``ValueError``) is raised
here with its message (``error.json``). A model that was written is returned even when a process failed after
writing it (logged as a warning): what failed then was the processes' exit, not the training.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .atomic import json_default, write_json

__all__ = ["train_in_processes", "LaunchError"]

log = logging.getLogger(__name__)

_SPEC, _PROGRESS, _STOP, _PAUSE, _MODEL, _ERROR = "spec.pkl", "progress.jsonl", "stop", "pause", "model.pt", "error.json"


class LaunchError(RuntimeError):
    """The training processes ended without a model (crashed or killed); the message says how they ended."""


def _relay_progress(path: Path, offset: int, progress: Optional[Callable[[dict], None]]) -> int:
    """Call ``progress`` with the complete JSON lines of ``path`` after ``offset``; returns the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return offset
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for line in chunk[:end].splitlines():
        if line.strip() and progress is not None:
            progress(json.loads(line))
    return offset + end


def _error_from(run: Path, returncode: int) -> BaseException:
    from .train import TrainingDataError

    try:
        err = json.loads((run / _ERROR).read_text())
    except (OSError, ValueError):
        return LaunchError(f"the training processes ended with exit code {returncode} and no model (see their "
                           "output above)")
    kinds = {"TrainingDataError": TrainingDataError, "ValueError": ValueError}
    if err.get("type") in kinds:
        return kinds[err["type"]](err.get("message", ""))
    return LaunchError(f"the training processes failed: {err.get('type')}: {err.get('message')}")


def train_in_processes(volumes: Sequence[Union[str, Path, Any]], *, processes: int, threads: Optional[int] = None,
                       progress: Optional[Callable[[dict], None]] = None,
                       should_stop: Optional[Callable[[], bool]] = None,
                       paused: Optional[Callable[[], bool]] = None, poll_s: float = 0.2, **train_kwargs: Any):
    """``train_detector(volumes, **train_kwargs)`` on ``processes`` local processes (``torchrun --standalone``),
    each with ``threads`` torch threads (default: the usable cores shared among them); returns the Detector. With
    ``processes == 1`` it is ``train_detector`` itself, in this process. ``train_kwargs`` must be picklable (paths,
    preset names, a ``Preprocessing`` ...); ``checkpoint_path`` is not taken (the model comes back here). See the
    module docstring for how ``progress``, ``should_stop`` and ``paused`` are relayed."""
    from .train import train_detector

    processes = int(processes)
    if processes < 1:
        raise ValueError(f"processes={processes}: must be >= 1")
    if "checkpoint_path" in train_kwargs:
        raise ValueError("train_in_processes returns the model; save it yourself (no checkpoint_path)")
    if processes == 1:
        return train_detector(volumes, progress=progress, should_stop=should_stop, paused=paused, **train_kwargs)
    from .cpu import usable_cores
    from .detector import Detector

    run = Path(tempfile.mkdtemp(prefix="spmamba-train-"))
    try:
        with open(run / _SPEC, "wb") as fh:
            pickle.dump({"volumes": [v if not isinstance(v, (str, Path)) else str(v) for v in volumes],
                         "kwargs": train_kwargs, "parent": os.getpid()}, fh)
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(threads or max(1, usable_cores() // processes))
        here = str(Path(__file__).resolve().parents[1])  # this spmamba, whatever the caller's sys.path was
        env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # torchrun sets its own
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "spmamba.launch", str(run)]
        log.info("training in %d processes: %s", processes, " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env)
        offset, stop_sent = 0, False
        try:
            while proc.poll() is None:
                offset = _relay_progress(run / _PROGRESS, offset, progress)
                if not stop_sent and should_stop is not None and should_stop():
                    (run / _STOP).touch()
                    stop_sent = True
                if paused is not None:
                    if paused():
                        (run / _PAUSE).touch()
                    elif (run / _PAUSE).exists():
                        (run / _PAUSE).unlink()
                time.sleep(poll_s)
        except BaseException:  # interrupted here: end the training processes too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        _relay_progress(run / _PROGRESS, offset, progress)
        if not (run / _MODEL).exists():
            raise _error_from(run, proc.returncode)
        if proc.returncode != 0:  # the model is whole (written atomically, after calibration): keep it
            log.warning("the training processes exited with code %s after rank 0 had written the calibrated model; "
                        "the model is used (see their output above for how they ended)", proc.returncode)
        return Detector.load(run / _MODEL, device=train_kwargs.get("device", "auto"))
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker(run: Path) -> None:
    """One training process started by ``train_in_processes`` (``python -m spmamba.launch RUN``)."""
    from .distributed import finish, launched
    from .train import train_detector

    with open(run / _SPEC, "rb") as fh:
        spec = pickle.load(fh)
    rank = launched()[0]
    events = open(run / _PROGRESS, "a") if rank == 0 else None

    def progress(event: dict) -> None:
        events.write(json.dumps(event, default=json_default) + "\n")
        events.flush()

    def should_stop() -> bool:  # the caller's request, or the caller is gone
        return (run / _STOP).exists() or not _parent_alive(spec["parent"])

    try:
        detector = train_detector(spec["volumes"], progress=progress if rank == 0 else None, should_stop=should_stop,
                                  paused=lambda: (run / _PAUSE).exists(), **spec["kwargs"])
        if rank == 0:  # the calibrated model, once (atomically)
            detector.save(run / _MODEL)
    except Exception as e:
        if rank == 0:
            write_json(run / _ERROR, {"type": type(e).__name__, "message": str(e)})
        raise
    finally:
        if events is not None:
            events.close()
    finish()  # the ranks leave together, once the model is written


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
