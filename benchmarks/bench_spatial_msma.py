"""Spatial-MSMA detection time (``spmamba.methods.spatial_msma``): seconds of ``Detector.detect`` per 2 mm
synthetic brain (``spmamba.data.synthetic``) for a preset, and of one score-stage and one flow-stage optimisation
step. The time does not depend on the weights: the model is untrained (sigma_max set as training would).

    OMP_NUM_THREADS=1 python benchmarks/bench_spatial_msma.py --preset fast --repeats 3 [--out results/X.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from spmamba.data.synthetic import make_normal
from spmamba.detector import Detector
from spmamba.io import Volume
from spmamba.methods.spatial_msma import FeatureSamples, SpatialMSMA, to_working_grid
from spmamba.preprocessing import Preprocessing
from spmamba.train import prepare_volumes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = SpatialMSMA(args.preset)
    model.sigma_max_value.fill_(100.0)  # what the preparation would set (a distance between volumes)
    det = Detector(model, Preprocessing(**dict(SpatialMSMA.preprocessing_defaults)), device="cpu")
    subj = make_normal(0, 0, spacing=2.0)
    det.detect(subj.image, subj.affine)  # warm-up
    times, parts = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = det.detect(subj.image, subj.affine)
        times.append(time.perf_counter() - t0)
        parts.append(res.timings)
    # one optimisation step of each stage (batch of the preset; the flow stage's features cached before)
    pv = prepare_volumes([Volume(subj.image, subj.affine)], det.preprocessing)[0]
    vols = to_working_grid(pv.norm, pv.fg, model.config.grid)[None].repeat(model.config.training.batch_size, 1, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_s = {}
    samples = FeatureSamples(model, vols)
    for stage in (0, 1):
        model.begin_stage(stage)
        model.train()
        batch = samples[torch.arange(len(vols))]
        t0 = time.perf_counter()
        loss = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_s[("score", "flow")[stage]] = round(time.perf_counter() - t0, 3)
    out = {"preset": args.preset, "shape": list(subj.image.shape), "threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "detect_s": [round(t, 3) for t in times],
           "detect_s_median": round(statistics.median(times), 3), "timings": parts[-1], "step_s": step_s,
           "score_net_parameters": sum(p.numel() for p in model.score_net.parameters()),
           "load_average": os.getloadavg()}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
