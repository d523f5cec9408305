"""Affine alignment (spmamba.registration): seconds per volume and recovered-transform error on 2 mm brain volumes.

    python benchmarks/bench_align.py [--n 6] [--spacing 2] [--threads 2] [--voxelwise 8 8] [--out results.json]

Two kinds of inputs, both aligned to the MNI152 reference (``mni152_reference(spacing)``):

1. ``known pose``: the reference itself seen through a random pose (rotation up to 15 degrees about a random axis,
   shift up to 10 mm, scale 0.9-1.1 per axis) on another grid (3 mm, L-P-S axes) with noise: exact ground truth.
2. ``phantom``: normal phantoms from ``spmamba.data.synthetic`` (their own contrast, bias field, noise, pose within
   4 degrees / 3 mm / 5 % and a 1-3 mm non-linear warp). The affine part of their pose is re-drawn here from the
   generator's seeded random stream (this follows synthetic.py's order of draws; the non-linear warp is not part
   of it, so a perfect affine registration still shows about the warp's size as "error").

Error = distance in mm between where the recovered and the true transform put each reference brain voxel (mean and
maximum over the brain). ``--voxelwise NTRAIN NTEST`` also runs the voxel-wise baseline (``spmamba.baselines``) on
phantoms with and without alignment (test heatmaps mapped back onto the input grid) and reports pixel AUROC / AP
inside the brain and image AUROC: whether alignment helps a method that compares voxels by position.

The machine is shared: the script prints ``os.getloadavg()`` beside the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _errors(ref, est, truth):
    ijk = np.argwhere(ref.foreground()).T
    pts = ref.affine[:3, :3] @ ijk + ref.affine[:3, 3:4]
    d = np.linalg.norm(est[:3, :3] @ pts + est[:3, 3:4] - truth[:3, :3] @ pts - truth[:3, 3:4], axis=0)
    return float(d.mean()), float(d.max())


def known_pose_inputs(ref, n, rng):
    import SimpleITK as sitk

    from spmamba.registration import from_sitk, to_sitk

    c = ref.affine[:3, :3] @ (np.array(ref.shape) / 2) + ref.affine[:3, 3]
    extent = np.abs(ref.affine[:3, :3] @ np.array(ref.shape))
    spacing = 3.0
    shape = tuple(int(np.ceil(e * 1.25 / spacing)) for e in extent)
    aff = np.diag([-spacing, -spacing, spacing, 1.0])
    aff[:3, 3] = c - aff[:3, :3] @ (np.array(shape) / 2)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n):
        lin = _rotation(rng.normal(size=3), rng.uniform(-15, 15)) @ np.diag(rng.uniform(0.9, 1.1, size=3))
        q = np.eye(4)
        q[:3, :3] = lin
        q[:3, 3] = c + rng.uniform(-10, 10, size=3) - lin @ c
        inv = flip @ np.linalg.inv(q) @ flip
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(inv[:3, :3].ravel().tolist())
        tx.SetTranslation(inv[:3, 3].tolist())
        out = sitk.Resample(to_sitk(ref.array * 800.0, ref.affine), to_sitk(np.zeros(shape, np.float32), aff), tx,
                            sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        arr, _ = from_sitk(out)
        arr = arr + rng.normal(0, 8, arr.shape).astype(np.float32) * (arr > 0)
        yield f"pose-{i}", arr, aff, q


def phantom_pose(seed, role, index, spacing):
    """The affine part of a phantom's pose as a map of template (reference) RAS points to phantom RAS points,
    re-drawn from the generator's seeded stream (see synthetic.make_subject / _warp_coordinates)."""
    from spmamba.data import synthetic as syn

    rng = syn._rng(seed, role, index)
    rng.integers(2 ** 63)  # the lesion stream's seed
    anat = np.random.default_rng(rng.integers(2 ** 63))
    rot = syn._rotation(anat, 4.0)
    scale = np.diag(anat.uniform(0.95, 1.05, size=3))
    shift = anat.uniform(-3.0, 3.0, size=3)
    m = rot @ scale  # phantom point p samples the template at m (p - c) + c + shift
    c = syn._cached_grid(spacing).mean(axis=1).astype(np.float64)
    minv = np.linalg.inv(m)
    t = np.eye(4)
    t[:3, :3] = minv
    t[:3, 3] = c - minv @ (c + shift)
    return t


