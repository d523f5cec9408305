"""The method seam (spmamba.methods): the registry, the voxel-wise baseline as a method, and a toy method that only
this folder knows, driven through train, save, load, detect, the CLI and a real app server."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spmamba.baselines import VoxelwiseBaseline
from spmamba.checkpoint import CheckpointError, load_checkpoint
from spmamba.detector import Detector
from spmamba.io import save_volume
from spmamba.methods import SLICE, VOLUME, UnknownMethod, get_method, method_names, register_method
from spmamba.train import split_normals, train_detector
from toy_method import ToyModel
from method_helpers import AFFINE, box_volume  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOY_ENV = {"SPMAMBA_METHODS": "toy_method:ToyModel", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
register_method(ToyModel)  # in this process; subprocesses get it from TOY_ENV


def test_registry_knows_the_builtin_methods_and_refuses_others():
    assert method_names()[:2] == ["spmamba", "voxelwise"]
    assert get_method("spmamba").kind == SLICE and get_method("voxelwise").kind == VOLUME
    assert {"tiny", "fast", "paper"} <= set(get_method("spmamba").PRESETS)
    with pytest.raises(UnknownMethod, match="choose one of"):
        get_method("nosuch")


def test_voxelwise_method_gives_the_baselines_heatmaps(normals, tmp_path):
    det = train_detector(normals, method="voxelwise", device="cpu")
    assert det.method_name == "voxelwise" and det.meta["training"]["steps"] == 1
    cal = det.calibration
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold) and cal.n_volumes == 1
    train_idx, _ = split_normals(len(normals))
    base = VoxelwiseBaseline().fit(normals[i].array for i in train_idx)
    x = box_volume(np.random.default_rng(5), lesion=True)
    res = det.detect(x, AFFINE)
    np.testing.assert_allclose(res.heatmap, base.heatmap(x), rtol=1e-5, atol=1e-5)
    assert res.score == pytest.approx(base.score(base.heatmap(x)), rel=1e-5)
    assert res.abnormal and res.score > cal.volume_threshold

    path = det.save(tmp_path / "voxelwise.pt")
    assert load_checkpoint(path)["method"] == "voxelwise"
    loaded = Detector.load(path, device="cpu")
    assert loaded.version == det.version and loaded.method_name == "voxelwise"
    assert np.array_equal(loaded.detect(x, AFFINE).heatmap, res.heatmap)


def test_a_file_of_an_unknown_method_is_refused(normals, tmp_path):
    det = train_detector(normals, method="voxelwise", device="cpu")
    payload = det.checkpoint_payload()
    payload["method"] = "nosuch"
    with pytest.raises(CheckpointError, match="nosuch"):
        Detector.from_payload(payload, device="cpu")


def test_toy_method_train_save_load_detect(normals, tmp_path):
    losses = []
    det = train_detector(normals, method="toy", config="smaller", device="cpu", checkpoint_path=tmp_path / "toy.pt",
                         progress=lambda d: losses.append(d["loss"]) if d["phase"] == "epoch" else None)
    assert det.method_name == "toy" and det.config.image_size == 16 and len(losses) == 2
    assert np.isfinite(det.calibration.pixel_threshold)
    obj = load_checkpoint(tmp_path / "toy.pt")
    assert obj["method"] == "toy" and "training_state" in obj
    loaded = Detector.load(tmp_path / "toy.pt", device="cpu")
    x = box_volume(np.random.default_rng(5), lesion=True)
    a, b = det.detect(x, AFFINE), loaded.detect(x, AFFINE)
    assert loaded.version == det.version and np.array_equal(a.heatmap, b.heatmap) and a.score == b.score
    assert a.heatmap.shape == x.shape
    # resuming continues the same method; another method's name is refused
    more = train_detector(normals, resume=tmp_path / "toy.pt", epochs=3, device="cpu")
    assert more.method_name == "toy" and more.meta["training"]["epochs"] == 3
    with pytest.raises(ValueError, match="toy"):
        train_detector(normals, method="spmamba", resume=tmp_path / "toy.pt", device="cpu")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spmamba", *args], env={**os.environ, **TOY_ENV},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy_data")
    rng = np.random.default_rng(1)
    for i in range(4):
        save_volume(box_volume(rng), AFFINE, d / "normal" / f"n{i}.nii.gz")
    save_volume(box_volume(rng, lesion=True), AFFINE, d / "test" / "a0.nii.gz")
    return d


def test_toy_method_through_the_cli(toy_folder, tmp_path):
    r = _cli("train", "--method", "toy", "--config", "fast", "--normal", str(toy_folder / "normal"),
             "--out", str(tmp_path / "m.pt"), "-q")
    assert r.returncode != 0 and "not a preset of method toy" in r.stderr, r.stderr
    r = _cli("train", "--method", "nosuch", "--normal", str(toy_folder / "normal"), "--out", str(tmp_path / "m.pt"))
    assert r.returncode != 0 and "unknown method" in r.stderr, r.stderr
    r = _cli("train", "--method", "toy", "--normal", str(toy_folder / "normal"), "--out", str(tmp_path / "m.pt"),
             "--max-steps", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "m.pt")["method"] == "toy"
    r = _cli("detect", "--model", str(tmp_path / "m.pt"), str(toy_folder / "test"), "--out", str(tmp_path / "pred"),
             "-q")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert [row["id"] for row in rows] == ["a0"] and np.isfinite(float(rows[0]["score"]))
    from spmamba.demo import describe_model

    assert "method toy" in describe_model(tmp_path / "m.pt")


def test_voxelwise_through_the_cli(toy_folder, tmp_path):
    from spmamba.cli import main

    out = tmp_path / "vw.pt"
    assert main(["train", "--method", "voxelwise", "--normal", str(toy_folder / "normal"), "--out", str(out),
                 "-q"]) == 0
    obj = load_checkpoint(out)
    assert obj["method"] == "voxelwise" and obj["config"]["name"] == "default" and "training_state" not in obj
    assert main(["detect", "--model", str(out), str(toy_folder / "test"), "--out", str(tmp_path / "pred"),
                 "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert rows[0]["id"] == "a0" and rows[0]["abnormal"].lower() in ("true", "1")


@pytest.mark.slow
def test_toy_method_served_and_trained_by_a_real_app_server(toy_folder, tmp_path):
    import httpx

    from app_folder_guard import APP_DIR
    from spmamba.server import serve

    sys.path.insert(0, str(REPO / "tests" / "app"))
    from app_helpers import free_port, parse_infer, stop_server, wait_for_training

    model = tmp_path / "toy.pt"
    train_detector([str(p) for p in sorted((toy_folder / "normal").iterdir())], method="toy", config="smaller",
                   device="cpu", max_steps=1).save(model)
    port = free_port()
    proc = serve(str(tmp_path / "studies"), app_dir=str(APP_DIR), host="127.0.0.1", port=port,
                 conf={"method": "toy", "preset": "smaller", "model": str(model), "model_dir": str(tmp_path / "md"),
                       "min_normals": 2, "auto_score": "false"},
                 block=False, ready_timeout=240, env=TOY_ENV, log_file=str(tmp_path / "server.log"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            info = c.get("/info/").json()
            assert {"toy", "toy_seg"} <= set(info["models"]) and "toy" in info["trainers"]
            assert info["spmamba"]["settings"]["method"] == "toy"
            files = sorted((toy_folder / "normal").iterdir()) + [toy_folder / "test" / "a0.nii.gz"]
            for p in files:
                sid = p.name.split(".")[0]
                r = c.put("/datastore/image", params={"image": sid}, files={"file": (p.name, p.read_bytes())})
                assert r.status_code == 200, r.text
            r = c.post("/infer/toy", params={"image": "a0"})
            assert r.status_code == 200, r.text
            params, _, _ = parse_infer(r)
            assert params["method"] == "toy" and params["preset"] == "smaller"
            v0 = params["model_version"]
            for sid in ("n0", "n1", "n2", "n3"):
                c.put("/datastore/image/info", params={"image": sid},
                      data={"info": json.dumps({"curation": "normal"})})
            r = c.post("/train/toy", json={"preset": "fast"})
            assert r.status_code == 400 and "method toy" in r.text, r.text
            r = c.post("/train/toy", json={"max_epochs": 1})
            assert r.status_code == 200, r.text
            task = wait_for_training(c)
            assert task["status"] == "DONE", task
            r = c.post("/infer/toy", params={"image": "a0", "output": "json"})
            assert r.status_code == 200 and r.json()["model_version"] != v0 and r.json()["method"] == "toy"
    finally:
        stop_server(proc)
