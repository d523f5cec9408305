"""Accuracy benchmark on the synthetic brain phantoms (issue 5, items 5-6).

SP-Mamba (fast preset, offline: random frozen encoder unless --encoder-weights FILE) against a voxel-wise statistical
baseline, an RD4AD-style CNN decoder with the same encoder, SP-Mamba ablations and position-aware normalisation;
MemMC-MAE (fast preset) and its ablations (rows memmc_mae*, not in the default list).
Every row is a method of the registry (spmamba.methods; ``VARIANTS``) driven through the same calls: train_detector
(held-out split, fit, calibration), Detector.detect, then the metrics.
Each method runs in its own process (so peak memory is its own) under one training-time budget, and writes
benchmarks/results/accuracy_<method>.json; ``--table`` prints the markdown table of all results found.

    python benchmarks/bench_accuracy.py --data /tmp/bench/data2mm --train-seconds 240
    python benchmarks/bench_accuracy.py --table

Unregistered subjects (issue 10: scanner pose, each volume on its own grid; synthetic.make_dataset(unregistered=True)):

    python benchmarks/bench_accuracy.py --make-data --unregistered --n-test 60 --seed 0 --data /tmp/bench/unreg \
        --methods voxelwise --align affine
    python benchmarks/bench_accuracy.py --data /tmp/bench/unreg --methods voxelwise --align header

``--align none|affine`` is ``train_detector(align=...)`` (the model registers every volume to its reference and maps
its heatmaps back onto the input grid); ``--align header`` (benchmark only) trusts the scanner coordinates: every
volume is resampled by its affine onto one RAS grid covering the training volumes, and the maps go back the same way
(what a method that compares voxels by position sees without registration when the grids differ). Metrics are
always computed on each test volume's own grid, against its own mask.

Learning curve: several model files saved during one training, evaluated into one table (each recalibrated on the
same held-out split; rows ``<method>@<file stem>``, with the file's training seconds):

    python benchmarks/bench_accuracy.py --data /tmp/bench/unreg --models m5.pt m10.pt m20.pt m40.pt \
        --results benchmarks/results/curve

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
    # MemMC-MAE (fast preset) and its ablations: no memory slots; the decoder attends to the last encoder level only
    "memmc_mae": ("memmc_mae", {}),
    "memmc_mae_no_memory": ("memmc_mae", {"memory_slots": 0}),
    "memmc_mae_single_level": ("memmc_mae", {"decoder_levels": 1}),
    # Spatial-MSMA (fast preset): score network, then the position-conditioned flow, in the one time budget
    "spatial_msma": ("spatial_msma", {}),
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


def _voxel_mm(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def evaluate(cases, pixel_threshold: float) -> dict:
    """cases: list of dicts with heatmap, score, mask, label, fg (the detector's foreground), each on its test
    volume's own grid (shapes may differ between cases; voxel sizes from ``spacing`` when given)."""
    from spmamba.metrics import LesionMetricAccumulator, PixelMetricAccumulator, image_metrics

    pix = PixelMetricAccumulator()
    les = LesionMetricAccumulator(threshold=pixel_threshold)
    for c in cases:
        pix.add(c["heatmap"], c["mask"], region=c["fg"])
        les.add(np.where(c["fg"], c["heatmap"], -np.inf), c["mask"], spacing=c.get("spacing", (SPACING,) * 3))
    return {"image": image_metrics([c["label"] for c in cases], [c["score"] for c in cases]),
            "pixel": pix.compute(), "lesion": les.compute(),
            "scores": {c["id"]: [c["label"], c["score"]] for c in cases}}


class HeaderGrid:
    """``--align header``: one RAS grid (``spacing`` mm) covering the given volumes in scanner coordinates; volumes
    are resampled onto it by their affines alone (no registration) and maps go back onto each volume's grid."""

    def __init__(self, volumes, spacing: float = SPACING, margin_mm: float = 8.0):
        corners = []
        for v in volumes:
            sh = np.asarray(v.array.shape) - 1
            c = np.array([[i, j, k] for i in (0, sh[0]) for j in (0, sh[1]) for k in (0, sh[2])], float).T
            corners.append(v.affine[:3, :3] @ c + v.affine[:3, 3:4])
        pts = np.concatenate(corners, axis=1)
        lo, hi = pts.min(axis=1) - margin_mm, pts.max(axis=1) + margin_mm
        self.shape = tuple(int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi))
        self.affine = np.diag([spacing, spacing, spacing, 1.0])
        self.affine[:3, 3] = lo

    @staticmethod
    def _resample(data, src_affine, dst_shape, dst_affine, order: int) -> np.ndarray:
        from scipy import ndimage

        m = np.linalg.inv(src_affine) @ dst_affine  # destination voxel -> source voxel
        return ndimage.affine_transform(np.asarray(data, np.float32), m[:3, :3], offset=m[:3, 3],
                                        output_shape=dst_shape, order=order, mode="constant", cval=0.0)

    def to_grid(self, v):
        from spmamba.io import Volume

        return Volume(self._resample(v.array, v.affine, self.shape, self.affine, 1), self.affine.copy(), v.path)

    def to_input(self, data, shape, affine, order: int = 1) -> np.ndarray:
        return self._resample(data, self.affine, tuple(shape), affine, order)


