"""`spmamba train --align affine` and `spmamba detect` with a model that aligns its inputs."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from spmamba.cli import main


def test_train_with_alignment_and_detect_follows_the_model(tiny_data: Path, tmp_path, capsys):
    from spmamba.checkpoint import read_checkpoint_meta

    model = tmp_path / "aligned.pt"
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(model), "--config", "tiny",
               "--max-steps", "1", "--align", "affine", "--align-reference", "normals", "-q"])
    assert rc == 0, capsys.readouterr().err
    meta = read_checkpoint_meta(model)
    assert meta["alignment"]["method"] == "affine" and meta["alignment"]["reference"]["name"] == "normals"
    training = meta["meta"]["training"]
    assert training["alignment"]["reference"] == "normals" and training["position_normalise"] is True

    # inputs: the test images, one of them on another grid (flipped axes, shifted origin), and a blank volume
    images = sorted((tiny_data / "test" / "images").glob("*.nii.gz"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in images:
        (inputs / p.name).write_bytes(p.read_bytes())
    img = nib.load(images[0])
    flipped = np.asarray(img.dataobj)[::-1, :, ::-1].copy()
    aff = img.affine @ np.array([[-1, 0, 0, flipped.shape[0] - 1], [0, 1, 0, 0], [0, 0, -1, flipped.shape[2] - 1],
                                 [0, 0, 0, 1.0]])
    aff[:3, 3] += [5.0, -4.0, 3.0]
    nib.save(nib.Nifti1Image(flipped, aff), inputs / "flipped.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), inputs / "blank.nii.gz")

    out = tmp_path / "pred"
    rc = main(["detect", "--model", str(model), str(inputs), "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert rc == 2  # the blank volume is reported, never scored; the others are
    assert "blank.nii.gz: the volume is constant" in captured.err and "--align none" in captured.err
    assert "aligned to the model's normals reference" in captured.out
    report = json.loads((out / "detect.json").read_text())
    assert report["n_done"] == len(images) + 1 and report["n_failed"] == 1
    assert "blank.nii.gz" in report["failed"][0]["path"]
    assert report["alignment"]["reference"] == "normals"
    volumes = report["alignment"]["volumes"]
    assert set(volumes) == {p.name[:-7] for p in images} | {"flipped"}
    assert all(v["similarity"] >= report["alignment"]["metric_floor"] for v in volumes.values())
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "id,score,threshold,abnormal" and len(rows) == len(images) + 2
    assert not any(r.startswith("blank,") for r in rows)
    # heatmaps on each input's own grid: same shape and affine (the flipped one included)
    for name in ("flipped", images[0].name[:-7]):
        src = nib.load(inputs / f"{name}.nii.gz")
        heat = nib.load(out / f"{name}_anomaly.nii.gz")
        assert heat.shape == src.shape and np.allclose(heat.affine, src.affine, atol=1e-4)
        assert np.isfinite(np.asarray(heat.dataobj)).all()
    # the same anatomy on two grids gets (nearly) the same heatmap once mapped to one grid
    a = np.asarray(nib.load(out / f"{images[0].name[:-7]}_anomaly.nii.gz").dataobj)
    b = np.asarray(nib.load(out / "flipped_anomaly.nii.gz").dataobj)[::-1, :, ::-1]
    both = (a > 0) & (b > 0)
    assert b.shape == a.shape and both.sum() > 0.8 * max((a > 0).sum(), (b > 0).sum())
    assert np.corrcoef(a[both], b[both])[0, 1] > 0.9


def test_by_default_brains_are_aligned_to_mni152_at_their_voxel_size(tiny_data: Path, tmp_path, capsys):
    """No --align: the product's default (auto) registers brain normals to the MNI152 template (affine, then the
    deformable stage), on a grid of their own voxel size (6 mm here), and says so."""
    from spmamba.checkpoint import read_checkpoint_meta

    model = tmp_path / "default.pt"
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(model), "--config", "tiny",
               "--max-steps", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "aligned to the mni152 reference (deformable)" in captured.out
    meta = read_checkpoint_meta(model)
    assert meta["alignment"]["reference"]["name"] == "mni152" and meta["alignment"]["method"] == "deformable"
    assert meta["meta"]["training"]["alignment"]["method"] == "deformable"
    assert meta["meta"]["training"]["position_normalise"] is True
    spacing = np.sqrt((np.asarray(meta["alignment"]["reference"]["affine"]) ** 2)[:3, :3].sum(0))
    np.testing.assert_allclose(spacing, 6.0, atol=1e-3)


def test_align_options_are_checked(tiny_data: Path, tmp_path, capsys):
    base = ["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt"), "--config", "tiny",
            "--max-steps", "1", "-q"]
    rc = main(base + ["--align", "affine", "--align-reference", str(tmp_path / "missing.nii.gz")])
    assert rc == 2 and "--align-reference" in capsys.readouterr().err
    rc = main(base + ["--align-reference", "mni152"])
    assert rc == 2 and "needs --align affine" in capsys.readouterr().err
    rc = main(base + ["--intensity-search", "-1"])
    assert rc == 2 and "--intensity-search -1: a distance in mm" in capsys.readouterr().err
    rc = main(base + ["--fusion", "none", "--intensity-search", "4"])
    assert rc == 2 and "applies to the fused intensity map" in capsys.readouterr().err
    try:
        main(base + ["--align", "rigid"])
    except SystemExit as e:  # argparse: not one of the choices
        assert e.code == 2
    assert "invalid choice" in capsys.readouterr().err
