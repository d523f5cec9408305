"""Sharing the CPU between processes: a clinician's detection, a training and background scoring on one machine.

PyTorch (and the numba scan kernels) run one OpenMP-style thread pool per process, sized to the machine. Two such
processes side by side ask for twice the cores: threads are descheduled in the middle of parallel regions and the
others wait for them at barriers, so both slow down far more than by half (measured on 2 cores: a training step of
3.7 s alone took 40-110 s beside a detection). This module gives the pieces to avoid that:

* ``usable_cores()``: the cores this process may run on (its CPU affinity, and a cgroup CPU quota if one is set);
* ``lower_priority(threads)``: background work (active-learning scoring) runs at ``nice`` +10 with ``threads`` torch
  threads; ``set_threads(n)`` sizes the pool alone (the app's training: normal priority, it yields by pausing);
  numba's scan kernels follow torch's thread count at every call;
* ``foreground(folder)`` / ``foreground_busy(folder)``: a detection someone waits for holds a marker file in
  ``folder`` while it runs; a training polls ``foreground_busy`` between optimisation steps and pauses while it
  says True (``spmamba.train.TrainingBudget.paused``), so the detection gets the cores.

Markers are one file per holder (process id + a random part, so concurrent detections of one server process never
remove each other's), written atomically (``spmamba.atomic``) with the holder's pid, the pid's start time (so a
reused pid is not mistaken for the holder) and the marker's start time. A marker whose process is gone, or older
than ``max_age_s``, is stale: ``foreground_busy`` ignores and removes it, so a killed detection never pauses a
training for good.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

from .atomic import write_json

__all__ = ["usable_cores", "lower_priority", "set_threads", "foreground", "foreground_busy", "foreground_holders",
           "DEFAULT_MAX_AGE_S"]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 900.0  # a detection holding the CPU longer than this is taken for a hung one
_MARKER_SUFFIX = ".json"
_lowered = False  # lower_priority's nice +10 is applied once per process


def _cgroup_cpu_limit() -> Optional[int]:
    """Cores allowed by a cgroup v2 CPU quota (``cpu.max``: "QUOTA PERIOD" or "max PERIOD"), None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The number of cores this process may use: its CPU affinity (``os.sched_getaffinity``; ``os.cpu_count`` where
    that does not exist), capped by a cgroup v2 CPU quota when one is set. At least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(n, quota) if quota else n)


def lower_priority(threads: Optional[int] = 1, niceness: int = 10) -> None:
    """Make this process background work: ``nice`` +``niceness`` (relative to what it inherited, applied once per
    process however often this is called) and ``threads`` torch threads (None: leave torch's count). numba's scan
    kernels (``spmamba.ops.selective_scan_numba``) take torch's thread count at every call, so they follow."""
    global _lowered
    if not _lowered:
        try:
            os.nice(niceness)
        except (OSError, AttributeError):
            pass
        _lowered = True
    if threads is not None:
        set_threads(threads)


def set_threads(threads: int) -> None:
    """Use ``threads`` torch threads in this process (numba's scan kernels follow torch's count)."""
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ImportError:  # no torch: nothing to size
        pass


def _pid_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(") ", 1)[-1].split()
        if fields[0] == "Z":  # a zombie: ended, not yet reaped
            return "zombie"
        return fields[19]  # field 22 of stat; fields here start at field 3
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return _pid_start(pid) != "zombie"


@contextlib.contextmanager
def foreground(folder: Union[str, os.PathLike], what: str = "detection") -> Iterator[Path]:
    """Hold a foreground marker in ``folder`` (created if needed) while the block runs; yields the marker's path.
    The marker is removed when the block ends (also on an exception); other holders' markers are never touched.
    A marker that cannot be written (read-only folder ...) is logged and the block runs anyway."""
    folder = Path(folder)
    pid = os.getpid()
    marker = folder / f"{pid}-{uuid.uuid4().hex[:12]}{_MARKER_SUFFIX}"
    try:
        write_json(marker, {"pid": pid, "pid_start": _pid_start(pid), "start": time.time(), "what": what},
                   indent=None)
        written = True
    except OSError as e:
        log.warning("cannot write the foreground marker %s: %s", marker, e)
        written = False
    try:
        yield marker
    finally:
        if written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)


def _stale(rec: dict, now: float, max_age_s: float) -> bool:
    try:
        pid, start = int(rec["pid"]), float(rec["start"])
    except (KeyError, TypeError, ValueError):
        return True
    if now - start > max_age_s or not _pid_alive(pid):
        return True
    recorded = rec.get("pid_start")
    return recorded is not None and _pid_start(pid) not in (None, recorded)  # the pid was reused


def foreground_holders(folder: Union[str, os.PathLike], max_age_s: float = DEFAULT_MAX_AGE_S) -> list[dict]:
    """The live foreground markers in ``folder`` (their records: pid, start, what), oldest first. Stale ones (dead
    or reused pid, older than ``max_age_s``, unreadable) are removed, and so are leftover temporary files of
    writers killed mid-write older than ``max_age_s``."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder: nobody holds one
        return []
    now = time.time()
    live = []
    for entry in entries:
        try:
            if entry.name.startswith("."):  # an atomic write in progress, or left by a killed writer
                if now - entry.stat().st_mtime > max_age_s:
                    os.unlink(entry.path)
                continue
            if not entry.name.endswith(_MARKER_SUFFIX):
                continue
            with open(entry.path) as f:
                rec = json.load(f)
        except FileNotFoundError:  # removed by its holder meanwhile
            continue
        except (OSError, ValueError):
            rec = {}
        if not isinstance(rec, dict) or _stale(rec, now, max_age_s):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            continue
        live.append(rec)
    return sorted(live, key=lambda r: r["start"])


def foreground_busy(folder: Union[str, os.PathLike], max_age_s: float = DEFAULT_MAX_AGE_S) -> bool:
    """True while some live process holds a ``foreground`` marker in ``folder`` younger than ``max_age_s``; cleans
    stale markers on the way (see ``foreground_holders``). Cheap: one directory listing."""
    return bool(foreground_holders(folder, max_age_s))