def _detect_all(det, test, header: "HeaderGrid | None" = None) -> tuple[list[dict], list[float], dict]:
    """Detect every test volume; heatmap, foreground and mask on the volume's own grid. Returns the cases, the
    seconds per detection and extras (alignment seconds per volume, volumes that failed to align)."""
    from spmamba.registration import AlignmentError

    cases, det_s, align_s, failed = [], [], [], []
    for sid, img, msk, lab, fam in test:
        v = _load(img)
        m = _load(msk).array
        t = time.perf_counter()
        try:
            if header is not None:
                g = header.to_grid(v)
                r = det.detect(g.array, g.affine)
                heat = header.to_input(r.heatmap, v.array.shape, v.affine, order=1)
                fg = header.to_input(r.foreground.astype(np.float32), v.array.shape, v.affine, order=0) > 0.5
                heat = np.where(fg, heat, np.float32(0.0))
            else:
                r = det.detect(v.array, v.affine)
                heat, fg = r.heatmap, r.foreground
        except AlignmentError as e:  # counted as a missed volume: empty map, lowest score
            print(f"  {sid}: alignment failed ({e})", flush=True)
            failed.append(sid)
            cases.append({"id": sid, "heatmap": np.zeros(m.shape, np.float32), "score": None, "mask": m,
                          "label": lab, "fg": v.array > 0, "spacing": _voxel_mm(v.affine), "family": fam,
                          "image": v.array})
            continue
        det_s.append(time.perf_counter() - t)
        if "align_s" in r.timings:
            align_s.append(r.timings["align_s"])
        cases.append({"id": sid, "heatmap": heat, "score": r.score, "mask": m, "label": lab, "fg": fg,
                      "spacing": _voxel_mm(v.affine), "family": fam, "image": v.array})
    lowest = min([c["score"] for c in cases if c["score"] is not None], default=0.0)
    for c in cases:
        if c["score"] is None:
            c["score"] = lowest
    extras = {"align_s_per_volume": float(np.mean(align_s)) if align_s else None,
              "align_s_max": float(np.max(align_s)) if align_s else None, "align_failed": failed}
    return cases, det_s, extras


def sade(cases) -> dict:
    """Spatial-MSMA's protocol (spmamba.metrics_sade, ``spmamba evaluate --protocol sade``) on the same maps: the
    normal test volumes (never trained on) set the thresholds at voxel FPR 0.05 and 0.10, the abnormal ones are
    scored lesion by lesion."""
    from spmamba.metrics_sade import sade_protocol

    r = sade_protocol(((c["id"], c["heatmap"], c["image"]) for c in cases if not c["label"]),
                      ((c["id"], c["heatmap"], c["image"], c["mask"], c["spacing"]) for c in cases if c["label"]))
    return {k: r[k] for k in ("n_normal_volumes", "thresholds", "at_fpr", "not_evaluated")}


