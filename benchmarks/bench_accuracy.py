"""Accuracy benchmark on the synthetic brain phantoms (issue 5, items 5-6).

SP-Mamba (fast preset, offline: random frozen encoder unless --encoder-weights FILE) against a voxel-wise statistical
baseline, an RD4AD-style CNN decoder with the same encoder, SP-Mamba ablations and position-aware normalisation.
Every row is a method of the registry (spmamba.methods; ``VARIANTS``) driven through the same calls: train_detector
(held-out split, fit, calibration), Detector.detect, then the metrics.
Each method runs in its own process (so peak memory is its own) under one training-time budget, and writes
benchmarks/results/accuracy_<method>.json; ``--table`` prints the markdown table of all results found.

    python benchmarks/bench_accuracy.py --data /tmp/bench/data2mm --train-seconds 240
    python benchmarks/bench_accuracy.py --table

Metrics come from spmamba.metrics: image AUROC/AP/F1-max over test volumes; pixel AUROC/AP/AUPRO/best Dice pooled over
the foreground voxels (brain, from the intensity normalisation) of all test volumes; lesion TPR/PPV/HD99/MSD at the
method's own pixel threshold, calibrated at 0.1% voxel FPR on held-out normals (the product's operating point).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ["spmamba", "voxelwise", "rd4ad_cnn", "spmamba_no_proto", "spmamba_hilbert"]
#: benchmark row -> (method of the registry, overrides of its default preset); every row is trained, calibrated and
#: run through the same calls (spmamba.train.train_detector, Detector.detect)
VARIANTS = {
    "spmamba": ("spmamba", {}),
    "voxelwise": ("voxelwise", {}),
    "spmamba_no_proto": ("spmamba", {"use_prototypes": False}),
    "spmamba_hilbert": ("spmamba", {"scan": "hilbert"}),
    "rd4ad_cnn": ("spmamba", {"decoder": "cnn", "use_prototypes": False}),
    "spmamba_imagenet": ("spmamba", {}),
}
NOTES = {"voxelwise": "per-voxel mean/std of 16 intensity-normalised normals, |z| smoothed sigma 1 voxel, top-50 mean"}
SPACING = 2.0


def _load(path):
    from spmamba.io import load_volume
    return load_volume(path)


def _dataset(data: Path):
    train = sorted((data / "train").glob("*.nii.gz"))
    rows = list(csv.DictReader(open(data / "test" / "labels.csv")))
    test = [(r["id"], data / "test" / "images" / f"{r['id']}.nii.gz", data / "test" / "masks" / f"{r['id']}.nii.gz",
             int(r["abnormal"]), r["family"]) for r in rows]
    return train, test


def evaluate(cases, pixel_threshold: float) -> dict:
    """cases: list of dicts with heatmap, score, mask, label, fg (the detector's foreground)."""
    from spmamba.metrics import LesionMetricAccumulator, PixelMetricAccumulator, image_metrics

    pix = PixelMetricAccumulator()
    les = LesionMetricAccumulator(threshold=pixel_threshold)
    for c in cases:
        pix.add(c["heatmap"], c["mask"], region=c["fg"])
        les.add(np.where(c["fg"], c["heatmap"], -np.inf), c["mask"], spacing=(SPACING,) * 3)
    return {"image": image_metrics([c["label"] for c in cases], [c["score"] for c in cases]),
            "pixel": pix.compute(), "lesion": les.compute(),
            "scores": {c["id"]: [c["label"], c["score"]] for c in cases}}


def _detect_all(det, test) -> tuple[list[dict], list[float]]:
    cases, det_s = [], []
    for sid, img, msk, lab, fam in test:
        v = _load(img)
        r = det.detect(v.array, v.affine)
        det_s.append(r.timings["total_s"])
        cases.append({"id": sid, "heatmap": r.heatmap, "score": r.score, "mask": _load(msk).array, "label": lab,
                      "fg": r.foreground})
    return cases, det_s


def run_method(name: str, data: Path, args) -> list[dict]:
    """Any method of the registry: train_detector (split, build, fit, calibrate) -> Detector.detect -> metrics."""
    from spmamba.detector import Detector
    from spmamba.methods import get_method
    from spmamba.scoring import aggregate_slice_scores
    from spmamba.train import calibrate, split_normals, train_detector

    method, overrides = VARIANTS[name]
    cls = get_method(method)
    train, test = _dataset(data)
    cfg = cls.get_config(cls.default_preset, **overrides)
    weights = args.encoder_weights if name == "spmamba_imagenet" else "none"
    budget = float(args.train_seconds)
    t_loop = {}

    def progress(d):
        if d.get("phase") == "train" and "start" not in t_loop:
            t_loop["start"] = time.perf_counter()
        if d.get("phase") == "calibrate" and "end" not in t_loop:
            t_loop["end"] = time.perf_counter()
        if d.get("phase") == "epoch":
            print(f"[{name}] epoch {d['epoch']} loss {d['loss']:.4f}", flush=True)

    def stop():
        return "start" in t_loop and time.perf_counter() - t_loop["start"] > budget

    t0 = time.perf_counter()
    _, val_idx = split_normals(len(train))
    if args.model:  # a model trained beforehand (e.g. `spmamba train --time-limit 17`): evaluate it as it is,
        det = Detector.load(args.model, device="cpu")  # recalibrated on the same held-out split with today's pipeline
        det.calibration = calibrate(det, [_load(train[i]) for i in val_idx])
        train_s = float(det.meta["training"]["train_seconds"])
        t_loop.update(start=0.0, end=train_s)
    else:
        det = train_detector([str(p) for p in train], method=method, config=cfg, epochs=args.epochs, device="cpu",
                             seed=0, encoder_weights=weights, progress=progress, should_stop=stop)
        train_s = time.perf_counter() - t0
    info = det.meta["training"]
    print(f"[{name}] trained {train_s:.0f}s epochs {info['epochs']} samples {info['n_slices']}", flush=True)
    cases, det_s = _detect_all(det, test)
    common = {"train_s": train_s, "train_loop_s": t_loop.get("end", t0) - t_loop.get("start", t0),
              "epochs": info["epochs"], "n_train_slices": info["n_slices"], "final_loss": info["final_loss"],
              "detect_s_per_volume": float(np.mean(det_s)), "method_of_registry": method,
              "config": dict(overrides), "encoder_weights": weights, "model_file": args.model,
              "encoder_norm": det.meta["training"].get("encoder_norm"), "teacher": det.meta.get("teacher"),
              "train_steps": info.get("steps"),
              "heatmap_sigma_mm": det.preprocessing.heatmap_sigma_mm}
    out = [{"method": name, "pixel_threshold": det.calibration.pixel_threshold, **common,
            **evaluate(cases, det.calibration.pixel_threshold), **({"notes": NOTES[name]} if name in NOTES else {})}]
    if name != "spmamba":
        return out
    # ablation without contrast/concentration terms: same maps, slice score = max(A) (on the volume grid)
    nt = []
    for c in cases:
        h = c["heatmap"]
        sl = h.reshape(-1, h.shape[2]).max(0)
        nt.append({**c, "score": aggregate_slice_scores(sl[sl > 0])})
    out.append({"method": "spmamba_no_score_terms", "pixel_threshold": det.calibration.pixel_threshold, **common,
                **evaluate(nt, det.calibration.pixel_threshold)})
    if args.no_posnorm:
        return out
    # position-aware normalisation (Detector.fit_position_stats, as train_detector(position_normalise=True) does):
    # heatmaps z-scored against those of the training normals, recalibrated on the held-out ones
    t = time.perf_counter()
    train_idx, _ = split_normals(len(train))
    det.fit_position_stats([_load(train[i]) for i in train_idx])
    det.calibration = calibrate(det, [_load(train[i]) for i in val_idx])
    fit_s = time.perf_counter() - t
    pn, _ = _detect_all(det, test)
    out.append({"method": "spmamba_posnorm", "pixel_threshold": det.calibration.pixel_threshold, **common,
                "posnorm_fit_s": fit_s, "train_s": train_s + fit_s, **evaluate(pn, det.calibration.pixel_threshold),
                "notes": "heatmap z-scored per voxel against SP-Mamba heatmaps of the 16 training normals; top-50 mean"})
    return out


def run_one(method: str, args) -> None:
    data = Path(args.data)
    load0 = os.getloadavg()
    t0 = time.time()
    rows = run_method(method, data, args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.update(peak_rss_mb=peak_mb, wall_s=time.time() - t0, loadavg_start=load0, loadavg_end=os.getloadavg(),
                 train_seconds_budget=args.train_seconds, data=str(data), spacing_mm=SPACING)
        (RESULTS / f"accuracy_{r['method']}.json").write_text(json.dumps(r, indent=1, default=float))
        print(f"wrote accuracy_{r['method']}.json", flush=True)


def _f(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def table() -> str:
    rows = []
    order = METHODS + ["spmamba_no_score_terms", "spmamba_posnorm", "spmamba_imagenet"]
    found = sorted(p.name[len("accuracy_"):-len(".json")] for p in RESULTS.glob("accuracy_*.json"))
    for m in [m for m in order if m in found] + [m for m in found if m not in order]:
        p = RESULTS / f"accuracy_{m}.json"
        r = json.loads(p.read_text())
        i, px, le = r["image"], r["pixel"], r["lesion"]
        rows.append(f"| {m} | {_f(i['auroc'])} | {_f(i['ap'])} | {_f(i['f1_max'])} | {_f(px['auroc'])} | "
                    f"{_f(px['ap'])} | {_f(px['aupro'])} | {_f(px['best_dice'])} | {_f(le['tpr'], 2)} | "
                    f"{_f(le['ppv'], 2)} | {_f(le['hd99_mm'], 1)} | {_f(le['msd_mm'], 1)} | {_f(r['train_s'], 0)} | "
                    f"{_f(r['detect_s_per_volume'], 1)} | {_f(r['peak_rss_mb'], 0)} |")
    head = ("| method | img AUROC | img AP | img F1max | px AUROC | px AP | AUPRO | best Dice | lesion TPR | "
            "lesion PPV | HD99 mm | MSD mm | train s | detect s/vol | peak MB |\n|" + "---|" * 15)
    return head + "\n" + "\n".join(rows)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench/data2mm")
    ap.add_argument("--make-data", action="store_true", help="write 20 train + 30 test 2 mm volumes to --data first")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--one", help="run one method in this process (used internally)")
    ap.add_argument("--train-seconds", type=float, default=240.0, help="training-loop budget per method")
    ap.add_argument("--epochs", type=int, default=100, help="epoch cap (the time budget usually stops first)")
    ap.add_argument("--encoder-weights", default=None, help="torchvision ResNet34 .pth: adds spmamba_imagenet")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--model", help="evaluate this trained SP-Mamba file instead of training (method spmamba only)")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the accuracy_<method>.json files")
    ap.add_argument("--no-posnorm", action="store_true",
                    help="skip the spmamba_posnorm row (it detects every test volume a second time)")
    args = ap.parse_args()
    RESULTS = Path(args.results)
    if args.table:
        print(table())
        return
    if args.one:
        run_one(args.one, args)
        return
    if args.make_data:
        from spmamba.data.synthetic import make_dataset
        print(make_dataset(args.data, n_train=20, n_test=30, seed=0, spacing=SPACING, progress=False))
    methods = list(args.methods)
    if args.encoder_weights:
        if not Path(args.encoder_weights).is_file():
            sys.exit(f"no encoder weights file {args.encoder_weights}")
        methods.append("spmamba_imagenet")
    for m in methods:
        cmd = [sys.executable, __file__, "--one", m, "--data", args.data, "--train-seconds", str(args.train_seconds),
               "--epochs", str(args.epochs), "--results", str(RESULTS)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--no-posnorm"] if args.no_posnorm else []
        cmd += ["--encoder-weights", args.encoder_weights] if args.encoder_weights else []
        print(">>", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    print(table())


if __name__ == "__main__":
    main()
