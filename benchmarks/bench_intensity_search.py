"""Local-search ablation (issue 10): the intensity |z| map with each voxel compared to the normals within a box of
R voxels around it (``baselines.search_zscore``; R = 0 is the plain |z|), alone and fused with the model's
position-normalised map (geometric), and the model's map searched the same way; all from one detection per volume.

For every held-out normal (calibration) and test volume the model's map and the standardised intensities are
computed once with the product's own calls (registration to the model's reference, ``Detector._model_maps``, 3-D
smoothing, ``position_normalise`` / ``zscore_heatmap`` with the model's intensity statistics) and cached for each R:
on the reference grid (volume score: top-50 mean, as the Detector) and mapped back onto the volume's own grid (pixel
and lesion metrics, as ``bench_accuracy.py``). Thresholds: 0.1 % voxel FPR on the held-out normals, per row.

    python benchmarks/bench_intensity_search.py --model def20.pt --data /tmp/bench/unreg --cache /tmp/search_cache \\
        --out benchmarks/results/intensity_search/seed0.json

Rows: ``intensity_rR`` (the voxel-wise baseline's map with the model's alignment), ``fused_rM_rR`` (the model's map
searched over M voxels, fused with ``intensity_rR``; M = 0 and R = 2 is the product's default at 2 mm), ``model_rM``.
The model's own search setting is not used: every R is computed here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402  (the benchmark's data layout, metrics and per-family figures)

MODEL_RADII = (0, 1)
INTENSITY_RADII = (0, 1, 2)


def cache_components(model: str, data: Path, cache: Path) -> None:
    from spmamba.baselines import position_normalise, zscore_heatmap
    from spmamba.detector import Detector
    from spmamba.preprocessing import prepare_slices
    from spmamba.scoring import smooth_within_mask
    from spmamba.train import split_normals

    cache.mkdir(parents=True, exist_ok=True)
    det = Detector.load(model, device="cpu")
    if det.alignment is None or det.intensity_stats is None:
        sys.exit(f"{model}: the search ablation needs a model that aligns and fuses intensities")
    train, test = ba._dataset(data)
    _, val_idx = split_normals(len(train))
    prep = det.preprocessing
    items = [(f"heldout-{i}", train[i], None, 0, "none") for i in val_idx] + list(test)
    for n, (sid, img, msk, lab, fam) in enumerate(items):
        out = cache / f"{sid}.npz"
        if out.exists():
            continue
        t = time.time()
        v = ba._load(img)
        al = det.alignment.align(v.array, v.affine, name=sid)
        norm, fg, keep, canon = prepare_slices(al.array, al.affine, prep)
        heat, _, _ = det._model_maps(norm, fg, keep, canon, None)
        spacing = canon.spacing_slice_first(prep.slice_axis)
        heat = smooth_within_mask(heat, fg, prep.heatmap_sigma_mm / spacing)
        comps = {f"zm{r}": position_normalise(heat, det.position_stats, fg, search=r) for r in MODEL_RADII}
        sigma = [det.INTENSITY_SMOOTH_MM / float(s) for s in spacing]
        comps.update({f"zi{r}": zscore_heatmap(norm, fg, det.intensity_stats, sigma, search=r)
                      for r in INTENSITY_RADII})

        def back(x):
            return al.to_input(canon.to_file_order(np.moveaxis(x, 0, prep.slice_axis)))

        fg_in = back(fg)
        mask = ba._load(msk).array > 0 if msk is not None else np.zeros(v.array.shape, bool)
        arrays = {f"{k}_ref": c.astype(np.float16) for k, c in comps.items()}
        arrays.update({k: np.where(fg_in, back(c), 0).astype(np.float16) for k, c in comps.items()})
        np.savez_compressed(out, fg=fg_in, mask=mask, label=lab, family=fam,
                            spacing=np.array(ba._voxel_mm(v.affine)), sp_ref=np.array(spacing), **arrays)
        print(f"[{n + 1}/{len(items)}] {sid}: {time.time() - t:.1f} s", flush=True)


def _variants() -> dict:
    from spmamba.scoring import fuse_maps

    def get(key):
        return lambda x, grid: x[key + grid].astype(np.float32)

    rows = {f"intensity_r{r}": get(f"zi{r}") for r in INTENSITY_RADII}
    for r in INTENSITY_RADII:
        for m in MODEL_RADII:
            rows[f"fused_r{m}_r{r}"] = (lambda m, r: lambda x, grid: fuse_maps(
                get(f"zm{m}")(x, grid), get(f"zi{r}")(x, grid), "geometric"))(m, r)
    rows.update({f"model_r{m}": get(f"zm{m}") for m in MODEL_RADII})
    return rows


def evaluate_variants(cache: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    from spmamba.baselines import topk_mean
    from spmamba.detector import Detector
    from spmamba.scoring import calibrate_threshold

    data = [dict(np.load(f), id=f.stem) for f in sorted(cache.glob("*.npz"))]
    held = [x for x in data if x["id"].startswith("heldout-")]
    rows = {}
    for name, fn in _variants().items():
        thr = calibrate_threshold(np.concatenate([fn(x, "")[x["fg"]] for x in held]), 0.001)
        cases = [{"id": x["id"], "heatmap": fn(x, ""), "score": topk_mean(fn(x, "_ref"), Detector.POSITION_TOP_K),
                  "mask": x["mask"], "label": int(x["label"]), "fg": x["fg"], "spacing": tuple(x["spacing"]),
                  "family": str(x["family"])} for x in data if not x["id"].startswith("heldout-")]
        r = ba.evaluate(cases, thr)
        fams = ba.per_family(cases, thr)
        img_family = {}  # each family's volumes against all normal test volumes
        for fam in fams:
            sel = [c for c in cases if c["label"] == 0 or c["family"] == fam]
            img_family[fam] = float(roc_auc_score([c["label"] for c in sel], [c["score"] for c in sel]))
        rows[name] = {"image": r["image"], "pixel": r["pixel"], "lesion": r["lesion"], "pixel_threshold": thr,
                      "per_family": fams, "image_auroc_per_family": img_family}
        p, i = r["pixel"], r["image"]
        print(f"{name:14s} img AUROC {i['auroc']:.3f}  px AUROC {p['auroc']:.3f}  AP {p['ap']:.3f}  "
              f"best Dice {p['best_dice']:.3f} | " + "  ".join(
                  f"{k} {img_family[k]:.2f}/{v['ap']:.3f}" for k, v in fams.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model file that aligns and fuses intensities")
    ap.add_argument("--data", required=True, type=Path, help="a bench_accuracy data folder (train/, test/)")
    ap.add_argument("--cache", required=True, type=Path, help="folder for the cached components (reused)")
    ap.add_argument("--out", type=Path, help="JSON file for the rows")
    args = ap.parse_args()
    t = time.time()
    cache_components(args.model, args.data, args.cache)
    rows = evaluate_variants(args.cache)
    if args.out:
        from spmamba.atomic import write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"model": os.path.abspath(args.model), "data": str(args.data), "rows": rows,
                              "seconds": time.time() - t, "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