def per_family(cases, pixel_threshold: float) -> dict:
    """Pixel AUROC / AP / best Dice of each lesion family's volumes pooled with all normal test volumes."""
    from spmamba.metrics import PixelMetricAccumulator

    out = {}
    normals = [c for c in cases if not c["label"]]
    for fam in sorted({c.get("family", "none") for c in cases} - {"none"}):
        pix = PixelMetricAccumulator()
        for c in [c for c in cases if c.get("family") == fam] + normals:
            pix.add(c["heatmap"], c["mask"], region=c["fg"])
        r = pix.compute()
        out[fam] = {k: r.get(k) for k in ("auroc", "ap", "best_dice")}
    return out


def _row_name(name: str, align: str, model: str | None = None) -> str:
    return name + ("" if align == "none" else f"+{align}") + (f"@{Path(model).stem}" if model else "")


def _data_info(data: Path) -> dict:
    poses = data / "poses.json"
    return {"unregistered": poses.exists()}


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
    align = args.align
    if align in ("affine", "deformable") and args.align_reference != "normals":
        align = f"{align}_{Path(args.align_reference).name.replace(':', '_')}"
    header = None
    if align == "header":  # benchmark-only: the scanner coordinates trusted, one RAS grid, no registration
        header = HeaderGrid([_load(p) for p in train], spacing=SPACING)
        print(f"[{name}] header grid {header.shape} at {SPACING:g} mm", flush=True)

    def load_train(i):
        v = _load(train[i])
        return header.to_grid(v) if header is not None else v

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

    _, val_idx = split_normals(len(train))
    models = list(args.models or ([args.model] if args.model else []))
    runs = []  # (row name, detector, train seconds, train loop seconds, model file)
    if models:  # models trained beforehand (e.g. `spmamba train --time-limit 17`, or snapshots of one training):
        for mf in models:  # evaluated as they are, recalibrated on the same held-out split with today's pipeline
            det = Detector.load(mf, device="cpu")
            if det.method_name != method:
                raise SystemExit(f"{mf} holds a {det.method_name} model, not {method} (row {name}); leave --methods "
                                 "out to name the row after the file's method")
            if args.no_fusion:  # the method's own (position-normalised) map, without the intensity |z| map
                det.intensity_stats = None
            det.calibration = calibrate(det, [load_train(i) for i in val_idx])
            train_s = float(det.meta["training"]["train_seconds"])
            mode = det.alignment.method if det.alignment is not None else ("header" if header is not None else "none")
            row = _row_name(name, mode, mf if len(models) > 1 or args.models else None)
            runs.append((row + ("+nofusion" if args.no_fusion else ""), det, train_s, train_s, mf))
    else:
        from spmamba.train import TrainingDataError

        t0 = time.perf_counter()
        vols = [load_train(i) for i in range(len(train))] if header is not None else [str(p) for p in train]
        try:
            det = train_detector(vols, method=method, config=cfg, epochs=args.epochs, device="cpu", seed=0,
                                 encoder_weights=weights, progress=progress, should_stop=stop,
                                 max_steps=args.max_steps,
                                 align=align.split("_")[0] if align.startswith(("affine", "deformable")) else "none",
                                 align_reference=args.align_reference)
        except (ValueError, TrainingDataError) as e:  # e.g. a method that needs one grid, given several
            print(f"[{name}] refused: {e}", flush=True)
            return [{"method": _row_name(name, align), "error": f"{type(e).__name__}: {e}", "align": align,
                     "n_test": len(test), **_data_info(data)}]
        train_s = time.perf_counter() - t0
        runs.append((_row_name(name, align), det, train_s,
                     t_loop.get("end", t0) - t_loop.get("start", t0), None))
    out = []
    for row, det, train_s, loop_s, mf in runs:
        info = det.meta["training"]
        print(f"[{row}] trained {train_s:.0f}s epochs {info['epochs']} samples {info['n_slices']}", flush=True)
        cases, det_s, extras = _detect_all(det, test, header)
        common = {"train_s": train_s, "train_loop_s": loop_s,
                  "epochs": info["epochs"], "n_train_slices": info["n_slices"], "final_loss": info["final_loss"],
                  "detect_s_per_volume": float(np.mean(det_s)) if det_s else None, "method_of_registry": method,
                  "config": dict(overrides), "encoder_weights": weights, "model_file": mf,
                  "encoder_norm": info.get("encoder_norm"), "teacher": det.meta.get("teacher"),
                  "train_steps": info.get("steps"), "align": align if mf is None else
                  (det.alignment.method if det.alignment is not None else align),
                  "train_alignment": info.get("alignment"), "n_test": len(test), **extras, **_data_info(data),
                  "heatmap_sigma_mm": det.preprocessing.heatmap_sigma_mm}
        thr = det.calibration.pixel_threshold
        out.append({"method": row, "pixel_threshold": thr, **common, **evaluate(cases, thr),
                    "per_family": per_family(cases, thr), "sade": sade(cases),
                    **({"notes": NOTES[name]} if name in NOTES else {})})
        if name != "spmamba" or models:
            continue
        # ablation without contrast/concentration terms: same maps, slice score = max(A) (on the volume grid)
        nt = []
        for c in cases:
            h = c["heatmap"]
            sl = h.reshape(-1, h.shape[2]).max(0)
            nt.append({**c, "score": aggregate_slice_scores(sl[sl > 0])})
        out.append({"method": _row_name("spmamba_no_score_terms", align), "pixel_threshold": thr, **common,
                    **evaluate(nt, thr)})
        if det.position_stats is not None or args.no_posnorm:  # already position-normalised (aligned models)
            continue
        # position-aware normalisation (Detector.fit_position_stats, as train_detector(position_normalise=True)
        # does): heatmaps z-scored against those of the training normals, recalibrated on the held-out ones
        t = time.perf_counter()
        train_idx, _ = split_normals(len(train))
        try:
            det.fit_position_stats([load_train(i) for i in train_idx])
        except ValueError as e:  # volumes on different grids: no per-position statistics
            print(f"[{row}] no position normalisation: {e}", flush=True)
            continue
        det.calibration = calibrate(det, [load_train(i) for i in val_idx])
        fit_s = time.perf_counter() - t
        pn, _, _ = _detect_all(det, test, header)
        out.append({"method": _row_name("spmamba_posnorm", align), "pixel_threshold": det.calibration.pixel_threshold,
                    **common, "posnorm_fit_s": fit_s, "train_s": train_s + fit_s,
                    **evaluate(pn, det.calibration.pixel_threshold),
                    "notes": "heatmap z-scored per voxel against SP-Mamba heatmaps of the 16 training normals; "
                             "top-50 mean"})
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


