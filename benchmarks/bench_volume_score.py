"""Volume-score variants (issue 10) on the components ``bench_fusion.py`` cached: the fused map (geometric, the
default) on the reference grid of every held-out normal and test volume, then several volume scores, each judged by
image AUROC overall and per lesion family (each family's volumes against all normal test volumes).

Scores: ``top<k>``: mean of the k highest voxels (the product uses k = 50); ``mass``: the sum of the map above the
pixel threshold (calibrated on the held-out normals' voxels at 0.1 % FPR, as the product); ``maxcomp_mass`` /
``maxcomp_size``: the largest 26-connected component above that threshold, by its mass / its voxels.

    python benchmarks/bench_volume_score.py /tmp/fusion_cache_seed0 /tmp/fusion_cache_seed1 /tmp/fusion_cache_seed2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spmamba.baselines import topk_mean
from spmamba.scoring import calibrate_threshold, fuse_maps

TOP_K = (10, 25, 50, 100, 200, 400)


def load(cache: Path) -> list[dict]:
    out = []
    for f in sorted(cache.glob("*.npz")):
        x = np.load(f)
        h = fuse_maps(x["zm_ref"].astype(np.float32), x["zi_ref"].astype(np.float32), "geometric")
        out.append({"id": f.stem, "h": np.where(x["fg_ref"], h, 0).astype(np.float32),
                    "label": int(x["label"]) if "label" in x.files else 0,
                    "family": str(x["family"]) if "family" in x.files else "none"})
    return out


def volume_scores(h: np.ndarray, threshold: float) -> dict:
    s = {f"top{k}": topk_mean(h, k) for k in TOP_K}
    above = np.clip(h - threshold, 0, None)
    s["mass"] = float(above.sum())
    lab, n = ndimage.label(h > threshold, structure=np.ones((3, 3, 3)))
    if n:
        s["maxcomp_mass"] = float(np.max(ndimage.sum(above, lab, index=np.arange(1, n + 1))))
        s["maxcomp_size"] = float(np.bincount(lab.ravel())[1:].max())
    else:
        s["maxcomp_mass"] = s["maxcomp_size"] = 0.0
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("caches", nargs="+", type=Path, help="bench_fusion.py --cache folders (one per data seed)")
    for cache in ap.parse_args().caches:
        data = load(cache)
        held = [c for c in data if c["id"].startswith("heldout")]
        test = [c for c in data if c["id"].startswith("case")]
        thr = calibrate_threshold(np.concatenate([c["h"][c["h"] > 0] for c in held]), 0.001)
        scores = [volume_scores(c["h"], thr) for c in test]
        y = np.array([c["label"] for c in test])
        families = sorted({c["family"] for c in test if c["label"]})
        print(f"{cache}: pixel threshold {thr:.3f}")
        for name in scores[0]:
            v = np.array([s[name] for s in scores])
            line = f"  {name:13s} all {roc_auc_score(y, v):.3f} |"
            for fam in families:
                sel = np.array([c["label"] == 0 or c["family"] == fam for c in test])
                line += f" {fam[:4]} {roc_auc_score(y[sel], v[sel]):.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
