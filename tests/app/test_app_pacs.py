"""Hospital deployment: studies from a real PACS (Orthanc over DICOMweb, started here), results stored back as DICOM,
and sign-in against a local OpenID Connect issuer (RSA keys made here).

One Orthanc, one issuer and one app (MONAI Label's FastAPI app in-process, as the other app tests; its training runs
in MONAI Label's real subprocess) are shared by the tests of this module, which run in order: listing and sign-in,
curation and training on PACS series, detection with the results stored in the PACS and read back, new series
without a restart, malformed and non-image series.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from app_helpers import APP_DIR, free_port, load_bytes, parse_infer, wait_for_training
from pacs_servers import OidcIssuer, Orthanc

ROLES = {"admin": "monailabel-admin", "reviewer": "monailabel-reviewer", "annotator": "monailabel-annotator",
         "user": "monailabel-user"}


def _store_phantoms(orthanc: Orthanc, folder: Path) -> dict:
    """Three normal brain phantoms and one with a lesion (spmamba.data.synthetic, 6 mm) as MR series in Orthanc."""
    from spmamba.data.dicom import write_dicom_series
    from spmamba.data.synthetic import make_subject

    uids = {}
    for name, subject in [(f"normal{i}", make_subject(0, i, spacing=6.0)) for i in range(3)] + [
            ("lesion", make_subject(0, 7, spacing=6.0, abnormal=True, family="tumour"))]:
        info = write_dicom_series(subject.image, subject.affine, folder / name, patient_id=f"P-{name}",
                                  series_description=f"T1 {name}")
        orthanc.store_folder(folder / name)
        uids[name] = info["series_uid"]
    return uids


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with four MR series, an OIDC issuer with one user per role, and the app on the PACS with sign-in."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    root = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(root / "orthanc")
    issuer = OidcIssuer()
    for role in ROLES:
        issuer.add_user(role, f"{role}-pw", [ROLES[role]])
    mp = pytest.MonkeyPatch()
    client = None
    try:
        uids = _store_phantoms(orthanc, root / "dicom")
        conf = {"model_dir": str(root / "model"), "auto_score": "false", "preset": "tiny", "epochs": "1",
                "align": "none", "dicomweb_cache": str(root / "cache"), "dicomweb_refresh_s": "1",
                "min_normals": "2"}
        for k, v in {
            "MONAI_LABEL_APP_DIR": str(APP_DIR), "MONAI_LABEL_STUDIES": orthanc.url, "MONAI_LABEL_APP_CONF": conf,
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False, "MONAI_LABEL_SERVER_PORT": free_port(),
            "MONAI_LABEL_AUTH_ENABLE": True, "MONAI_LABEL_AUTH_REALM_URI": issuer.url,
        }.items():
            mp.setattr(settings, k, v)
            mp.setenv(k, json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("OMP_NUM_THREADS", "1")
        from monailabel.app import app

        client = TestClient(app)
        client.__enter__()
        tokens = {role: issuer.token(role, [ROLES[role]]) for role in ROLES}
        yield {"client": client, "orthanc": orthanc, "issuer": issuer, "uids": uids, "root": root,
               "auth": {role: {"Authorization": f"Bearer {t}"} for role, t in tokens.items()}}
    finally:
        from monailabel.utils.async_tasks.utils import processes

        for proc in list(processes("train").values()):
            proc.kill()
        if client is not None:
            client.__exit__(None, None, None)
        mp.undo()
        issuer.stop()
        orthanc.stop()


def _listed(pacs) -> set:
    r = pacs["client"].get("/datastore/?output=all", headers=pacs["auth"]["user"])
    assert r.status_code == 200, r.text
    return set(r.json()["objects"])


def test_image_series_of_the_pacs_are_the_studies_and_sign_in_is_enforced(pacs):
    c, auth, uids = pacs["client"], pacs["auth"], pacs["uids"]
    r = c.get("/datastore/?output=all")
    assert r.status_code == 401 and "sign in" in r.json()["detail"]
    assert _listed(pacs) == set(uids.values())
    info = c.get("/info/", headers=auth["user"]).json()["spmamba"]["studies"]
    assert info["kind"] == "dicomweb" and info["url"] == pacs["orthanc"].url and info["pacs"]["reachable"] is True

    # sign in through the app (MONAI Label's password login, proxied to the issuer)
    r = c.post("/auth/token", data={"username": "annotator", "password": "wrong"})
    assert r.status_code == 401 and "password" in r.json()["detail"]
    r = c.post("/auth/token", data={"username": "annotator", "password": "annotator-pw"})
    assert r.status_code == 200, r.text
    ann = {"Authorization": f"Bearer {r.json()['access_token']}"}
    series = uids["normal0"]
    # curation needs the annotator role; a plain user gets 403 naming it
    r = c.put(f"/datastore/image/info?image={series}", data={"info": json.dumps({"curation": "normal"})},
              headers=auth["user"])
    assert r.status_code == 403 and ROLES["annotator"] in r.json()["detail"]
    r = c.put(f"/datastore/image/info?image={series}", data={"info": json.dumps({"curation": "normal"})}, headers=ann)
    assert r.status_code == 200, r.text
    # training needs reviewer (or admin): an annotator gets 403
    r = c.post("/train/spmamba", json={}, headers=ann)
    assert r.status_code == 403 and ROLES["reviewer"] in r.json()["detail"]
    # an expired token, a token signed by another key and a token of another issuer: 401
    issuer = pacs["issuer"]
    expired = issuer.token("admin", [ROLES["admin"]], expires_in=-30)
    r = c.get("/info/", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    from cryptography.hazmat.primitives.asymmetric import rsa

    forged = issuer.token("admin", [ROLES["admin"]], key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert c.get("/info/", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    foreign = issuer.token("admin", [ROLES["admin"]], issuer="http://127.0.0.1:1/realms/other")
    assert c.get("/info/", headers={"Authorization": f"Bearer {foreign}"}).status_code == 401


def test_curation_and_training_on_pacs_series(pacs):
    c, auth, uids = pacs["client"], pacs["auth"], pacs["uids"]
    for name in ("normal0", "normal1", "normal2"):
        r = c.put(f"/datastore/image/info?image={uids[name]}", data={"info": json.dumps({"curation": "normal"})},
                  headers=auth["annotator"])
        assert r.status_code == 200, r.text
    r = c.put(f"/datastore/image/info?image={uids['lesion']}", data={"info": json.dumps({"curation": "excluded"})},
              headers=auth["annotator"])
    assert r.status_code == 200
    counts = c.get("/info/", headers=auth["user"]).json()["spmamba"]["curation"]
    assert counts == {"normal": 3, "abnormal": 0, "excluded": 1, "unreviewed": 0}
    r = c.post("/train/spmamba", json={}, headers=auth["reviewer"])
    assert r.status_code == 200, r.text
    task = wait_for_training(c, timeout=300, headers=auth["user"])
    stats = c.get("/info/", headers=auth["user"]).json().get("train_stats", {}).get("spmamba", {})
    assert task["status"] == "DONE", (task, stats)
    assert stats["n_studies"] == 3 and stats["model_version"]
    model = c.get("/info/", headers=auth["user"]).json()["spmamba"]["model"]
    assert model["ready"] and model["version"] == stats["model_version"]
    # the series were fetched and converted once, into the cache (not the app folder)
    cache = next((pacs["root"] / "cache").iterdir())
    assert sorted(p.name for p in cache.glob("*.nii.gz")) == sorted(f"{uids[n]}.nii.gz" for n in
                                                                     ("normal0", "normal1", "normal2"))


def test_detection_is_stored_in_the_pacs_as_parametric_map_and_segmentation(pacs):
    from spmamba.dicom_results import PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE, read_derived_volume

    c, auth, uids = pacs["client"], pacs["auth"], pacs["uids"]
    series = uids["lesion"]
    r = c.post(f"/infer/spmamba?image={series}", data={"params": json.dumps({"store_results": True})},
               headers=auth["user"])
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    heat = load_bytes(data, ".nii.gz")
    stored = params["pacs"]
    assert stored["stored"] is True, stored
    client = pacs["orthanc"].client()
    study = stored["study_uid"]
    pm_ds = client.retrieve_series(study, stored["parametric_map"]["series_uid"])
    seg_ds = client.retrieve_series(study, stored["segmentation"]["series_uid"])
    assert len(pm_ds) == 1 and len(seg_ds) == 1
    pm, seg = pm_ds[0], seg_ds[0]
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and seg.SOPClassUID == SEGMENTATION_STORAGE
    for ds in (pm, seg):  # both reference the source series, in its study
        assert ds.StudyInstanceUID == study
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    back = read_derived_volume(pm, heat.affine, heat.array.shape)
    np.testing.assert_array_equal(back, heat.array)  # the float heatmap, exactly
    mask = read_derived_volume(seg, heat.affine, heat.array.shape)
    expected = heat.array >= np.float32(params["pixel_threshold"])
    np.testing.assert_array_equal(mask.astype(bool), expected)
    # the product's own results never show up as studies
    time.sleep(1.1)
    assert _listed(pacs) == set(uids.values())
    # asking to store an uploaded file's results is a clear 400
    path = pacs["root"] / "upload.nii.gz"
    path.write_bytes(data)
    with open(path, "rb") as f:
        r = c.post("/infer/spmamba", files={"file": ("upload.nii.gz", f)},
                   data={"params": json.dumps({"store_results": True})}, headers=auth["user"])
    assert r.status_code == 400 and "store_results" in r.json()["detail"]


def test_a_new_series_appears_without_a_restart(pacs, tmp_path):
    from spmamba.data.dicom import write_dicom_series

    from app_helpers import phantom

    info = write_dicom_series(phantom(5, shape=(24, 24, 6)), np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "new")
    before = _listed(pacs)
    pacs["orthanc"].store_folder(tmp_path / "new")
    deadline = time.time() + 10
    while info["series_uid"] not in _listed(pacs) and time.time() < deadline:
        time.sleep(0.5)
    assert _listed(pacs) == before | {info["series_uid"]}


def test_malformed_and_non_image_series_are_clear_4xx_and_the_server_stays_up(pacs, tmp_path):
    from spmamba.data.dicom import write_dicom_series

    from app_helpers import phantom

    c, auth = pacs["client"], pacs["auth"]
    # a series whose last slice has another size (a damaged or mixed series)
    info = write_dicom_series(phantom(6, shape=(24, 24, 5)), np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "bad")
    odd = write_dicom_series(phantom(7, shape=(16, 16, 1)), np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "odd",
                             study_uid=info["study_uid"], series_uid=info["series_uid"])
    ds = pydicom.dcmread(odd["files"][0])
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [-15.0]
    ds.save_as(odd["files"][0])
    pacs["orthanc"].store_folder(tmp_path / "bad")
    pacs["orthanc"].store_folder(tmp_path / "odd")
    time.sleep(1.1)
    r = c.post(f"/infer/spmamba?image={info['series_uid']}", data={"params": "{}"}, headers=auth["user"])
    assert r.status_code == 422 and "different sizes" in r.json()["detail"], r.text
    # a series of the product's results (a Parametric Map) is not an image series
    pm_series = next(s for s in pacs["orthanc"].client().search_for_series(search_filters={"Modality": "OT"}))
    pm_uid = pm_series["0020000E"]["Value"][0]
    r = c.post(f"/infer/spmamba?image={pm_uid}", data={"params": "{}"}, headers=auth["user"])
    assert r.status_code == 422 and "Parametric Map" in r.json()["detail"], r.text
    r = c.post("/infer/spmamba?image=1.2.3.4.5.6", data={"params": "{}"}, headers=auth["user"])
    assert r.status_code == 404
    assert c.get("/info/", headers=auth["user"]).status_code == 200


def test_the_app_starts_and_answers_when_the_pacs_is_unreachable(tmp_path, monkeypatch):
    """A PACS that does not answer at start-up: the app starts, lists nothing (nothing cached yet), says why, and
    a study id is a clear 404, not a 500."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    conf = {"model_dir": str(tmp_path / "model"), "auto_score": "false", "dicomweb_cache": str(tmp_path / "cache"),
            "dicomweb_timeout_s": "2"}
    for k, v in {"MONAI_LABEL_APP_DIR": str(APP_DIR), "MONAI_LABEL_STUDIES": dead, "MONAI_LABEL_APP_CONF": conf,
                 "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False, "MONAI_LABEL_SERVER_PORT": free_port(),
                 "MONAI_LABEL_AUTH_ENABLE": False}.items():
        monkeypatch.setattr(settings, k, v)
    from monailabel.app import app

    with TestClient(app) as c:
        r = c.get("/info/")
        assert r.status_code == 200, r.text
        studies = r.json()["spmamba"]["studies"]
        assert studies["kind"] == "dicomweb" and studies["pacs"]["reachable"] is False
        assert "ConnectionError" in studies["pacs"]["error"]
        assert c.get("/datastore/?output=all").json()["objects"] == {}
        r = c.post("/infer/spmamba?image=1.2.3", data={"params": "{}"})
        assert r.status_code in (404, 409), r.text  # 409: no model yet, asked before the PACS