COLUMNS = [("img AUROC", ("image", "auroc"), 3), ("img AP", ("image", "ap"), 3), ("img F1max", ("image", "f1_max"), 3),
           ("px AUROC", ("pixel", "auroc"), 3), ("px AP", ("pixel", "ap"), 3), ("AUPRO", ("pixel", "aupro"), 3),
           ("best Dice", ("pixel", "best_dice"), 3), ("lesion TPR", ("lesion", "tpr"), 2),
           ("lesion PPV", ("lesion", "ppv"), 2), ("HD99 mm", ("lesion", "hd99_mm"), 1),
           ("MSD mm", ("lesion", "msd_mm"), 1), ("train s", ("train_s",), 0),
           ("detect s/vol", ("detect_s_per_volume",), 1), ("align s/vol", ("align_s_per_volume",), 1),
           ("peak MB", ("peak_rss_mb",), 0)]


#: ``--table --protocol sade``: the lesion protocol of Spatial-MSMA's code at its two voxel false-positive rates
SADE_COLUMNS = [(f"{name} @{fpr}", ("sade", "at_fpr", fpr, key), nd) for fpr in ("0.05", "0.1")
                for name, key, nd in (("TPR", "tpr", 2), ("PPV", "ppv", 2), ("Dice", "dice", 3),
                                      ("HD99 mm", "hd99_mm", 1), ("MSD mm", "msd_mm", 1))]


