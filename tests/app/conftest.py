"""Fixtures for the MONAI Label app tests: tiny volumes, a tiny model trained once, a TestClient per test."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from app_helpers import APP_DIR, free_port, phantom, save_nifti
from spmamba.io import IMAGE_SUFFIXES, volume_suffix


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Dict[str, List[Path]]:
    d = tmp_path_factory.mktemp("tiny_data")
    normals = [save_nifti(phantom(i), d / f"normal_{i}.nii.gz") for i in range(6)]
    abnormals = [save_nifti(phantom(100 + i, lesion=True), d / f"lesion_{i}.nii.gz") for i in range(2)]
    return {"normal": normals, "abnormal": abnormals}


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    """A tiny SP-Mamba checkpoint, trained once per session with the library (not through the app)."""
    from spmamba.train import train_detector

    det = train_detector([str(p) for p in tiny_data["normal"]], config="tiny", epochs=1, device="cpu", seed=0)
    path = tmp_path_factory.mktemp("tiny_model") / "tiny.pt"
    det.save(str(path))
    return path



# ------------------------------------------------------------------------------------------------ TestClient

class AppEnv:
    def __init__(self, root: Path, client, studies: Path, model_dir: Path):
        self.root, self.client, self.studies, self.model_dir = root, client, studies, model_dir

    def datastore_json(self) -> dict:
        return json.loads((self.studies / "datastore_v2.json").read_text())

    def files(self) -> List[str]:
        return sorted(p.name for p in self.studies.iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.fixture
def make_app(tmp_path, monkeypatch) -> Iterator[Callable[..., AppEnv]]:
    """Start the app in-process (fastapi TestClient on monailabel.app.app, as MONAI Label's own tests do)."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    clients = []

    def _make(
        studies: Optional[Dict[str, Path]] = None,
        conf: Optional[Dict[str, str]] = None,
        model: Optional[Path] = None,
        curation: Optional[Dict[str, str]] = None,
    ) -> AppEnv:
        root = tmp_path / f"app{len(clients)}"
        sdir, mdir = root / "studies", root / "model"
        sdir.mkdir(parents=True)
        mdir.mkdir(parents=True)
        for sid, src in (studies or {}).items():  # volumes as .nii.gz, 2-D images with their own type
            shutil.copy(src, sdir / (sid + (volume_suffix(src) if volume_suffix(src) in IMAGE_SUFFIXES else ".nii.gz")))
        if curation:
            (sdir / "curation.csv").write_text("id,curation\n" + "".join(f"{k},{v}\n" for k, v in curation.items()))
        if model:
            shutil.copy(model, mdir / "spmamba.pt")
        c = {"model_dir": str(mdir), "auto_score": "false", "stop_grace_s": "20"}
        c.update(conf or {})
        for k, v in {
            "MONAI_LABEL_APP_DIR": str(APP_DIR),
            "MONAI_LABEL_STUDIES": str(sdir),
            "MONAI_LABEL_APP_CONF": c,
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False,
            "MONAI_LABEL_SERVER_PORT": free_port(),
        }.items():
            monkeypatch.setattr(settings, k, v)
            monkeypatch.setenv(k, json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")]))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        from monailabel.app import app

        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return AppEnv(root, client, sdir, mdir)

    yield _make
    from monailabel.utils.async_tasks.utils import processes

    for proc in list(processes("train").values()):
        proc.kill()
    for client in clients:
        client.__exit__(None, None, None)
