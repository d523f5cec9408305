"""The app serving MemMC-MAE (``--conf method memmc_mae``) in-process (TestClient, the ``make_app`` fixture): its
tasks, a volume and a 2-D image (PNG study, PNG upload) through /infer, bad 2-D files refused with a 4xx, and a
training through MONAI Label's machinery."""
from __future__ import annotations

import io

import numpy as np
import pytest
from app_helpers import AFFINE, SHAPE, load_bytes, parse_infer
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore")
CONF = {"method": "memmc_mae", "preset": "tiny"}


def _png(seed: int, lesion: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:36]
    img = 80 + 120 * np.exp(-(((yy - 20) / 14.0) ** 2 + ((xx - 18) / 12.0) ** 2)) + 3 * rng.standard_normal((40, 36))
    if lesion:
        img[(yy - 16) ** 2 + (xx - 14) ** 2 < 16] += 60
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def memmc_model(tiny_data, tmp_path_factory):
    """A tiny MemMC-MAE model trained once with the library on the app tests' phantoms."""
    from spmamba.train import train_detector

    det = train_detector([str(p) for p in tiny_data["normal"]], method="memmc_mae", config="tiny", device="cpu",
                         max_steps=2)
    path = tmp_path_factory.mktemp("memmc_model") / "memmc.pt"
    det.save(str(path))
    return path


@pytest.fixture(scope="module")
def png_study(tmp_path_factory):
    path = tmp_path_factory.mktemp("png_study") / "xray.png"
    path.write_bytes(_png(7, lesion=True))
    return path


def test_served_method_volume_and_2d_image(make_app, tiny_data, memmc_model, png_study):
    env = make_app({"n0": tiny_data["normal"][0], "a0": tiny_data["abnormal"][0], "xray": png_study},
                   conf=CONF, model=memmc_model)
    c = env.client
    info = c.get("/info/").json()
    assert {"memmc_mae", "memmc_mae_seg"} <= set(info["models"]) and "spmamba" not in info["models"]
    assert "memmc_mae" in info["trainers"] and info["spmamba"]["settings"]["method"] == "memmc_mae"
    assert info["spmamba"]["model"]["ready"] is True
    assert info["models"]["memmc_mae"]["description"].startswith("MemMC-MAE")
    assert info["trainers"]["memmc_mae"]["description"].startswith("Train MemMC-MAE")
    assert "xray.png" in env.files()

    r = c.post("/infer/memmc_mae", params={"image": "a0"})
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    assert params["method"] == "memmc_mae" and params["preset"] == "tiny"
    heat = load_bytes(data, ".nii.gz")
    assert heat.array.shape == SHAPE and np.allclose(heat.affine, AFFINE, atol=1e-4)

    # a 2-D study: the heatmap is a one-slice NIfTI on the image's own (ITK) geometry
    r = c.post("/infer/memmc_mae", params={"image": "xray"})
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    heat = load_bytes(data, ".nii.gz")
    assert name.endswith(".nii.gz") and heat.array.shape == (36, 40, 1)
    np.testing.assert_allclose(heat.affine, np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-6)
    assert len(params["slice_scores"]) == 1 and np.isfinite(params["score"])
    assert np.isfinite(heat.array).all() and heat.array.max() > 0
    r = c.post("/infer/memmc_mae_seg", params={"image": "xray"})
    assert r.status_code == 200, r.text
    assert load_bytes(parse_infer(r)[1], ".nii.gz").array.shape == (36, 40, 1)

    # a 2-D image uploaded with the request, and one added as a study
    r = c.post("/infer/memmc_mae", files={"file": ("frame.png", _png(8))}, params={"output": "json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["slice_scores"]) == 1
    r = c.put("/datastore/image", params={"image": "frame"}, files={"file": ("frame.png", _png(9))})
    assert r.status_code == 200, r.text
    assert "frame.png" in env.files()
    assert c.post("/infer/memmc_mae", params={"image": "frame", "output": "json"}).status_code == 200


@pytest.mark.parametrize("fname, payload, words", [
    ("bad.png", b"this is not a png\n" * 10, ("not a readable image",)),
    ("cut.png", None, ("truncated", "corrupt")),
    ("bad.dcm", b"\0" * 200, ("not a readable dicom",)),
], ids=["not_a_png", "truncated_png", "not_a_dicom"])
def test_bad_2d_images_get_4xx_and_change_nothing(make_app, tiny_data, memmc_model, fname, payload, words):
    env = make_app({"n0": tiny_data["normal"][0]}, conf=CONF, model=memmc_model)
    before_files, before_json = env.files(), env.datastore_json()
    if payload is None:
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (80, 90)).astype(np.uint8)).save(buf, format="PNG")
        payload = buf.getvalue()[: len(buf.getvalue()) // 2]
    r = env.client.post("/infer/memmc_mae", files={"file": (fname, payload)})
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert fname in detail and any(w in detail.lower() for w in words), detail
    r = env.client.put("/datastore/image", params={"image": "newstudy"}, files={"file": (fname, payload)})
    assert 400 <= r.status_code < 500, r.text
    assert env.files() == before_files and env.datastore_json() == before_json
    assert env.client.post("/infer/memmc_mae", params={"image": "n0", "output": "json"}).status_code == 200


def test_without_a_model_the_app_says_how_to_train_this_method(make_app, tiny_data):
    env = make_app({"n0": tiny_data["normal"][0]}, conf=CONF)
    r = env.client.post("/infer/memmc_mae", params={"image": "n0"})
    assert r.status_code == 409 and "No MemMC-MAE model" in r.json()["detail"]
    assert "POST /train/memmc_mae" in r.json()["detail"]


def test_conf_refuses_another_methods_preset(make_app, tiny_data):
    from lib.configs import ConfError, parse_conf  # the app's own settings module (its folder is on sys.path)

    settings = parse_conf("/nonexistent/app", "", {"method": "memmc_mae"})
    assert settings.method == "memmc_mae" and settings.preset == "fast"
    with pytest.raises(ConfError, match="unknown preset of method memmc_mae"):
        parse_conf("/nonexistent/app", "", {"method": "memmc_mae", "preset": "default"})


@pytest.mark.slow
def test_training_through_the_app(make_app, tiny_data, memmc_model):
    from test_app_training import wait_train

    studies = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:4])}
    env = make_app(studies, conf=CONF, model=memmc_model, curation={f"n{i}": "normal" for i in range(4)})
    c = env.client
    v0 = c.post("/infer/memmc_mae", params={"image": "n0", "output": "json"}).json()["model_version"]
    r = c.post("/train/memmc_mae", json={"preset": "default"})
    assert r.status_code == 400 and "method memmc_mae" in r.text, r.text
    r = c.post("/train/memmc_mae", json={"max_epochs": 1})
    assert r.status_code == 200, r.text
    task = wait_train(c)
    assert task["status"] == "DONE", list(task.get("details", []))[-10:]
    stats = c.get("/info/").json()["train_stats"]["memmc_mae"]
    assert stats["status"] == "DONE" and stats["model_version"] != v0
    r = c.post("/infer/memmc_mae", params={"image": "n0", "output": "json"})
    assert r.json()["model_version"] == stats["model_version"] and r.json()["method"] == "memmc_mae"