def _get(r, path):
    for k in path:
        r = r.get(k) if isinstance(r, dict) else None
    return r


def _rows(folder: Path) -> dict:
    order = METHODS + ["spmamba_no_score_terms", "spmamba_posnorm", "spmamba_imagenet", "memmc_mae",
                       "memmc_mae_no_memory", "memmc_mae_single_level"]
    found = {p.name[len("accuracy_"):-len(".json")]: json.loads(p.read_text()) for p in folder.glob("accuracy_*.json")}
    base = lambda m: m.split("+")[0].split("@")[0]  # noqa: E731
    rank = {m: i for i, m in enumerate(order)}
    keys = sorted(found, key=lambda m: (rank.get(base(m), len(order)), base(m),
                                        found[m].get("train_s") or 0.0, m))
    return {k: found[k] for k in keys}


def table(folders=None, protocol: str = "product") -> str:
    """The markdown table of the results in ``folders`` (default RESULTS). With several folders (e.g. one per data
    seed) each row present in all of them shows mean +- standard deviation over the folders, and n.
    ``protocol`` "sade": the columns of Spatial-MSMA's lesion protocol (rows measured without it show n/a)."""
    columns = SADE_COLUMNS if protocol == "sade" else COLUMNS
    folders = [Path(f) for f in (folders or [RESULTS])]
    per = [_rows(f) for f in folders]
    names = [m for m in per[0] if all(m in p for p in per[1:])]
    head = "| method | " + " | ".join(c for c, _, _ in columns) + (" | n |" if len(per) > 1 else " |")
    lines = [head, "|" + "---|" * (len(columns) + 1 + (len(per) > 1))]
    notes = []
    for m in names:
        errs = [p[m]["error"] for p in per if "error" in p[m]]
        if errs:
            notes.append(f"- {m}: {errs[0]}")
            lines.append(f"| {m} | " + " | ".join(["refused"] + ["n/a"] * (len(columns) - 1)) +
                         (f" | {len(per)} |" if len(per) > 1 else " |"))
            continue
        cells = []
        for _, path, nd in columns:
            vals = [_get(p[m], path) for p in per]
            vals = [float(v) for v in vals if v is not None and np.isfinite(float(v))]
            if not vals:
                cells.append("n/a")
            elif len(per) == 1:
                cells.append(_f(vals[0], nd))
            else:
                cells.append(f"{_f(float(np.mean(vals)), nd)} ± {_f(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, nd)}")
        lines.append(f"| {m} | " + " | ".join(cells) + (f" | {len(per)} |" if len(per) > 1 else " |"))
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    global RESULTS, SPACING
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench/data2mm")
    ap.add_argument("--make-data", action="store_true",
                    help="write --n-train normals + --n-test test 2 mm volumes (seed --seed) to --data first")
    ap.add_argument("--unregistered", action="store_true",
                    help="with --make-data: scanner-placed subjects, each on its own grid (make_dataset(unregistered))")
    ap.add_argument("--n-train", type=int, default=20, help="with --make-data: normal training volumes (20)")
    ap.add_argument("--n-test", type=int, default=30, help="with --make-data: test volumes, half abnormal (30)")
    ap.add_argument("--seed", type=int, default=0, help="with --make-data: the data seed (0)")
    ap.add_argument("--spacing", type=float, default=SPACING,
                    help="with --make-data: voxel size in mm (2; larger for smoke tests); also the --align header grid")
    ap.add_argument("--methods", nargs="*", default=None,
                    help=f"rows of VARIANTS to run (default {' '.join(METHODS)}; with --model: the file's method)")
    ap.add_argument("--one", help="run one method in this process (used internally)")
    ap.add_argument("--align", choices=("none", "affine", "deformable", "header"), default="none",
                    help="train_detector(align=...): none, affine or deformable (registration to the reference, maps "
                    "back on each input grid); header (benchmark only): every volume resampled by its affine onto "
                    "one RAS grid, no registration")
    ap.add_argument("--align-reference", default="normals",
                    help="with --align affine/deformable: train_detector(align_reference=...): normals (default), "
                    "mni152 or a file; rows +<align>_<reference> when not normals")
    ap.add_argument("--train-seconds", type=float, default=240.0, help="training-loop budget per method")
    ap.add_argument("--epochs", type=int, default=100, help="epoch cap (the time budget usually stops first)")
    ap.add_argument("--encoder-weights", default=None, help="torchvision ResNet34 .pth: adds spmamba_imagenet")
    ap.add_argument("--protocol", choices=("product", "sade"), default="product",
                    help="with --table: the product's metrics (default) or Spatial-MSMA's lesion protocol")
    ap.add_argument("--table", action="store_true",
                    help="print the table of --results; several folders (one per seed): mean +- sd")
    ap.add_argument("--no-posnorm", action="store_true",
                    help="skip the spmamba_posnorm row (position statistics + recalibration: one detection per "
                    "training volume)")
    ap.add_argument("--model", help="evaluate this trained model file (any method of the registry) instead of "
                    "training; without --methods the row is named after the file's method")
    ap.add_argument("--max-steps", type=int, default=None, metavar="N",
                    help="end each training after N optimisation steps (equal-step comparisons, e.g. ablations)")
    ap.add_argument("--no-fusion", action="store_true",
                    help="with --model/--models: evaluate the method's own map, without the intensity fusion the "
                    "model was trained with (rows ...+nofusion); recalibrated")
    ap.add_argument("--models", nargs="+", default=None,
                    help="evaluate several trained model files (e.g. snapshots of one training after 5, 10, 20, 40 "
                    "min) into one table: rows <method>@<file stem>; the learning curve")
    ap.add_argument("--results", nargs="+", default=[str(RESULTS)],
                    help="folder for the accuracy_<method>.json files (several only with --table)")
    args = ap.parse_args()
    RESULTS = Path(args.results[0])
    SPACING = float(args.spacing)
    if args.table:
        print(table(args.results, args.protocol))
        return
    if len(args.results) > 1:
        sys.exit("several --results folders only with --table")
    if args.one:
        run_one(args.one, args)
        return
    if args.make_data:
        from spmamba.data.synthetic import make_dataset
        t = time.time()
        print(make_dataset(args.data, n_train=args.n_train, n_test=args.n_test, seed=args.seed, spacing=SPACING,
                           progress=False, unregistered=args.unregistered), f"{time.time() - t:.0f} s",
              f"load {os.getloadavg()}", flush=True)
    methods = list(args.methods or METHODS)
    if (args.model or args.models) and args.methods is None:  # the row is the file's method
        from spmamba.checkpoint import load_checkpoint

        methods = [load_checkpoint(args.model or args.models[0]).get("method", "spmamba")]
    if args.encoder_weights:
        if not Path(args.encoder_weights).is_file():
            sys.exit(f"no encoder weights file {args.encoder_weights}")
        methods.append("spmamba_imagenet")
    for m in methods:
        cmd = [sys.executable, __file__, "--one", m, "--data", args.data, "--train-seconds", str(args.train_seconds),
               "--epochs", str(args.epochs), "--results", str(RESULTS), "--align", args.align,
               "--align-reference", args.align_reference, "--spacing", str(SPACING)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--models", *args.models] if args.models else []
        cmd += ["--encoder-weights", args.encoder_weights] if args.encoder_weights else []
        cmd += ["--no-posnorm"] if args.no_posnorm else []
        cmd += ["--no-fusion"] if args.no_fusion else []
        cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        print(">>", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    print(table())


if __name__ == "__main__":
    main()
