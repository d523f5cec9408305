#!/usr/bin/env python
"""A shared CPU: a clinician's detection while a training runs on the same machine (issue 10, lever 4).

    python benchmarks/bench_shared_cpu.py [--minutes 4] [--preset fast] [--data DIR] [--passive]
                                          [--out benchmarks/results/shared_cpu.json]

In the foreground this process times ``Detector.detect`` on one 2 mm volume (an untrained model of the preset unless
``--model``: the latency does not depend on the weights), holding a ``spmamba.cpu.foreground`` marker as the app's
inference path does, one detection every ``--gap-s`` seconds (a clinician looking at each result). A training of the
preset (``train_detector`` on ``--n-train`` volumes of ``--data``, or synthetic 2 mm normals) runs in a subprocess.
Phases, in this order:

* ``idle``: detections with nothing else running;
* ``train_alone``: the training with no detection (its steps/min alone);
* ``plain``: detections while the training runs as before this change (same priority, all cores, never pauses);
* ``yield``: detections while the training yields as the app's training task does (``nice`` +10 with
  ``lower_priority(usable_cores())`` and ``paused=foreground_busy``: it pauses between steps while a detection runs);
* ``yield_passive`` (``--passive``): the same with ``OMP_WAIT_POLICY=PASSIVE`` in the training's environment (a new
  training process: the OpenMP runtime reads it at start).

Reported: detection latency (median) per phase and its ratio to ``idle`` (goal: <= 2 with yielding); the training's
steps/min per phase, its ratio to ``train_alone``, and its *fair share*: the share of the window no detection ran
(1 - duty cycle of the detections), i.e. what it would keep if it lost exactly the detections' time (goal: ratio
>= fair share, roughly). The training switches from ``plain`` to ``yield`` in the same process (nice cannot be
undone, so ``yield`` comes last). ``--minutes`` bounds the whole run (default 4).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/tmp/bench/data2mm/train")


# ------------------------------------------------------------------------------------------------ training worker

def worker(args) -> None:
    """The training subprocess: trains until killed; one JSON line per optimisation step in ``--log``."""
    from spmamba.cpu import foreground_busy, lower_priority, usable_cores
    from spmamba.train import train_detector

    log = open(args.log, "a", buffering=1)
    state = {"yield": False}

    def mode() -> str:
        try:
            return Path(args.control).read_text().strip()
        except OSError:
            return "plain"

    def paused() -> bool:
        if mode() != "yield":
            return False
        if not state["yield"]:  # what the app's training task does in MONAI Label's subprocess
            lower_priority(threads=usable_cores())
            state["yield"] = True
            log.write(json.dumps({"t": time.time(), "mode": "yield", "nice": os.nice(0)}) + "\n")
        return foreground_busy(args.fg)

    last_phase = [None]

    def progress(e: dict) -> None:
        if e.get("phase") != last_phase[0]:  # for the record: how long the warm-up phases take
            last_phase[0] = e.get("phase")
            log.write(json.dumps({"t": time.time(), "phase": e.get("phase")}) + "\n")
        if e.get("phase") == "train" and e.get("loss") is not None:
            log.write(json.dumps({"t": time.time(), "step": e.get("global_step")}) + "\n")
        elif e.get("phase") == "paused":
            log.write(json.dumps({"t": time.time(), "paused": True}) + "\n")

    vols = [line for line in Path(args.volumes).read_text().splitlines() if line]
    train_detector(vols, config=args.preset, epochs=100000, device="cpu", progress=progress, paused=paused, seed=0,
                   val_fraction=1.0 / len(vols))


# ------------------------------------------------------------------------------------------------ foreground

def _events(log: Path) -> list:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _wait_for(log: Path, key: str, until: float, proc) -> bool:
    while time.time() < until:
        if any(key in e for e in _events(log)):
            return True
        if proc.poll() is not None:
            raise RuntimeError(f"the training worker ended (exit status {proc.returncode})")
        time.sleep(0.5)
    return False


def _steps_in(log: Path, t0: float, t1: float) -> int:
    return sum(1 for e in _events(log) if "step" in e and t0 <= e["t"] < t1)


def _detect_window(det, vol, fg: Path, seconds: float, gap_s: float, min_detections: int = 1) -> dict:
    from spmamba.cpu import foreground

    lat = []
    t0 = time.time()
    while True:
        with foreground(fg):
            t = time.perf_counter()
            det.detect(vol.array, vol.affine)
            lat.append(time.perf_counter() - t)
        if len(lat) >= min_detections and time.time() - t0 + gap_s >= seconds:
            break
        time.sleep(gap_s)
    t1 = time.time()
    return {"t0": t0, "t1": t1, "latencies_s": [round(x, 3) for x in lat], "median_s": statistics.median(lat),
            "duty": min(1.0, sum(lat) / max(1e-9, t1 - t0))}


def _start_worker(work: Path, args, name: str, env_extra: dict):
    log = work / f"{name}.jsonl"
    control = work / f"{name}.control"
    control.write_text("plain")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--log", str(log), "--control", str(control),
           "--fg", str(work / "fg"), "--volumes", str(work / "volumes.txt"), "--preset", args.preset]
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib") + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.err", "w"))
    return proc, log, control


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="bound on the whole run (default 4)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--model", default=None, help="a model file for the detections (default: untrained preset)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="training normals (default /tmp/bench/data2mm/train; "
                    "synthetic 2 mm normals when missing)")
    ap.add_argument("--n-train", type=int, default=6, help="training volumes (one held out)")
    ap.add_argument("--gap-s", type=float, default=2.0, help="pause between two foreground detections")
    ap.add_argument("--idle-detections", type=int, default=3)
    ap.add_argument("--passive", action="store_true", help="also measure yield with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (training logs, volumes)")
    # internal: the training subprocess
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    ap.add_argument("--fg", help=argparse.SUPPRESS)
    ap.add_argument("--volumes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    sys.path.insert(0, str(REPO / "lib"))
    import torch

    from spmamba.cpu import usable_cores
    from spmamba.detector import Detector
    from spmamba.io import load_volume, save_volume
    from spmamba.train import build_or_resume

    start = time.time()
    deadline = start + 60.0 * args.minutes
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_shared_cpu_"))
    (work / "fg").mkdir()
    data = Path(args.data)
    files = sorted(p for p in data.glob("*.nii*")) if data.is_dir() else []
    if len(files) >= 3:
        files = files[: args.n_train]
        test = sorted((data.parent / "test").glob("*.nii*")) if (data.parent / "test").is_dir() else []
        detect_path = test[0] if test else files[0]
    else:  # synthetic 2 mm normals
        from spmamba.data.synthetic import make_abnormal, make_normal

        files = []
        for i in range(max(3, args.n_train)):
            s = make_normal(seed=11, index=i, spacing=2.0)
            files.append(work / f"normal_{i}.nii.gz")
            save_volume(s.image, s.affine, str(files[-1]))
        s = make_abnormal(seed=12, index=0, spacing=2.0)
        detect_path = work / "brain.nii.gz"
        save_volume(s.image, s.affine, str(detect_path))
    (work / "volumes.txt").write_text("\n".join(str(p) for p in files) + "\n")
    vol = load_volume(detect_path)
    det = Detector.load(args.model, device="cpu") if args.model else build_or_resume(None, args.preset,
                                                                                     device="cpu")[0]
    det.detect(vol.array, vol.affine)  # warm-up (excluded)
    res = {"preset": args.preset, "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "volume": str(detect_path),
           "volume_shape": list(vol.array.shape), "n_train": len(files), "gap_s": args.gap_s,
           "loadavg_before": [round(x, 2) for x in load_before], "phases": {}}

    print(f"[bench] {usable_cores()} cores, load average {load_before[0]:.2f}; preset {args.preset}; "
          f"{len(files)} training volumes; work in {work}", flush=True)
    res["phases"]["idle"] = _detect_window(det, vol, work / "fg", 0.0, args.gap_s, args.idle_detections)
    print(f"[bench] idle detection: {res['phases']['idle']['median_s']:.2f} s", flush=True)

    proc, log, control = _start_worker(work, args, "train", {})
    windows = []
    try:
        if not _wait_for(log, "step", deadline - 30, proc):
            raise RuntimeError("the training made no step in time: give more --minutes or a smaller --preset")
        t_first = time.time()
        n_windows = 3 + (1.5 if args.passive else 0)
        w = max(10.0, (deadline - time.time() - 5) / n_windows)
        res["window_s"] = round(w, 1)
        t0 = time.time()
        time.sleep(w)
        res["phases"]["train_alone"] = {"t0": t0, "t1": time.time()}
        res["phases"]["plain"] = _detect_window(det, vol, work / "fg", w, args.gap_s)
        control.write_text("yield")
        _wait_for(log, "mode", time.time() + 600, proc)  # the worker switches before its next step
        res["phases"]["yield"] = _detect_window(det, vol, work / "fg", w, args.gap_s)
        windows = [("train_alone", log), ("plain", log), ("yield", log)]
        res["first_train_step_at_s"] = round(t_first - start, 1)
    finally:
        _stop(proc)
    for name, lg in windows:
        ph = res["phases"][name]
        steps = _steps_in(lg, ph["t0"], ph["t1"])
        ph["train_steps"] = steps
        ph["train_steps_per_min"] = 60.0 * steps / (ph["t1"] - ph["t0"])
        ph["pauses"] = sum(1 for e in _events(lg) if e.get("paused") and ph["t0"] <= e["t"] < ph["t1"])
    if args.passive and time.time() < deadline - 20:
        proc, log2, control2 = _start_worker(work, args, "passive", {"OMP_WAIT_POLICY": "PASSIVE"})
        control2.write_text("yield")
        try:
            if _wait_for(log2, "step", deadline - 10, proc):
                w = max(10.0, deadline - time.time() - 2)
                ph = _detect_window(det, vol, work / "fg", w, args.gap_s)
                steps = _steps_in(log2, ph["t0"], ph["t1"])
                ph.update(train_steps=steps, train_steps_per_min=60.0 * steps / (ph["t1"] - ph["t0"]),
                          pauses=sum(1 for e in _events(log2) if e.get("paused") and ph["t0"] <= e["t"] < ph["t1"]))
                res["phases"]["yield_passive"] = ph
        finally:
            _stop(proc)

    idle = res["phases"]["idle"]["median_s"]
    alone = res["phases"].get("train_alone", {}).get("train_steps_per_min")
    print(f"\n{'phase':<14}{'detect s':>10}{'x idle':>8}{'duty':>7}{'steps/min':>11}{'x alone':>9}"
          f"{'fair':>7}{'pauses':>8}")
    for name, ph in res["phases"].items():
        if "median_s" in ph:
            ph["latency_ratio"] = ph["median_s"] / idle
        if alone and "train_steps_per_min" in ph:
            ph["train_ratio"] = ph["train_steps_per_min"] / alone
            ph["fair_share"] = 1.0 - ph.get("duty", 0.0)
        cells = [f"{ph['median_s']:.2f}" if "median_s" in ph else "-",
                 f"{ph['latency_ratio']:.2f}" if "latency_ratio" in ph else "-",
                 f"{ph['duty']:.2f}" if "duty" in ph else "-",
                 f"{ph['train_steps_per_min']:.1f}" if "train_steps_per_min" in ph else "-",
                 f"{ph['train_ratio']:.2f}" if "train_ratio" in ph else "-",
                 f"{ph['fair_share']:.2f}" if "fair_share" in ph else "-",
                 str(ph.get("pauses", "-"))]
        print(f"{name:<14}{cells[0]:>10}{cells[1]:>8}{cells[2]:>7}{cells[3]:>11}{cells[4]:>9}{cells[5]:>7}"
              f"{cells[6]:>8}")
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["seconds"] = round(time.time() - start, 1)
    print(f"\nload average before {load_before[0]:.2f}, after {res['loadavg_after'][0]:.2f}; "
          f"{res['seconds']:.0f} s in all (first training step at {res.get('first_train_step_at_s', '-')} s)")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
