"""A real ``monailabel start_server`` subprocess on 127.0.0.1 (free port), driven over HTTP like a client would.

upload -> infer (served: a checkpoint made by the library, --conf model) -> curate -> train a tiny model through
the REST API -> the next infer uses the new model version -> every kind of bad input gets a 4xx -> 8 parallel
infers succeed -> still healthy, datastore intact.
"""
from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import nibabel as nib
import numpy as np
import pytest
from app_helpers import APP_DIR, bad_inputs, free_port, parse_infer, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


@pytest.fixture
def server(tmp_path, tiny_model):
    from spmamba.server import serve

    port = free_port()
    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    log = tmp_path / "server.log"
    proc = serve(
        str(studies),
        app_dir=str(APP_DIR),
        host="127.0.0.1",
        port=port,
        conf={"model": str(tiny_model), "model_dir": str(model_dir), "min_normals": 2},
        block=False,
        ready_timeout=180,
        env={"OMP_NUM_THREADS": "1"},
        log_file=str(log),
    )
    try:
        yield {"url": f"http://127.0.0.1:{port}", "studies": studies, "model_dir": model_dir, "log": log, "proc": proc}
    finally:
        stop_server(proc)


def test_real_server_end_to_end(server, tiny_data, tiny_model):
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        info = c.get("/info/").json()
        assert info["spmamba"]["model"]["ready"] is True

        # upload
        ids = {}
        for i, p in enumerate(tiny_data["normal"][:4]):
            ids[f"n{i}"] = p
        ids["a0"] = tiny_data["abnormal"][0]
        for sid, p in ids.items():
            r = c.put("/datastore/image", params={"image": sid}, files={"file": (p.name, p.read_bytes())})
            assert r.status_code == 200, r.text

        # infer with the --conf model checkpoint
        r = c.post("/infer/spmamba", params={"image": "a0"})
        assert r.status_code == 200, r.text
        params, data, name = parse_infer(r)
        heat = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        src = nib.load(str(ids["a0"]))
        assert heat.shape == src.shape and np.allclose(heat.affine, src.affine, atol=1e-4)
        assert heat.get_data_dtype() == np.float32
        for key in ("score", "threshold", "verdict", "slice_scores", "regions", "model_version", "latencies"):
            assert key in params
        v0 = params["model_version"]

        # curate
        for sid in ("n0", "n1", "n2", "n3"):
            r = c.put("/datastore/image/info", params={"image": sid}, data={"info": json.dumps({"curation": "normal"})})
            assert r.status_code == 200
        c.put("/datastore/image/info", params={"image": "a0"}, data={"info": json.dumps({"curation": "abnormal"})})
        assert c.get("/datastore/image/info", params={"image": "n2"}).json()["curation"] == "normal"
        # active learning answers at once; the uploaded studies are scored in the background meanwhile
        deadline = time.time() + 240
        while True:
            t0 = time.time()
            r = c.post("/activelearning/suspect_normal", json={})
            assert r.status_code == 200 and time.time() - t0 < 5, r.text
            if r.json().get("complete") or time.time() > deadline:
                break
            assert "still being scored" in r.json()["message"]
            time.sleep(1)
        assert r.json()["id"] in ("n0", "n1", "n2", "n3") and r.json()["pending"] == 0, r.text

        # train a tiny model through the REST API, polling progress
        r = c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 1})
        assert r.status_code == 200, r.text
        deadline, seen_running = time.time() + 300, False
        while time.time() < deadline:
            task = c.get("/train/").json()
            stats = c.get("/info/").json()["train_stats"].get("spmamba", {})
            seen_running |= stats.get("status") == "RUNNING"
            if task.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(1)
        assert task["status"] == "DONE", task
        stats = c.get("/info/").json()["train_stats"]["spmamba"]
        assert stats["status"] == "DONE" and stats["model_version"] != v0

        # the next infer uses the new model version
        r = c.post("/infer/spmamba", params={"image": "a0", "output": "json"})
        assert r.status_code == 200 and r.json()["model_version"] == stats["model_version"]

        # bad inputs: each a 4xx naming the problem; nothing stored
        before = c.get("/datastore/", params={"output": "all"}).json()
        for case, (fname, payload, words) in bad_inputs().items():
            r = c.post("/infer/spmamba", files={"file": (fname, payload)})
            assert 400 <= r.status_code < 500, (case, r.text)
            assert any(w in r.json()["detail"].lower() for w in words), (case, r.text)
            r = c.put("/datastore/image", params={"image": f"bad_{case}"}, files={"file": (fname, payload)})
            assert 400 <= r.status_code < 500, (case, r.text)
        for image_id, status in (("nosuch", 404), ("../x", 400)):
            assert c.post("/infer/spmamba", params={"image": image_id}).status_code == status
        after = c.get("/datastore/", params={"output": "all"}).json()
        assert sorted(after["objects"]) == sorted(before["objects"]) == sorted(ids)

        # 8 parallel infers
        def one(sid):
            with httpx.Client(base_url=server["url"], timeout=180) as cc:
                return cc.post("/infer/spmamba", params={"image": sid, "output": "json"}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, ["n0", "n1", "n2", "n3", "a0", "n0", "n1", "a0"]))
        assert codes == [200] * 8

        # still healthy
        assert c.get("/info/").status_code == 200
        assert server["proc"].poll() is None
