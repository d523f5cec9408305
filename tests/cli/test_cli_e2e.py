"""End to end on a tiny set: synth -> train (tiny preset, 1 epoch) -> detect -> evaluate, plus refusals of
unusable data, Ctrl-C during training and resume. Marked slow (run with --runslow; CI does)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spmamba.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model") / "model.pt"
    # 1 epoch of the tiny preset, capped at 4 optimisation steps (CPU time; the pure-PyTorch scan is slow)
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(model), "--config", "tiny",
               "--epochs", "1", "--max-steps", "4", "--device", "cpu", "-q"])
    assert rc == 0 and model.is_file()
    return model


def test_end_to_end(tiny_data: Path, trained: Path, tmp_path: Path, capsys):
    from spmamba.detector import Detector

    det = Detector.load(trained, device="cpu")
    assert det.version
    out = tmp_path / "pred"
    rc = main(["detect", "--model", str(trained), str(tiny_data / "test" / "images"), "--out", str(out), "--png",
               "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert list(rows[0]) == ["id", "score", "threshold", "abnormal"]
    assert [r["id"] for r in rows] == [f"case-{i:04d}" for i in range(4)]
    for r in rows:
        src = nib.load(tiny_data / "test" / "images" / f"{r['id']}.nii.gz")
        hm = nib.load(out / f"{r['id']}_anomaly.nii.gz")
        assert hm.shape == src.shape
        assert np.allclose(hm.affine, src.affine)
        assert hm.get_data_dtype() == np.float32
        assert np.isfinite(np.asarray(hm.dataobj)).all()
        assert r["abnormal"] in ("0", "1")
        assert int(r["abnormal"]) == int(float(r["score"]) > float(r["threshold"]))
        png = out / f"{r['id']}_overlay.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "detect.json").read_text())
    assert meta["n_done"] == 4 and meta["n_failed"] == 0 and meta["version"] == det.version
    assert isinstance(meta["pixel_threshold"], float)

    rc = main(["evaluate", "--pred", str(out), "--masks", str(tiny_data / "test" / "masks"),
               "--labels", str(tiny_data / "test" / "labels.csv"), "-q"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "image AUROC" in table and "pixel AUPRO" in table
    res = json.loads((out / "metrics.json").read_text())
    assert res["n_volumes"] == 4 and res["n_abnormal"] == 2
    for key in ("auroc", "ap", "f1_max"):
        assert 0.0 <= res["image"][key] <= 1.0
    for key in ("auroc", "ap", "aupro", "best_dice"):
        assert 0.0 <= res["pixel"][key] <= 1.0
    assert res["lesion"]["threshold_source"].startswith("model")


def test_detect_skips_bad_files_and_says_why(tiny_data: Path, trained: Path, tmp_path: Path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(tiny_data / "test" / "images" / "case-0000.nii.gz", inp / "good.nii.gz")
    (inp / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(inp / "fourd.nii.gz"))
    out = tmp_path / "pred"
    rc = main(["detect", "--model", str(trained), str(inp), "--out", str(out), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "broken.nii.gz" in err and "fourd.nii.gz" in err
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["id"] for r in rows] == ["good"]
    assert (out / "good_anomaly.nii.gz").is_file()
    assert json.loads((out / "detect.json").read_text())["n_failed"] == 2


def test_detect_nrrd_keeps_grid(tiny_data: Path, trained: Path, tmp_path: Path, capsys):
    from spmamba.io import load_volume, save_volume

    v = load_volume(tiny_data / "test" / "images" / "case-0001.nii.gz")
    nrrd = tmp_path / "vol.nrrd"
    save_volume(v.array, v.affine, nrrd)
    out = tmp_path / "pred"
    assert main(["detect", "--model", str(trained), str(nrrd), "--out", str(out), "--device", "cpu", "-q"]) == 0
    hm = nib.load(out / "vol_anomaly.nii.gz")
    assert hm.shape == v.array.shape
    assert np.allclose(hm.affine, load_volume(nrrd).affine, atol=1e-4)


def test_detect_rejects_foreign_model(tiny_data: Path, tmp_path: Path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["detect", "--model", str(bad), str(tiny_data / "test" / "images"), "--out", str(tmp_path / "o"),
               "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.pt" in err


def _copy_train(tiny_data: Path, dst: Path, n: int) -> Path:
    dst.mkdir()
    for p in sorted((tiny_data / "train").glob("*.nii.gz"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


@pytest.mark.parametrize("case", ["too_few", "corrupt", "four_d", "nan"])
def test_train_refuses_unusable_data(tiny_data: Path, tmp_path: Path, capsys, case: str):
    d = _copy_train(tiny_data, tmp_path / "normals", 1 if case == "too_few" else 3)
    culprit = None
    if case == "corrupt":
        culprit = "truncated.nii.gz"
        data = (tiny_data / "train" / "normal-0003.nii.gz").read_bytes()
        (d / culprit).write_bytes(data[: len(data) // 2])
    elif case == "four_d":
        culprit = "fourd.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10, 2), np.float32), np.eye(4)), str(d / culprit))
    elif case == "nan":
        culprit = "nan.nii.gz"
        a = np.ones((10, 10, 10), np.float32)
        a[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(d / culprit))
    out = tmp_path / "m.pt"
    rc = main(["train", "--normal", str(d), "--out", str(out), "--config", "tiny", "--epochs", "1",
               "--max-steps", "1", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err
    if culprit:
        assert culprit in err
    assert not out.exists()


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "spmamba"] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(REPO), **kw)


def test_train_ctrl_c_leaves_valid_checkpoint(tiny_data: Path, tmp_path: Path):
    from spmamba.detector import Detector

    out = tmp_path / "m.pt"
    proc = _run_cli(["train", "--normal", str(tiny_data / "train"), "--out", str(out), "--config", "tiny",
                     "--epochs", "500", "--device", "cpu"])
    err = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.extend(chunk)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and b"loss" not in err and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, err.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    stdout = proc.stdout.read().decode()
    rc = proc.wait(timeout=180)
    t.join(5)
    text = err.decode(errors="replace")
    assert rc == 0, text
    assert "stopping after the current step" in text
    assert "stopped early" in stdout
    det = Detector.load(out, device="cpu")
    assert np.isfinite(det.calibration.pixel_threshold)


def test_train_resume(tiny_data: Path, trained: Path, tmp_path: Path):
    from spmamba.detector import Detector

    out = tmp_path / "resumed.pt"
    rc = main(["train", "--normal", str(tiny_data / "train"), "--out", str(out), "--config", "tiny", "--epochs", "2",
               "--max-steps", "2", "--resume", str(trained), "--device", "cpu", "-q"])
    assert rc == 0
    assert Detector.load(out, device="cpu").version != Detector.load(trained, device="cpu").version


def test_demo_prepares_studies_and_reuses_model(tiny_data: Path, trained: Path, tmp_path: Path, capsys):
    demo = tmp_path / "demo"
    args = ["demo", "--dir", str(demo), "--n-train", "3", "--n-test", "2", "--spacing", "6", "--model", str(trained),
            "--no-serve", "-q"]
    assert main(args) == 0
    studies = demo / "studies"
    names = sorted(p.name for p in studies.glob("*.nii.gz"))
    assert names == ["case-0000.nii.gz", "case-0001.nii.gz", "normal-0000.nii.gz", "normal-0001.nii.gz",
                     "normal-0002.nii.gz"]
    rows = list(csv.DictReader(open(studies / "curation.csv")))
    assert [(r["id"], r["curation"]) for r in rows] == [(f"normal-{i:04d}", "normal") for i in range(3)]
    err = capsys.readouterr().err
    assert "using existing model" in err
    before = (demo / "train" / "normal-0000.nii.gz").stat().st_mtime
    assert main(args) == 0  # second run: data present, nothing regenerated
    assert (demo / "train" / "normal-0000.nii.gz").stat().st_mtime == before
    assert "using existing demo data" in capsys.readouterr().err
