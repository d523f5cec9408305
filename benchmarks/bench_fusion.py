"""Intensity fusion ablation (issue 10): one trained model, its map alone, the intensity |z| map alone and their
fusions (``spmamba.scoring.fuse_maps``), all from the same detections.

For every held-out normal (calibration) and test volume, the two components are computed once with the product's
own calls (registration to the model's reference, ``Detector._model_maps``, 3-D smoothing, ``position_normalise``,
``Detector.intensity_zscores``) and cached: on the reference grid (for the volume score, top-50 mean as the Detector
does) and mapped back onto the volume's own grid (for the pixel and lesion metrics, as ``bench_accuracy.py``).
Each variant is then fused from the cached components, so every row sees the same registration and the same model.
Mapping the two components back separately and fusing afterwards differs a little from the Detector (which fuses,
then maps back); the product's own figures for the chosen fusion come from ``bench_accuracy.py --model``.

    python benchmarks/bench_fusion.py --model def20.pt --data /tmp/bench/unreg --cache /tmp/fusion_cache \\
        --out benchmarks/results/fusion_ablation/seed0.json

The model's position and intensity statistics are (re)fitted on its training normals (the ``train_detector`` split)
before the components are computed. Rows: ``model`` (the position-normalised map, the product before fusion),
``intensity`` (the |z| map: the voxel-wise baseline's map with the model's alignment and landmarks), and
``fused_<fusion>`` for each of ``scoring.FUSIONS``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy as ba  # noqa: E402  (the benchmark's data layout, metrics and per-family figures)


def cache_volumes(det, data: Path, cache: Path, components: Callable, back_dtype=np.float32) -> None:
    """For every held-out normal (calibration) and test volume of ``data`` not yet in ``cache``: register it to the
    model's reference, run the model and smooth its map as the Detector does, then ``components(heat, norm, fg,
    canon)`` -> {name: map (n, h, w) on the reference grid, slice-first}. Each map is saved as ``<name>_ref``
    (float16) and, mapped back onto the volume's own grid (0 outside its foreground), as ``<name>`` (``back_dtype``),
    with the volume's ``fg``, ``mask``, ``label``, ``family`` and voxel ``spacing`` (one ``<id>.npz`` per volume)."""
    from spmamba.preprocessing import prepare_slices
    from spmamba.scoring import smooth_within_mask
    from spmamba.train import split_normals

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
        heat = smooth_within_mask(heat, fg, prep.heatmap_sigma_mm / canon.spacing_slice_first(prep.slice_axis))
        comps = components(heat, norm, fg, canon)

        def back(x):
            return al.to_input(canon.to_file_order(np.moveaxis(x, 0, prep.slice_axis)))

        fg_in = back(fg)
        mask = ba._load(msk).array > 0 if msk is not None else np.zeros(v.array.shape, bool)
        arrays = {f"{k}_ref": c.astype(np.float16) for k, c in comps.items()}
        arrays.update({k: np.where(fg_in, back(c), 0).astype(back_dtype) for k, c in comps.items()})
        np.savez_compressed(out, fg=fg_in, mask=mask, label=lab, family=fam,
                            spacing=np.array(ba._voxel_mm(v.affine)), **arrays)
        print(f"[{n + 1}/{len(items)}] {sid}: {time.time() - t:.1f} s", flush=True)


def load_cache(cache: Path) -> list[dict]:
    """The cached volumes of ``cache_volumes``, each a dict of its arrays plus ``id``."""
    return [dict(np.load(f), id=f.stem) for f in sorted(cache.glob("*.npz"))]


