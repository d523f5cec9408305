"""The app serving Spatial-MSMA (``--conf method spatial_msma``) in-process (TestClient, the ``make_app`` fixture):
its tasks, a volume through /infer (heatmap on the input grid), the no-model message, preset and epoch checks of
``--conf`` and of a training request, and (slow) a two-stage training through MONAI Label's machinery."""
from __future__ import annotations

import numpy as np
import pytest
from app_helpers import AFFINE, APP_DIR, SHAPE, load_bytes, parse_infer

pytestmark = pytest.mark.filterwarnings("ignore")
CONF = {"method": "spatial_msma", "preset": "tiny"}


@pytest.fixture(scope="module")
def msma_model(tiny_data, tmp_path_factory):
    """A tiny Spatial-MSMA model trained once with the library on the app tests' phantoms (both stages)."""
    from spmamba.train import train_detector

    det = train_detector([str(p) for p in tiny_data["normal"]], method="spatial_msma", config="tiny", epochs=2,
                         device="cpu")
    path = tmp_path_factory.mktemp("msma_model") / "msma.pt"
    det.save(str(path))
    return path


def test_served_method_tasks_and_a_volume(make_app, tiny_data, msma_model, monkeypatch):
    env = make_app({"n0": tiny_data["normal"][0], "a0": tiny_data["abnormal"][0]}, conf=CONF, model=msma_model)
    c = env.client
    info = c.get("/info/").json()
    # the Slicer module's Method list (its client reads /info/ without Qt or Slicer): the heatmap task, not the label
    monkeypatch.syspath_prepend(str(APP_DIR.parents[1] / "slicer_extension" / "AnomalyDetection"))
    from AnomalyDetectionLib.client import summarize_info

    summary = summarize_info(info)
    assert summary.models == ["spatial_msma"] and summary.train_task("spatial_msma") == "spatial_msma"
    assert summary.description("spatial_msma").startswith("Spatial-MSMA")
    assert {"spatial_msma", "spatial_msma_seg"} <= set(info["models"]) and "spmamba" not in info["models"]
    assert "spatial_msma" in info["trainers"] and info["spmamba"]["settings"]["method"] == "spatial_msma"
    assert info["spmamba"]["model"]["ready"] is True
    assert info["models"]["spatial_msma"]["description"].startswith("Spatial-MSMA")
    r = c.post("/infer/spatial_msma", params={"image": "a0"})
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    assert params["method"] == "spatial_msma" and params["preset"] == "tiny" and np.isfinite(params["score"])
    heat = load_bytes(data, ".nii.gz")
    assert heat.array.shape == SHAPE and np.allclose(heat.affine, AFFINE, atol=1e-4)
    assert np.isfinite(heat.array).all() and heat.array.max() > 0
    r = c.post("/infer/spatial_msma_seg", params={"image": "a0"})
    assert r.status_code == 200, r.text
    assert load_bytes(parse_infer(r)[1], ".nii.gz").array.shape == SHAPE
    r = c.post("/infer/spatial_msma", files={"file": ("bad.nii.gz", b"not a volume" * 20)})
    assert 400 <= r.status_code < 500 and "bad.nii.gz" in r.json()["detail"], r.text


def test_without_a_model_the_app_says_how_to_train_this_method(make_app, tiny_data):
    env = make_app({"n0": tiny_data["normal"][0]}, conf=CONF)
    r = env.client.post("/infer/spatial_msma", params={"image": "n0"})
    assert r.status_code == 409 and "No Spatial-MSMA model" in r.json()["detail"]
    assert "POST /train/spatial_msma" in r.json()["detail"]
    r = env.client.post("/train/spatial_msma", json={"max_epochs": 1})
    assert r.status_code == 400 and "2 stages" in r.text, r.text


def test_conf_checks_presets_and_epochs():
    from lib.configs import ConfError, parse_conf  # the app's own settings module (its folder is on sys.path)

    settings = parse_conf("/nonexistent/app", "", {"method": "spatial_msma"})
    assert settings.method == "spatial_msma" and settings.preset == "fast"
    with pytest.raises(ConfError, match="unknown preset of method spatial_msma"):
        parse_conf("/nonexistent/app", "", {"method": "spatial_msma", "preset": "default"})
    with pytest.raises(ConfError, match="2 stages"):
        parse_conf("/nonexistent/app", "", {"method": "spatial_msma", "epochs": "1"})
    assert parse_conf("/nonexistent/app", "", {"method": "spmamba", "epochs": "1"}).epochs == 1


@pytest.mark.slow
def test_two_stage_training_through_the_app(make_app, tiny_data, msma_model):
    from test_app_training import wait_train

    studies = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:4])}
    env = make_app(studies, conf=CONF, model=msma_model, curation={f"n{i}": "normal" for i in range(4)})
    c = env.client
    v0 = c.post("/infer/spatial_msma", params={"image": "n0", "output": "json"}).json()["model_version"]
    r = c.post("/train/spatial_msma", json={"max_epochs": 2})
    assert r.status_code == 200, r.text
    task = wait_train(c)
    assert task["status"] == "DONE", list(task.get("details", []))[-10:]
    stats = c.get("/info/").json()["train_stats"]["spatial_msma"]
    assert stats["status"] == "DONE" and stats["model_version"] != v0 and stats.get("stage") == "flow"
    r = c.post("/infer/spatial_msma", params={"image": "n0", "output": "json"})
    assert r.json()["model_version"] == stats["model_version"] and r.json()["method"] == "spatial_msma"