def run_alignment(args):
    from spmamba.data.synthetic import make_subject
    from spmamba.registration import AffineAligner, mni152_reference

    t = time.perf_counter()
    ref = mni152_reference(args.spacing)
    t_ref = time.perf_counter() - t
    aligner = AffineAligner(ref)
    rows = []
    rng = np.random.default_rng(0)
    cases = list(known_pose_inputs(ref, args.n, rng))
    for i in range(args.n):
        s = make_subject(0, i, spacing=args.spacing, role="train")
        cases.append((f"phantom-{i}", s.image, s.affine, phantom_pose(0, "train", i, args.spacing)))
    for name, arr, aff, truth in cases:
        load = os.getloadavg()[0]
        al = aligner.align(arr, aff, name=name, check_floor=False)
        mean, mx = _errors(ref, al.matrix_ras, truth)
        mean0, _ = _errors(ref, np.eye(4), truth)
        rows.append({"case": name, "shape": list(arr.shape), "seconds": round(al.seconds, 3),
                     "load_1min": round(load, 2), "similarity": round(al.similarity, 4),
                     "error_mean_mm": round(mean, 3), "error_max_mm": round(mx, 3),
                     "error_unaligned_mean_mm": round(mean0, 3)})
        print(f"{name:11s} {tuple(arr.shape)} {al.seconds:5.2f} s  similarity {al.similarity:.3f}  error mean "
              f"{mean:.2f} max {mx:.2f} mm (unaligned {mean0:.2f})  load {load:.2f}", flush=True)
    return {"reference": "mni152", "reference_shape": list(ref.shape), "reference_seconds": round(t_ref, 2),
            "cases": rows}


def run_voxelwise(args):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from spmamba.baselines import VoxelwiseBaseline
    from spmamba.data.synthetic import LESION_FAMILIES, make_subject
    from spmamba.registration import AffineAligner, mni152_reference

    n_train, n_test = args.voxelwise
    ref = mni152_reference(args.spacing)
    aligner = AffineAligner(ref)
    train = [make_subject(1, i, spacing=args.spacing, role="train") for i in range(n_train)]
    test = [make_subject(1, i, abnormal=bool(i % 2), family=LESION_FAMILIES[(i // 2) % 4], spacing=args.spacing,
                         role="test") for i in range(n_test)]
    out = {}
    for mode in ("none", "affine"):
        t0 = time.perf_counter()
        if mode == "none":
            base = VoxelwiseBaseline().fit([s.image for s in train])
        else:
            base = VoxelwiseBaseline().fit([aligner.align(s.image, s.affine, check_floor=False).array for s in train])
        labels, values, weights, scores, abnormal = [], [], [], [], []
        for s in test:
            if mode == "none":
                heat, score = base.detect(s.image)
            else:
                al = aligner.align(s.image, s.affine, check_floor=False)
                h_ref, score = base.detect(al.array)
                heat = al.to_input(h_ref)
            brain = s.image > 0
            labels.append(s.mask[brain].astype(bool))
            values.append(heat[brain])
            scores.append(score)
            abnormal.append(s.abnormal)
        y, v = np.concatenate(labels), np.concatenate(values)
        out[mode] = {"pixel_auroc": round(float(roc_auc_score(y, v)), 4),
                     "pixel_ap": round(float(average_precision_score(y, v)), 4),
                     "image_auroc": round(float(roc_auc_score(abnormal, scores)), 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"voxel-wise baseline, align {mode:6s}: {out[mode]}", flush=True)
    return {"n_train": n_train, "n_test": n_test, "seed": 1, **out}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=6, help="inputs of each kind (default 6)")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2, help="SimpleITK threads (default 2)")
    p.add_argument("--voxelwise", type=int, nargs=2, default=None, metavar=("NTRAIN", "NTEST"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "sitk_threads": args.threads,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "spacing": args.spacing,
              "load_start": [round(x, 2) for x in os.getloadavg()]}
    result["alignment"] = run_alignment(args)
    for kind in ("pose", "phantom"):
        rows = [r for r in result["alignment"]["cases"] if r["case"].startswith(kind)]
        if rows:
            result["alignment"][f"{kind}_summary"] = {
                "seconds_mean": round(float(np.mean([r["seconds"] for r in rows])), 3),
                "seconds_max": round(float(np.max([r["seconds"] for r in rows])), 3),
                "error_mean_mm": round(float(np.mean([r["error_mean_mm"] for r in rows])), 3),
                "error_max_mm": round(float(np.max([r["error_max_mm"] for r in rows])), 3),
                "similarity_min": round(float(np.min([r["similarity"] for r in rows])), 4)}
            print(kind, result["alignment"][f"{kind}_summary"])
    if args.voxelwise:
        result["voxelwise"] = run_voxelwise(args)
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "alignment"}, indent=2))


if __name__ == "__main__":
    main()