def evaluate_cached(data: list, maps: Callable) -> tuple[dict, list]:
    """One row from cached volumes: ``maps(x, grid)`` gives volume ``x``'s map on its own grid (``grid=""``: pixel
    and lesion metrics) or on the reference grid (``grid="_ref"``: the volume score, top-50 mean as the Detector).
    The pixel threshold is calibrated on the held-out normals' voxels at 0.1 % FPR, as the product. Returns (row:
    image, pixel, lesion, pixel_threshold, per_family; the test cases as ``bench_accuracy.evaluate`` takes them)."""
    from spmamba.baselines import topk_mean
    from spmamba.detector import Detector
    from spmamba.scoring import calibrate_threshold

    held = [x for x in data if x["id"].startswith("heldout-")]
    thr = calibrate_threshold(np.concatenate([maps(x, "")[x["fg"]] for x in held]), 0.001)
    cases = [{"id": x["id"], "heatmap": maps(x, ""), "score": topk_mean(maps(x, "_ref"), Detector.POSITION_TOP_K),
              "mask": x["mask"], "label": int(x["label"]), "fg": x["fg"], "spacing": tuple(x["spacing"]),
              "family": str(x["family"])} for x in data if not x["id"].startswith("heldout-")]
    r = ba.evaluate(cases, thr)
    return ({"image": r["image"], "pixel": r["pixel"], "lesion": r["lesion"], "pixel_threshold": thr,
             "per_family": ba.per_family(cases, thr)}, cases)


def run(doc: str, model_help: str, cache_components: Callable, evaluate_variants: Callable) -> None:
    """The command line of a cached-components ablation: --model, --data, --cache, --out; caches, evaluates, writes
    the rows (JSON, atomically) with the time taken and the load average."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=model_help)
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


def cache_components(model: str, data: Path, cache: Path) -> None:
    from spmamba.baselines import position_normalise
    from spmamba.detector import Detector
    from spmamba.train import split_normals

    cache.mkdir(parents=True, exist_ok=True)
    train, _ = ba._dataset(data)
    train_idx, _ = split_normals(len(train))
    fitted = cache / "model_fitted.pt"
    if fitted.exists():
        det = Detector.load(fitted, device="cpu")
    else:
        det = Detector.load(model, device="cpu")
        if det.alignment is None:
            sys.exit(f"{model}: the fusion ablation needs a model that aligns its inputs (position statistics)")
        t = time.time()
        det.fit_position_stats([ba._load(train[i]) for i in train_idx], fusion="geometric")
        det.save(fitted)
        print(f"statistics fitted on {len(train_idx)} normals in {time.time() - t:.0f} s", flush=True)

    def components(heat, norm, fg, canon):
        return {"zm": position_normalise(heat, det.position_stats, fg), "zi": det.intensity_zscores(norm, fg, canon)}

    cache_volumes(det, data, cache, components)


def evaluate_variants(cache: Path) -> dict:
    from spmamba.scoring import FUSIONS, fuse_maps

    variants = {"model": lambda m, i: m, "intensity": lambda m, i: i}
    variants.update({f"fused_{f}": (lambda f: lambda m, i: fuse_maps(m, i, f))(f) for f in FUSIONS})
    data = load_cache(cache)
    rows = {}
    for name, fn in variants.items():
        rows[name], _ = evaluate_cached(data, lambda x, grid, fn=fn: fn(x["zm" + grid].astype(np.float32),
                                                                         x["zi" + grid].astype(np.float32)))
        p, i, le = rows[name]["pixel"], rows[name]["image"], rows[name]["lesion"]
        print(f"{name:16s} img AUROC {i['auroc']:.3f}  px AUROC {p['auroc']:.3f}  AP {p['ap']:.3f}  "
              f"best Dice {p['best_dice']:.3f}  lesion TPR {le['tpr']:.2f} PPV {le['ppv']:.2f}  | " +
              "  ".join(f"{k} {v['ap']:.3f}/{v['best_dice']:.3f}" for k, v in rows[name]["per_family"].items()),
              flush=True)
    return rows


def main() -> None:
    run(__doc__, "a trained model file that aligns its inputs", cache_components, evaluate_variants)


if __name__ == "__main__":
    main()