@pytest.mark.slow
def test_spmamba_serve_on_the_pacs_offline_with_sign_in(pacs, tmp_path):
    """`spmamba serve --studies URL --auth-issuer URL` as a real process, with every address but 127.0.0.1
    unreachable (a dead proxy): it starts (no dcmqi download), asks for sign-in, and the Slicer module's client signs
    in and sees the PACS's series; `spmamba login` signs in without storing the password where there is no keyring."""
    import signal
    import subprocess
    import sys

    sys.path.insert(0, str(APP_DIR.parents[1] / "slicer_extension" / "AnomalyDetection"))
    from AnomalyDetectionLib.client import AnomalyClient, ServerError

    port = free_port()
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "XDG_CONFIG_HOME": str(tmp_path),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring", "OMP_NUM_THREADS": "1"}
    env.pop("MONAI_LABEL_AUTH_ENABLE", None)
    cmd = [sys.executable, "-m", "spmamba", "serve", "--studies", pacs["orthanc"].url, "--port", str(port),
           "--auth-issuer", pacs["issuer"].url, "--log-dir", str(tmp_path / "logs"),
           "--conf", f"model_dir={tmp_path / 'model'}", "--conf", f"dicomweb_cache={tmp_path / 'cache'}",
           "--conf", "auto_score=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline().decode("utf-8", "replace")
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "Next:" in line:
                break
        text = "".join(lines)
        assert "ready on" in text and "sign-in is on" in text, text[-3000:]
        url = f"http://127.0.0.1:{port}"
        client = AnomalyClient(url)
        assert client.auth_enabled()
        with pytest.raises(ServerError) as e:
            client.info()
        assert e.value.kind == "auth"
        with pytest.raises(ServerError) as e:
            client.login("user", "nope")
        assert e.value.kind == "auth" and "password" in str(e.value)
        client.login("user", "user-pw")
        info = client.info()
        assert info["spmamba"]["studies"]["pacs"]["reachable"] is True
        assert set(client.curation_states()) >= set(pacs["uids"].values())
        with pytest.raises(ServerError) as e:  # a plain user may not train
            client.start_training("spmamba", {})
        assert e.value.kind == "forbidden"
        r = subprocess.run([sys.executable, "-m", "spmamba", "login", url, "--user", "annotator", "--password-stdin"],
                           input="annotator-pw\n", text=True, capture_output=True, env=env, timeout=120)
        assert r.returncode == 0 and "not stored (no system keyring)" in r.stdout, r.stderr
        saved = (tmp_path / "spmamba" / "client.json").read_text()
        assert "annotator" in saved and "annotator-pw" not in saved
        assert not list((APP_DIR / "bin").glob("*"))  # MONAI Label's dcmqi download never ran (bin/ stays empty)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
