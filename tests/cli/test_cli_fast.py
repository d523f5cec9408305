"""CLI behaviour that needs no trained model: synth, evaluate on a hand-made case, and refusals of bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spmamba.cli import main
from spmamba.io import volume_id


def _save(arr, path, spacing=2.0):
    aff = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(arr), aff), str(path))


def test_help_and_version():
    r = subprocess.run([sys.executable, "-m", "spmamba", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("synth", "train", "detect", "evaluate", "serve", "demo"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "spmamba", "detect", "--help"], capture_output=True, text=True)
    assert "--model" in r.stdout and "--png" in r.stdout


def test_volume_id():
    assert volume_id("a/b/case-01.nii.gz") == "case-01"
    assert volume_id("x.NRRD") == "x"
    assert volume_id("y.nii") == "y"


def test_synth_layout(tiny_data: Path):
    train = sorted(p.name for p in (tiny_data / "train").iterdir())
    assert train == [f"normal-{i:04d}.nii.gz" for i in range(4)]
    rows = list(csv.DictReader(open(tiny_data / "test" / "labels.csv")))
    assert [r["id"] for r in rows] == [f"case-{i:04d}" for i in range(4)]
    assert sum(int(r["abnormal"]) for r in rows) == 2
    assert {r["family"] for r in rows if r["abnormal"] == "1"} == {"tumour", "haemorrhage"}
    for r in rows:
        img = nib.load(tiny_data / "test" / "images" / f"{r['id']}.nii.gz")
        msk = nib.load(tiny_data / "test" / "masks" / f"{r['id']}.nii.gz")
        assert img.shape == msk.shape and np.allclose(img.affine, msk.affine)
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 6.0)


@pytest.mark.parametrize("args, needle", [
    (["--families", "wart"], "unknown wart"),
    (["--spacing", "20"], "--spacing 20"),
    (["--n-test", "-1"], "must be >= 0"),
])
def test_synth_refuses_bad_arguments(tmp_path, capsys, args, needle):
    rc = main(["synth", str(tmp_path / "x"), "-q"] + args)
    assert rc == 2
    assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# evaluate on a hand-made case with known answers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def handmade(tmp_path: Path) -> dict:
    """4 volumes of 8^3 voxels (2 mm): a, b abnormal (one 2^3 lesion each, heatmap = exactly the lesion),
    c normal (clean heatmap), d normal with one hot voxel. Scores: a .9, b .3, c .1, d .5."""
    pred, masks = tmp_path / "pred", tmp_path / "masks"
    pred.mkdir()
    masks.mkdir()
    shape = (8, 8, 8)
    lesions = {"a": (slice(1, 3),) * 3, "b": (slice(5, 7),) * 3}
    scores = {"a": 0.9, "b": 0.3, "c": 0.1, "d": 0.5}
    for sid in scores:
        m = np.zeros(shape, np.uint8)
        if sid in lesions:
            m[lesions[sid]] = 1
        h = m.astype(np.float32)
        if sid == "d":
            h[4, 0, 0] = 1.0
        _save(m, masks / f"{sid}.nii.gz")
        _save(h, pred / f"{sid}_anomaly.nii.gz")
    with open(pred / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "score", "threshold", "abnormal"])
        for sid, s in scores.items():
            w.writerow([sid, s, 0.4, int(s > 0.4)])
    (pred / "detect.json").write_text(json.dumps({"pixel_threshold": 0.5, "version": "test"}))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,abnormal\na,1\nb,1\nc,0\nd,0\n")
    return {"pred": pred, "masks": masks, "labels": labels}


def test_evaluate_known_answers(handmade, capsys):
    rc = main(["evaluate", "--pred", str(handmade["pred"]), "--masks", str(handmade["masks"]),
               "--labels", str(handmade["labels"]), "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "lesion-wise TPR" in out and "HD99" in out
    res = json.loads((handmade["pred"] / "metrics.json").read_text())
    assert res["n_volumes"] == 4 and res["n_abnormal"] == 2
    # image: positive scores {.9, .3}, negative {.1, .5}: 3 of 4 pairs ordered -> 0.75
    assert res["image"]["auroc"] == pytest.approx(0.75)
    op = res["image"]["at_model_threshold"]  # threshold 0.4: a, d flagged
    assert op["sensitivity"] == pytest.approx(0.5) and op["specificity"] == pytest.approx(0.5)
    # pixel: 16 lesion voxels at 1; 2032 normal voxels at 0 except one at 1 (a tie counts 1/2)
    n_neg = 4 * 512 - 16
    assert res["pixel"]["exact"] is True
    assert res["pixel"]["auroc"] == pytest.approx((n_neg - 1 + 0.5) / n_neg)
    assert res["pixel"]["best_dice"] == pytest.approx(32 / 33)
    fpr1 = 1 / n_neg  # both regions fully found at FPR 1/2032
    assert res["pixel"]["aupro"] == pytest.approx((0.5 * fpr1 + (0.3 - fpr1)) / 0.3)
    # lesion level at the model's pixel threshold (0.5, from detect.json)
    le = res["lesion"]
    assert le["threshold"] == pytest.approx(0.5) and "model" in le["threshold_source"]
    assert le["tpr"] == pytest.approx(1.0)
    assert le["ppv"] == pytest.approx(2 / 3)  # predicted regions: a, b (true), d's hot voxel (false)
    assert le["hd99_mm"] == pytest.approx(0.0) and le["msd_mm"] == pytest.approx(0.0)
    assert len(res["per_volume"]) == 4


def test_evaluate_without_labels_and_with_threshold(handmade, tmp_path, capsys):
    js = tmp_path / "m.json"
    rc = main(["evaluate", "--pred", str(handmade["pred"]), "--masks", str(handmade["masks"]),
               "--threshold", "2", "--json", str(js), "-q"])
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["n_abnormal"] == 2  # derived from the masks
    assert res["lesion"]["tpr"] == 0.0 and res["lesion"]["n_abnormal_with_empty_prediction"] == 2


def test_evaluate_json_to_stdout(handmade, capsys):
    rc = main(["evaluate", "--pred", str(handmade["pred"]), "--masks", str(handmade["masks"]), "--json", "-", "-q"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["image"]["auroc"] == pytest.approx(0.75)


def test_evaluate_refusals(handmade, tmp_path, capsys):
    pred, masks = handmade["pred"], handmade["masks"]
    rc = main(["evaluate", "--pred", str(tmp_path / "nope"), "--masks", str(masks), "-q"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    # a mask on another grid
    _save(np.zeros((9, 8, 8), np.uint8), masks / "b.nii.gz")
    rc = main(["evaluate", "--pred", str(pred), "--masks", str(masks), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "b.nii.gz" in err and "shape" in err
    # a heatmap that is not an image
    _save(np.zeros((8, 8, 8), np.uint8), masks / "b.nii.gz")
    (pred / "c_anomaly.nii.gz").write_bytes(b"this is not a NIfTI file")
    rc = main(["evaluate", "--pred", str(pred), "--masks", str(masks), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "c_anomaly.nii.gz" in err
    # a scores.csv without the needed columns
    (pred / "scores.csv").write_text("name,value\nx,1\n")
    rc = main(["evaluate", "--pred", str(pred), "--masks", str(masks), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "scores.csv" in err and "id,score" in err


def test_evaluate_missing_labels_row(handmade, tmp_path, capsys):
    lab = tmp_path / "short.csv"
    lab.write_text("id,abnormal\na,1\n")
    rc = main(["evaluate", "--pred", str(handmade["pred"]), "--masks", str(handmade["masks"]), "--labels", str(lab),
               "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "short.csv" in err and "'b'" in err


# ---------------------------------------------------------------------------------------------------------------
# refusals that happen before any model is needed
# ---------------------------------------------------------------------------------------------------------------
def test_train_refuses_missing_and_empty_folders(tmp_path, capsys):
    rc = main(["train", "--normal", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "no such folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    rc = main(["train", "--normal", str(empty), "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "no .nii, .nii.gz, .nrrd, .png, .jpg or .dcm volumes" in err and str(empty) in err
    assert not (tmp_path / "m.pt").exists()


def test_train_refuses_bad_options(tiny_data, tmp_path, capsys):
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt"), "--epochs", "0"])
    assert rc == 2 and "--epochs" in capsys.readouterr().err
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt"),
               "--resume", str(tmp_path / "nothing.pt")])
    assert rc == 2 and "nothing.pt" in capsys.readouterr().err


def test_detect_refuses_missing_inputs(tmp_path, capsys):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    rc = main(["detect", "--model", str(model), str(tmp_path / "ghost.nii.gz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "ghost.nii.gz" in err and "no such file" in err
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    rc = main(["detect", "--model", str(model), str(txt), "--out", str(tmp_path / "o")])
    assert rc == 2 and "notes.txt" in capsys.readouterr().err
    rc = main(["detect", "--model", str(tmp_path / "none.pt"), str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2


def test_detect_refuses_duplicate_ids(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        _save(np.zeros((4, 4, 4), np.float32), tmp_path / d / "same.nii.gz")
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    rc = main(["detect", "--model", str(model), str(tmp_path / "a"), str(tmp_path / "b"), "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "same id 'same'" in err


def test_stop_flag_time_limit():
    from spmamba.cli import _StopFlag

    assert _StopFlag()() is False
    flag = _StopFlag(time_limit_s=1e-6)
    import time

    time.sleep(0.01)
    assert flag() is True and flag.timed_out


def test_train_refuses_bad_limits(tiny_data, tmp_path, capsys):
    for opt in (["--time-limit", "0"], ["--max-steps", "0"], ["--val-fraction", "1.5"]):
        rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt")] + opt)
        assert rc == 2 and opt[0] in capsys.readouterr().err


def test_serve_refuses_missing_model(tmp_path, capsys):
    rc = main(["serve", "--studies", str(tmp_path), "--model", str(tmp_path / "absent.pt")])
    assert rc == 2 and "absent.pt" in capsys.readouterr().err


def test_train_with_position_normalisation_on_one_grid(tiny_data, tmp_path, capsys):
    from spmamba.detector import Detector

    out = tmp_path / "pn.pt"
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(out), "--config", "tiny",
               "--max-steps", "1", "--position-normalise", "-q"])
    assert rc == 0, capsys.readouterr().err
    det = Detector.load(out)
    assert det.position_stats is not None and det.meta["training"]["position_normalise"]
    img = next((tiny_data / "test" / "images").glob("*.nii.gz"))
    res = det.detect(nib.load(img).get_fdata(), nib.load(img).affine)
    assert res.heatmap.min() >= 0 and np.isfinite(res.score)


def test_position_normalisation_refuses_volumes_on_different_grids(tiny_data, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(sorted((tiny_data / "train").glob("*.nii.gz"))[:3]):
        img = nib.load(p)
        data = img.get_fdata()[:-2] if i == 0 else img.get_fdata()  # one volume cropped
        nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), mixed / p.name)
    rc = main(["train", "--normal", str(mixed), "--out", str(tmp_path / "m.pt"), "--config", "tiny",
               "--max-steps", "1", "--position-normalise", "--align", "none", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "one grid" in err and "Register" in err


def test_train_set_changes_one_setting_and_records_it(tiny_data, tmp_path, capsys):
    """--set KEY=VALUE: an ablation from the command line (here MemMC-MAE without its memory slots, a smaller batch
    and a training setting); the model file carries the changed settings and detects."""
    from spmamba.detector import Detector

    out = tmp_path / "nomem.pt"
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(out), "--method", "memmc_mae",
               "--config", "tiny", "--set", "memory_slots=0", "--set", "grad_clip=0.5", "--max-steps", "1",
               "--align", "none"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "memory_slots=0" in captured.err and "grad_clip=0.5" in captured.err  # said in the header
    det = Detector.load(out)
    assert det.model.config.memory_slots == 0 and det.model.config.training.grad_clip == 0.5
    img = next((tiny_data / "test" / "images").glob("*.nii.gz"))
    res = det.detect(nib.load(img).get_fdata(), nib.load(img).affine)
    assert np.isfinite(res.score)


@pytest.mark.parametrize("sets, needle", [
    (["memory_slot=0"], "not a setting of method memmc_mae; its settings are"),
    (["memory_slots=zero"], "memory_slots must be of type int"),
    (["memory_slots"], "give KEY=VALUE"),
    (["mask_ratio=1.5"], "--set: memmc_mae"),
    (["memory_slots=0", "memory_slots=1"], "given twice"),
])
def test_train_set_refuses_bad_settings_before_reading_volumes(tiny_data, tmp_path, capsys, sets, needle):
    args = ["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt"), "--method", "memmc_mae",
            "--config", "tiny"]
    for s in sets:
        args += ["--set", s]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "m.pt").exists()


def test_train_set_refuses_resume(tiny_data, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(tmp_path / "m.pt"), "--resume", str(ckpt),
               "--set", "epochs=3"])
    assert rc == 2 and "a resumed model keeps its settings" in capsys.readouterr().err
