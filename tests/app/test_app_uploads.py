"""Uploads of unsupported file types (same status and message from /infer and PUT /datastore/image), and the
documented client recipes of docs/APP.md: listing studies and splitting the multipart answer of /infer."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("fname", ["notes.txt", "scan.tif", "README"])
def test_unsupported_upload_is_415_naming_the_clients_file(make_app, tiny_data, tiny_model, fname):
    env = make_app({"n0": tiny_data["normal"][0]}, model=tiny_model)
    before = env.datastore_json()
    r1 = env.client.post("/infer/spmamba", files={"file": (fname, b"hello, not a volume\n")})
    r2 = env.client.put("/datastore/image", params={"image": "newstudy"},
                        files={"file": (fname, b"hello, not a volume\n")})
    r3 = env.client.put("/datastore/image", files={"file": (fname, b"hello, not a volume\n")})
    for r in (r1, r2, r3):
        assert r.status_code == 415, r.text
        detail = r.json()["detail"]
        assert repr(fname) in detail and "tmp" not in detail, detail
        assert ".nii.gz" in detail and ".nrrd" in detail
    assert r1.json()["detail"] == r2.json()["detail"] == r3.json()["detail"]
    assert env.datastore_json() == before


def _doc_example() -> str:
    import re

    from app_helpers import REPO

    text = (REPO / "docs" / "APP.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "BytesParser" in b]
    assert len(blocks) == 1, "docs/APP.md should hold one python example splitting the /infer answer"
    return blocks[0]


def test_docs_client_example_runs_against_the_server(make_app, tiny_data, tiny_model, monkeypatch, tmp_path, capsys):
    """The APP.md example (list studies, split the multipart /infer answer) runs as written; `requests` is the
    in-process client here, so the same code talks to the test server."""
    import sys
    import types

    from app_helpers import SHAPE, load_bytes, parse_infer

    env = make_app({"case001": tiny_data["abnormal"][0], "n1": tiny_data["normal"][1]}, model=tiny_model,
                   curation={"n1": "normal"})
    fake = types.ModuleType("requests")
    fake.get, fake.post = env.client.get, env.client.post
    monkeypatch.setitem(sys.modules, "requests", fake)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_doc_example(), "docs/APP.md", "exec"), scope)
    out = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    listed = [ln[:2] for ln in out if ln and ln[0] in ("case001", "n1")]
    assert listed == [["case001", "unreviewed"], ["n1", "normal"]], out[-5:]
    result, heatmap_file = scope["result"], scope["heatmap_file"]
    assert result["verdict"] in ("normal", "abnormal") and "score" in result
    data = (tmp_path / heatmap_file).read_bytes()
    assert load_bytes(data, ".nii.gz").array.shape == SHAPE
    # the same split as the tests' own parser (requests_toolbelt)
    r = env.client.post("/infer/spmamba", params={"image": "case001"})
    params, tb_data, name = parse_infer(r)
    assert params["model_version"] == result["model_version"] and params["score"] == result["score"]
    assert name.endswith(".nii.gz") and heatmap_file.endswith(".nii.gz")
    import numpy as np

    assert np.array_equal(load_bytes(tb_data, ".nii.gz").array, load_bytes(data, ".nii.gz").array)
