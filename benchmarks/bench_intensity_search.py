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

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fusion as bf  # noqa: E402  (the cached-components loop, its evaluation and command line)

MODEL_RADII = (0, 1)
INTENSITY_RADII = (0, 1, 2)


def cache_components(model: str, data: Path, cache: Path) -> None:
    from spmamba.baselines import position_normalise, zscore_heatmap
    from spmamba.detector import Detector

    cache.mkdir(parents=True, exist_ok=True)
    det = Detector.load(model, device="cpu")
    if det.alignment is None or det.intensity_stats is None:
        sys.exit(f"{model}: the search ablation needs a model that aligns and fuses intensities")

    def components(heat, norm, fg, canon):
        spacing = canon.spacing_slice_first(det.preprocessing.slice_axis)
        sigma = [det.INTENSITY_SMOOTH_MM / float(s) for s in spacing]
        comps = {f"zm{r}": position_normalise(heat, det.position_stats, fg, search=r) for r in MODEL_RADII}
        comps.update({f"zi{r}": zscore_heatmap(norm, fg, det.intensity_stats, sigma, search=r)
                      for r in INTENSITY_RADII})
        return comps

    bf.cache_volumes(det, data, cache, components, back_dtype=np.float16)


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

    data = bf.load_cache(cache)
    rows = {}
    for name, fn in _variants().items():
        row, cases = bf.evaluate_cached(data, fn)
        fams = row["per_family"]
        img_family = {}  # each family's volumes against all normal test volumes
        for fam in fams:
            sel = [c for c in cases if c["label"] == 0 or c["family"] == fam]
            img_family[fam] = float(roc_auc_score([c["label"] for c in sel], [c["score"] for c in sel]))
        rows[name] = {**row, "image_auroc_per_family": img_family}
        p, i = row["pixel"], row["image"]
        print(f"{name:14s} img AUROC {i['auroc']:.3f}  px AUROC {p['auroc']:.3f}  AP {p['ap']:.3f}  "
              f"best Dice {p['best_dice']:.3f} | " + "  ".join(
                  f"{k} {img_family[k]:.2f}/{v['ap']:.3f}" for k, v in fams.items()), flush=True)
    return rows


def main() -> None:
    bf.run(__doc__, "a trained model file that aligns and fuses intensities", cache_components, evaluate_variants)


if __name__ == "__main__":
    main()
