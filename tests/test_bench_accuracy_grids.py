"""benchmarks/bench_accuracy.py on volumes that do not share one grid (issue 10): metrics pool each volume on its
own grid, the header-grid resampling goes there and back, and the table aggregates several result folders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "bench_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(i, shape, label, rng):
    mask = np.zeros(shape, np.uint8)
    if label:
        mask[4:7, 5:8, 3:6] = 1
    heat = rng.uniform(0, 1, shape).astype(np.float32) + 3.0 * mask
    return {"id": f"c{i}", "heatmap": heat, "score": float(heat.max()), "mask": mask, "label": label,
            "fg": np.ones(shape, bool), "spacing": (2.0, 2.0, 2.0), "family": "tumour" if label else "none",
            "image": np.pad(np.ones(tuple(n - 2 for n in shape), np.float32), 1)}


def test_evaluate_volumes_of_different_shapes(bench):
    rng = np.random.default_rng(0)
    cases = [_case(0, (12, 14, 10), 1, rng), _case(1, (15, 11, 13), 0, rng), _case(2, (10, 16, 12), 1, rng),
             _case(3, (13, 13, 9), 0, rng)]
    r = bench.evaluate(cases, pixel_threshold=2.0)
    assert r["pixel"]["auroc"] == pytest.approx(1.0)  # every lesion voxel scores above every other voxel
    assert r["pixel"]["best_dice"] == pytest.approx(1.0)
    assert r["image"]["auroc"] == pytest.approx(1.0)
    assert r["lesion"]["tpr"] == pytest.approx(1.0)
    fam = bench.per_family(cases, 2.0)
    assert set(fam) == {"tumour"} and fam["tumour"]["auroc"] == pytest.approx(1.0)


def test_header_grid_round_trip(bench):
    from spmamba.io import Volume

    rng = np.random.default_rng(1)
    a = rng.uniform(1, 2, (10, 12, 9)).astype(np.float32)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = [-10, -20, 4]
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])  # another voxel order: the same brain stored L-P-S
    lps[:3, 3] = [8, 2, 4]
    va, vb = Volume(a, ras, None), Volume(a[::-1, ::-1].copy(), lps, None)
    grid = bench.HeaderGrid([va, vb], spacing=2.0)
    for v in (va, vb):
        g = grid.to_grid(v)
        assert g.array.shape == grid.shape
        back = grid.to_input(g.array, v.array.shape, v.affine)
        np.testing.assert_allclose(back, v.array, atol=1e-5)
    # the same world point has the same value on the common grid, whichever voxel order the file had
    ga, gb = grid.to_grid(va).array, grid.to_grid(vb).array
    assert (ga > 0).sum() >= a.size
    np.testing.assert_allclose(ga, gb, atol=1e-5)
    shifted = np.array(ras)
    shifted[:3, 3] += [6.0, 0.0, 0.0]  # moved 6 mm in x: the common grid sees it 3 voxels further
    gs = grid.to_grid(Volume(a, shifted, None)).array
    np.testing.assert_allclose(np.roll(ga, 3, axis=0)[3:], gs[3:], atol=1e-5)


def test_table_mean_and_spread(bench, tmp_path):
    for k, auc in enumerate((0.8, 0.9, 1.0)):
        d = tmp_path / f"s{k}"
        d.mkdir()
        row = {"method": "voxelwise+affine", "image": {"auroc": auc}, "pixel": {"auroc": 0.5}, "lesion": {},
               "train_s": 10.0}
        (d / "accuracy_voxelwise+affine.json").write_text(json.dumps(row))
    out = bench.table([tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"])
    line = [l for l in out.splitlines() if l.startswith("| voxelwise+affine")][0]
    assert "0.900 ± 0.100" in line and line.endswith("| 3 |")


def test_sade_protocol_rows_and_table(bench, tmp_path):
    """Every row also carries Spatial-MSMA's lesion protocol: the normal test volumes set the thresholds, the
    abnormal ones are scored; the lesion (3 above every normal value) is found at both voxel FPRs."""
    rng = np.random.default_rng(1)
    shape = (14, 14, 12)
    cases = [_case(i, shape, i % 2, rng) for i in range(6)]
    r = bench.sade(cases)
    assert r["n_normal_volumes"] == 3 and set(r["at_fpr"]) == {"0.05", "0.1"}
    for s in r["at_fpr"].values():
        assert s["n_volumes"] == 3 and s["tpr"] == pytest.approx(1.0)
        assert 0.0 <= s["hd99_mm"] <= 4.0  # surface to surface: the dilated prediction's is a voxel outside
    row = {"method": "m", "image": {}, "pixel": {}, "lesion": {}, "sade": r}
    (tmp_path / "accuracy_m.json").write_text(json.dumps(row))
    out = bench.table([tmp_path], protocol="sade")
    assert "TPR @0.05" in out.splitlines()[0]
    assert [l for l in out.splitlines() if l.startswith("| m |")][0].startswith("| m | 1.00 |")
