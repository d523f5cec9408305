#!/usr/bin/env python
"""Data-parallel training throughput (issue 14): slices per second of SP-Mamba's optimisation loop (``train.fit``)
run by torchrun with 1 and with several processes on this machine.

    python benchmarks/bench_scale.py [--preset fast] [--cores 2] [--steps 6] [--warmup 2] [--rounds 1]
                                     [--out benchmarks/results/scale_fast.json]

Configurations, each a ``torchrun --standalone`` run of this script's worker, the cores shared fairly (processes x
threads = ``--cores``, ``OMP_NUM_THREADS`` set for each process):

* ``1x{cores}``: one process with all the threads, the preset's batch (b);
* ``{cores}x1 same batch``: ``--cores`` processes of one thread, b / cores samples each: the same optimisation as
  the first (the same batch and learning rate), shared out;
* ``{cores}x1 default``: ``--cores`` processes of one thread, b samples each (what ``torchrun ... spmamba train``
  does: each step's batch is cores x b, the learning rate scaled by the same factor).

Each worker runs ``fit`` (no encoder norm pass; the teacher's features are cached as in a training) on fixed random
slices for ``--warmup`` + ``--steps`` steps; rank 0 times every step; reported: the median step time of the last
``--steps``, slices/s (the step's batch over it) and the ratio to ``1x{cores}``. ``--rounds`` repeats the list
(interleaved: a change of machine load hits every configuration alike). The load average is printed beside.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(REPO / "lib"))
    from spmamba import distributed
    from spmamba.detector import Detector
    from spmamba.models import SPMamba, get_config
    from spmamba.train import TrainingBudget, fit

    ranks, _ = distributed.setup(torch.device("cpu"))
    torch.manual_seed(0)
    model = SPMamba(get_config(args.preset, batch_size=args.batch))
    size = model.config.image_size
    n = args.batch * ranks.world * (args.warmup + args.steps)
    data = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))
    det = Detector(model, device="cpu")
    stamps: list = []

    def progress(e: dict) -> None:
        if e.get("phase") == "train" and e.get("loss") is not None:
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    fit(det, data, TrainingBudget(progress=progress), total_epochs=1, prepare=False,
        max_steps=args.warmup + args.steps)
    if ranks.main:
        times = [b - a for a, b in zip([t0] + stamps, stamps)][args.warmup:]
        Path(args.result).write_text(json.dumps({"step_s": times, "threads": torch.get_num_threads(),
                                                 "processes": ranks.world, "batch_per_process": args.batch}))


def run(config: dict, args, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]),
                   PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={config['processes']}", __file__, "--worker", "--preset", args.preset,
               "--batch", str(config["batch"]), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--result", str(result)]
        load_before = os.getloadavg()[0]
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        rec = json.loads(result.read_text())
    step = statistics.median(rec["step_s"])
    global_batch = config["batch"] * config["processes"]
    return {**config, "step_s": round(step, 3), "steps_timed": len(rec["step_s"]), "global_batch": global_batch,
            "slices_per_s": round(global_batch / step, 3), "threads_seen": rec["threads"],
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO / "lib"))
    from spmamba.models import get_config

    b, c = get_config(args.preset).training.batch_size, args.cores
    configs = [{"name": f"1x{c}", "processes": 1, "threads": c, "batch": b},
               {"name": f"{c}x1 same batch", "processes": c, "threads": 1, "batch": b // c},
               {"name": f"{c}x1 default", "processes": c, "threads": 1, "batch": b}]
    rows = []
    with open(Path(tempfile.gettempdir()) / "bench_scale.log", "w") as log:
        for r in range(args.rounds):
            for config in configs:
                row = run(config, args, log)
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), flush=True)
    base = statistics.median(x["slices_per_s"] for x in rows if x["name"] == configs[0]["name"])
    summary = []
    for config in configs:
        mine = [x for x in rows if x["name"] == config["name"]]
        sps = statistics.median(x["slices_per_s"] for x in mine)
        summary.append({"name": config["name"], "processes": config["processes"], "threads": config["threads"],
                        "batch_per_process": config["batch"], "step_batch": mine[0]["global_batch"],
                        "step_s": statistics.median(x["step_s"] for x in mine), "slices_per_s": round(sps, 3),
                        "vs_one_process": round(sps / base, 3)})
    for s in summary:
        print(f"{s['name']:>16}: {s['processes']} x {s['threads']} threads, batch {s['batch_per_process']} each "
              f"({s['step_batch']} a step): {s['step_s']:.2f} s/step, {s['slices_per_s']:.2f} slices/s, "
              f"{s['vs_one_process']:.2f}x")
    print("load average:", os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "cores": c, "steps": args.steps,
                                              "warmup": args.warmup, "machine": platform.platform(),
                                              "cpu_count": os.cpu_count(), "rows": rows, "summary": summary},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
