"""Every REST endpoint of the SP-Mamba MONAI Label app, in-process (fastapi TestClient on monailabel.app.app)."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import threading

import nibabel as nib
import numpy as np
import pytest
from app_helpers import SHAPE, bad_inputs, parse_infer

pytestmark = pytest.mark.filterwarnings("ignore")


def studies_of(tiny_data, n_normal=4, n_abnormal=2):
    s = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:n_normal])}
    s.update({f"a{i}": p for i, p in enumerate(tiny_data["abnormal"][:n_abnormal])})
    return s


def nifti_from_bytes(data: bytes):
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return nib.Nifti1Image.from_bytes(raw)


# ------------------------------------------------------------------------------------------------ info / no model
def test_info_lists_tasks_and_model_state(make_app, tiny_data):
    env = make_app(studies_of(tiny_data), curation={"n0": "normal"})
    r = env.client.get("/info/")
    assert r.status_code == 200
    info = r.json()
    assert {"spmamba", "spmamba_seg"} <= set(info["models"])
    assert info["models"]["spmamba_seg"]["type"] == "segmentation"
    assert info["models"]["spmamba_seg"]["labels"] == {"anomaly": 1}
    # what each task returns, so clients can tell a method (heatmap) from its label map
    assert (info["models"]["spmamba"]["output"], info["models"]["spmamba_seg"]["output"]) == ("heatmap", "label")
    assert "spmamba" in info["trainers"]
    assert {"suspect_normal", "most_anomalous"} <= set(info["strategies"])
    assert "anomaly" in info["scoring"]
    assert info["spmamba"]["model"]["ready"] is False
    assert info["spmamba"]["curation"]["normal"] == 1  # seeded from STUDIES/curation.csv
    assert info["spmamba"]["curation"]["unreviewed"] == 5


def test_infer_without_model_says_train_first(make_app, tiny_data):
    env = make_app(studies_of(tiny_data))
    r = env.client.post("/infer/spmamba", params={"image": "n0"})
    assert r.status_code == 409
    assert "train" in r.json()["detail"].lower()
    for strategy in ("suspect_normal", "most_anomalous"):
        r = env.client.post(f"/activelearning/{strategy}")
        assert r.status_code == 409, r.text
    assert env.client.get("/info/").status_code == 200


# ------------------------------------------------------------------------------------------------ inference
def test_infer_heatmap_matches_input_grid_and_json_fields(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model)
    r = env.client.post("/infer/spmamba", params={"image": "a0"})
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    assert name.endswith(".nii.gz")
    img = nifti_from_bytes(data)
    src = nib.load(str(tiny_data["abnormal"][0]))
    assert img.shape == src.shape == SHAPE
    assert np.allclose(img.affine, src.affine, atol=1e-4)
    assert img.get_data_dtype() == np.float32
    assert np.isfinite(img.get_fdata()).all()
    for key in ("score", "threshold", "pixel_threshold", "verdict", "abnormal", "slice_scores", "regions",
                "model_version", "latencies", "slice_axis"):
        assert key in params, key
    assert params["verdict"] in ("normal", "abnormal")
    assert params["verdict"] == ("abnormal" if params["abnormal"] else "normal")
    assert len(params["slice_scores"]) == SHAPE[params["slice_axis"]]
    for k in ("read", "model", "write", "total"):
        assert params["latencies"][k] >= 0
    for reg in params["regions"]:
        assert {"centroid_voxel", "centroid_ras", "volume_mm3", "peak"} <= set(reg)
    info = env.client.get("/info/").json()
    assert info["spmamba"]["model"]["version"] == params["model_version"]
    assert info["models"]["spmamba"]["model_version"] == params["model_version"]


def test_infer_uploaded_file_as_nrrd(make_app, tiny_data, tiny_model):
    import nrrd

    env = make_app({}, model=tiny_model)
    with open(tiny_data["normal"][1], "rb") as f:
        r = env.client.post(
            "/infer/spmamba",
            files={"file": ("upload.nii.gz", f.read())},
            data={"params": json.dumps({"result_extension": ".nrrd"})},
        )
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    assert name.endswith(".nrrd")
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as t:
        t.write(data)
        t.flush()
        arr, hdr = nrrd.read(t.name)
    assert arr.shape == SHAPE and arr.dtype == np.float32
    assert hdr["space"] == "left-posterior-superior"
    assert env.files() == []  # an infer upload is not added to the datastore


def test_infer_bad_result_extension(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model)
    r = env.client.post("/infer/spmamba", params={"image": "n0"}, data={"params": json.dumps({"result_extension": ".exe"})})
    assert r.status_code == 400 and "result_extension" in r.json()["detail"]
    r = env.client.post("/infer/spmamba", params={"image": "n0"}, data={"params": "{not json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = env.client.post("/infer/nosuchmodel", params={"image": "n0"})
    assert r.status_code == 404


def test_segmentation_task_returns_thresholded_label(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model)
    r = env.client.post("/infer/spmamba_seg", params={"image": "a0"})
    assert r.status_code == 200, r.text
    params, data, _ = parse_infer(r)
    lab = nifti_from_bytes(data)
    assert lab.shape == SHAPE and lab.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}
    assert params["label_names"] == {"anomaly": 1}
    heat = nifti_from_bytes(parse_infer(env.client.post("/infer/spmamba", params={"image": "a0"}))[1]).get_fdata()
    assert np.array_equal(np.asarray(lab.dataobj) > 0, heat >= params["pixel_threshold"])  # at or above = abnormal
    r = env.client.post("/infer/spmamba_seg", params={"image": "a0", "output": "json"})
    assert r.status_code == 200 and "score" in r.json()


def test_parallel_infer_requests_all_succeed(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model)
    ids = ["n0", "n1", "n2", "n3", "a0", "a1", "n0", "a1", "n2", "a0"]
    results = [None] * len(ids)

    def go(i, sid):
        r = env.client.post("/infer/spmamba", params={"image": sid, "output": "json"})
        results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r[0] == 200 for r in results), results
    by_id = {}
    for sid, (_, js) in zip(ids, results):
        by_id.setdefault(sid, set()).add(round(js["score"], 5))
    assert all(len(v) == 1 for v in by_id.values())  # same input -> same score, whatever the concurrency


# ------------------------------------------------------------------------------------------------ robustness
@pytest.mark.parametrize("case", sorted(bad_inputs()))
def test_bad_input_gets_4xx_and_corrupts_nothing(make_app, tiny_data, tiny_model, case):
    env = make_app(studies_of(tiny_data, 2, 0), model=tiny_model, curation={"n0": "normal"})
    before_files, before_json = env.files(), env.datastore_json()
    model_bytes = (env.model_dir / "spmamba.pt").read_bytes()
    fname, payload, words = bad_inputs()[case]

    r = env.client.post("/infer/spmamba", files={"file": (fname, payload)})
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert any(w in detail.lower() for w in words), (case, detail)
    assert "tmp" not in detail.split(":")[0]  # the message names the client's file, not a temporary one

    r = env.client.put("/datastore/image", params={"image": "newstudy"}, files={"file": (fname, payload)})
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    assert env.files() == before_files
    assert env.datastore_json() == before_json
    assert (env.model_dir / "spmamba.pt").read_bytes() == model_bytes

    assert env.client.get("/info/").status_code == 200
    r = env.client.post("/infer/spmamba", params={"image": "n0", "output": "json"})
    assert r.status_code == 200  # still serving


@pytest.mark.parametrize("image_id,status", [("nosuch", 404), ("../x", 400), ("..", 400), ("a/b", 400),
                                             ("/etc/passwd", 400), (" spaced", 400)])
def test_bad_image_ids(make_app, tiny_data, tiny_model, image_id, status):
    env = make_app(studies_of(tiny_data, 2, 0), model=tiny_model)
    before = env.datastore_json()
    r = env.client.post("/infer/spmamba", params={"image": image_id})
    assert r.status_code == status, r.text
    assert image_id.strip() in r.json()["detail"] or "image" in r.json()["detail"]
    r = env.client.get("/datastore/image/info", params={"image": image_id})
    assert r.status_code == status
    r = env.client.put("/datastore/image/info", params={"image": image_id}, data={"info": '{"curation": "normal"}'})
    assert r.status_code == status
    with open(tiny_data["normal"][0], "rb") as f:
        r = env.client.put("/datastore/image", params={"image": image_id}, files={"file": ("x.nii.gz", f.read())})
    assert r.status_code == (400 if status == 400 else 200)
    if status == 400:
        assert env.datastore_json() == before
        assert not os.path.exists(env.studies.parent / "x.nii.gz")
    # params cannot smuggle a path in
    r = env.client.post("/infer/spmamba", params={"image": "n0"}, data={"params": json.dumps({"image": "/etc/passwd"})})
    assert r.status_code == 400


# ------------------------------------------------------------------------------------------------ curation
def test_curation_set_read_clear(make_app, tiny_data):
    env = make_app(studies_of(tiny_data, 2, 1))
    c = env.client
    r = c.put("/datastore/image/info", params={"image": "n0"}, data={"info": json.dumps({"curation": "Normal"})})
    assert r.status_code == 200 and r.json()["curation"] == "normal"
    assert c.get("/datastore/image/info", params={"image": "n0"}).json()["curation"] == "normal"
    r = c.put("/datastore/image/info", params={"image": "a0"}, data={"info": json.dumps({"curation": "abnormal"})})
    assert r.status_code == 200
    r = c.put("/datastore/image/info", params={"image": "n1"}, data={"info": json.dumps({"curation": "excluded"})})
    assert r.status_code == 200
    r = c.put("/datastore/image/info", params={"image": "n1"}, data={"info": json.dumps({"curation": "maybe"})})
    assert r.status_code == 422 and "normal" in r.json()["detail"]
    r = c.put("/datastore/image/info", params={"image": "n1"}, data={"info": "[1, 2]"})
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    r = c.put("/datastore/image/info", params={"image": "n1"}, data={"info": "{oops"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    counts = c.get("/info/").json()["spmamba"]["curation"]
    assert counts == {"normal": 1, "abnormal": 1, "excluded": 1, "unreviewed": 0}
    r = c.put("/datastore/image/info", params={"image": "n1"}, data={"info": json.dumps({"curation": None})})
    assert r.status_code == 200 and "curation" not in r.json()
    # the state is persisted in datastore_v2.json (what training reads)
    assert env.datastore_json()["objects"]["n0"]["image"]["info"]["curation"] == "normal"
    # upload with a curation state
    with open(tiny_data["normal"][3], "rb") as f:
        r = c.put("/datastore/image", params={"image": "up1"}, files={"file": ("up1.nii.gz", f.read())},
                  data={"params": json.dumps({"curation": "normal"})})
    assert r.status_code == 200 and r.json()["image"] == "up1"
    assert c.get("/datastore/image/info", params={"image": "up1"}).json()["curation"] == "normal"
    r = c.get("/datastore/image", params={"image": "up1"})
    assert r.status_code == 200 and len(r.content) > 100


def test_strategies_and_scoring(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data, 4, 2), model=tiny_model,
                   curation={"n0": "normal", "n1": "normal", "a0": "normal", "n2": "abnormal"})
    c = env.client
    r = c.post("/scoring/anomaly", params={"run_sync": True})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["scored"] == 6 and res["failed"] == 0
    infos = {k: v["image"]["info"] for k, v in env.datastore_json()["objects"].items()}
    version = res["model_version"]
    assert all(i["anomaly"]["model_version"] == version for i in infos.values())
    # a second run reuses the stored scores
    assert c.post("/scoring/anomaly", params={"run_sync": True}).json()["cached"] == 6

    r = c.post("/activelearning/suspect_normal")
    assert r.status_code == 200, r.text
    pick = r.json()
    normals = ["n0", "n1", "a0"]
    assert pick["id"] in normals
    assert pick["score"] == max(infos[i]["anomaly"]["score"] for i in normals)

    r = c.post("/activelearning/most_anomalous")
    pick = r.json()
    unreviewed = ["n3", "a1"]
    assert pick["id"] in unreviewed
    assert pick["score"] == max(infos[i]["anomaly"]["score"] for i in unreviewed)

    for sid in unreviewed:
        c.put("/datastore/image/info", params={"image": sid}, data={"info": '{"curation": "excluded"}'})
    assert c.post("/activelearning/most_anomalous").json() == {}
    assert c.post("/activelearning/nosuch").status_code == 404
    assert c.post("/scoring/nosuch", params={"run_sync": True}).status_code == 404


def test_train_with_too_few_normals_is_a_clear_4xx(make_app, tiny_data):
    env = make_app(studies_of(tiny_data, 3, 0), curation={"n0": "normal"})
    r = env.client.post("/train/spmamba", json={"max_epochs": 1})
    assert r.status_code == 409, r.text
    assert "normal" in r.json()["detail"] and "1" in r.json()["detail"]
    assert env.client.post("/train/nosuch", json={}).status_code == 404
    assert env.client.get("/info/").status_code == 200


def test_unflagged_normal_option_counts_unreviewed(make_app, tiny_data):
    env = make_app(studies_of(tiny_data, 3, 0), conf={"unflagged_normal": "true", "min_normals": "3"})
    app_info = env.client.get("/info/").json()
    assert app_info["spmamba"]["settings"]["unflagged_normal"] is True
    from monailabel.interfaces.utils.app import app_instance

    inst = app_instance()
    assert len(inst._trainers["spmamba"].precheck({}, inst.datastore())) == 3


def test_served_model_is_reloaded_when_published(make_app, tiny_data, tiny_model, tmp_path):
    """A model published into the model folder (what training does) is served by the next request."""
    from spmamba.detector import Detector

    env = make_app(studies_of(tiny_data, 2, 0))
    assert env.client.post("/infer/spmamba", params={"image": "n0"}).status_code == 409
    det = Detector.load(str(tiny_model), device="cpu")
    tmp = env.model_dir / ".incoming.pt"
    det.save(str(tmp))
    os.replace(tmp, env.model_dir / "spmamba.pt")
    r = env.client.post("/infer/spmamba", params={"image": "n0", "output": "json"})
    assert r.status_code == 200 and r.json()["model_version"] == det.version
