"""Training throughput (issue 10, lever 3): slices per second of one SP-Mamba optimisation step, before and after.

    python benchmarks/bench_train_step.py [--preset fast] [--threads 2] [--repeats 3] [--out results.json]

Variants, measured in one run, interleaved (so a change of machine load hits all of them alike), each on the same
model and batch:
  before   the PyTorch chunked scan (SPMAMBA_SCAN=torch), teacher forward in every step
  numba    the compiled numba scan (spmamba.ops.selective_scan_numba), teacher forward in every step
  cached   the numba scan and the teacher's features read from a TeacherFeatureCache (what ``fit`` does)
Reports the median step time, slices/s and the ratio to ``before``; prints the load average beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))

from spmamba.models.spmamba import SPMamba  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = SPMamba(a.preset)
    bs, size = model.config.training.batch_size, model.config.image_size
    data = torch.rand(2 * bs, 1, size, size)
    cache = model.training_samples(data, planned_samples=len(data))
    idx = torch.arange(bs)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()

    def step(batch):
        loss = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    variants = {"before": ("torch", data[idx]), "numba": ("numba", data[idx]), "cached": ("numba", cache[idx])}
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads = []
    for name, (scan, batch) in variants.items():  # warm-up (numba compilation, allocator)
        os.environ["SPMAMBA_SCAN"] = scan
        step(batch)
    for _ in range(a.repeats):
        for name, (scan, batch) in variants.items():
            os.environ["SPMAMBA_SCAN"] = scan
            t = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
    ref = statistics.median(times["before"])
    rows = {}
    print(f"| variant | s/step | slices/s | speed-up |   ({a.preset} preset, batch {bs}, {a.threads} threads, "
          f"load average {min(loads):.2f}-{max(loads):.2f})")
    print("|---|---|---|---|")
    for name in variants:
        med = statistics.median(times[name])
        rows[name] = {"seconds_per_step": round(med, 3), "slices_per_s": round(bs / med, 2),
                      "speedup": round(ref / med, 2), "all": [round(t, 3) for t in times[name]]}
        print(f"| {name} | {med:.2f} | {bs / med:.2f} | {ref / med:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": a.preset, "batch": bs, "threads": a.threads, "machine": platform.processor() or
                       platform.machine(), "load_average": [min(loads), max(loads)], "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
