"""The app serves models that align their inputs: the answer says how the study was registered, the heatmap is on
the study's own grid, a study that cannot be aligned is a 422 naming it, and `--conf align` reaches the training."""
from __future__ import annotations

import gzip
import sys

import nibabel as nib
import numpy as np
import pytest
from app_helpers import AFFINE, APP_DIR, SHAPE, parse_infer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture()
def app_lib():
    """The app's own ``lib`` package importable (as MONAI Label imports it)."""
    sys.path.insert(0, str(APP_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(APP_DIR))


@pytest.fixture(scope="module")
def aligned_model(tiny_data, tmp_path_factory):
    from spmamba.train import train_detector

    det = train_detector([str(p) for p in tiny_data["normal"]], config="tiny", max_steps=1, device="cpu",
                         align="affine", align_reference="normals")
    path = tmp_path_factory.mktemp("aligned_model") / "aligned.pt"
    det.save(str(path))
    return path


def test_infer_reports_alignment_and_maps_back(make_app, tiny_data, aligned_model):
    env = make_app({"n0": tiny_data["normal"][0], "a0": tiny_data["abnormal"][0]}, model=aligned_model)
    r = env.client.post("/infer/spmamba", params={"image": "a0"})
    assert r.status_code == 200, r.text
    params, data, _ = parse_infer(r)
    al = params["alignment"]
    assert al["reference"] == "normals" and al["similarity"] >= al["metric_floor"]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert img.shape == SHAPE and np.allclose(img.affine, AFFINE, atol=1e-4)


def test_a_study_that_cannot_be_aligned_is_a_422_naming_it(make_app, tiny_data, aligned_model):
    env = make_app({"n0": tiny_data["normal"][0]}, model=aligned_model)
    noise = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    payload = gzip.compress(nib.Nifti1Image(noise, AFFINE).to_bytes())
    r = env.client.post("/infer/spmamba", files={"file": ("noise_scan.nii.gz", payload)})
    assert r.status_code == 422, r.text
    assert "noise_scan.nii.gz" in r.text and "align" in r.text


def test_models_without_alignment_say_so(make_app, tiny_data, tiny_model):
    env = make_app({"a0": tiny_data["abnormal"][0]}, model=tiny_model)
    r = env.client.post("/infer/spmamba", params={"image": "a0"})
    assert r.status_code == 200, r.text
    assert parse_infer(r)[0]["alignment"] is None


def test_align_settings(app_lib, tmp_path):
    from lib.configs import parse_conf
    from lib.configs.settings import ConfError

    s = parse_conf(str(tmp_path), str(tmp_path), {"align": "affine", "align_reference": "mni152"})
    assert (s.align, s.align_reference) == ("affine", "mni152")
    assert parse_conf(str(tmp_path), str(tmp_path), {}).align == "auto"  # the product's default, as `spmamba train`
    assert parse_conf(str(tmp_path), str(tmp_path), {"align": "none"}).align == "none"
    assert parse_conf(str(tmp_path), str(tmp_path), {"align": "Deformable"}).align == "deformable"
    with pytest.raises(ConfError, match="align 'bspline': expected one of"):
        parse_conf(str(tmp_path), str(tmp_path), {"align": "bspline"})
    with pytest.raises(ConfError, match="align_reference"):
        parse_conf(str(tmp_path), str(tmp_path), {"align_reference": "no_such_file.nii.gz"})


def test_training_task_passes_the_align_settings(app_lib, monkeypatch, tmp_path):
    """`--conf align affine` reaches train_detector (the trainer runs in MONAI Label's subprocess in real use)."""
    import spmamba.train
    from lib.configs import parse_conf
    from lib.trainers import AnomalyTrain

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(images, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(spmamba.train, "train_detector", fake_train)
    settings = parse_conf(str(tmp_path), str(tmp_path), {"align": "affine", "model_dir": str(tmp_path / "m")})
    task = AnomalyTrain(settings)
    monkeypatch.setattr(task, "precheck", lambda request, datastore: ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    with pytest.raises(Stop):
        task({}, datastore=None)
    assert seen["align"] == "affine" and seen["align_reference"] == "auto"
