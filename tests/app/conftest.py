"""Fixtures for the MONAI Label app tests: tiny volumes, a tiny model trained once, a TestClient per test."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "spmamba_app"
SHAPE = (32, 32, 8)
AFFINE = np.array([[2.0, 0, 0, -31.0], [0, 2.0, 0, -29.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])


def phantom(seed: int, lesion: bool = False, shape=SHAPE) -> np.ndarray:
    """A smooth ellipsoid 'organ' with noise; ``lesion`` adds a bright blob off-centre."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 + (g[2] / 0.95) ** 2)
    img = np.clip(1.2 - r, 0, None) * (1.0 + 0.05 * rng.standard_normal())
    img += 0.02 * rng.standard_normal(shape)
    if lesion:
        c = np.array([0.3, -0.25, 0.0])
        d = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
        img += 1.5 * (d < 0.25)
    return img.astype(np.float32)


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


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


# ------------------------------------------------------------------------------------------------ bad inputs
def _nifti_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(array, AFFINE if array.ndim >= 3 else np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw) if compress else raw


def bad_inputs() -> Dict[str, tuple]:
    """name -> (file name, bytes, words the error message must contain (any of))."""
    good = _nifti_bytes(phantom(0))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((30000, 30000, 30000))
    hdr["vox_offset"] = 352
    absurd = hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024
    nan = phantom(1)
    nan[3, 4, 5] = np.nan
    inf = phantom(2)
    inf[0, 0, 0] = np.inf
    return {
        "not_an_image": ("notes.nii.gz", b"this is a text file, not a volume\n" * 20, ("gzip", "image", "read", "volume")),
        "text_extension": ("notes.txt", b"hello", ("txt", "type", "format", "extension", "support", "image")),
        "truncated": ("trunc.nii.gz", good[: len(good) // 2], ("truncat", "incomplete", "read", "corrupt", "end")),
        "four_d": ("fourd.nii.gz", _nifti_bytes(np.zeros((8, 8, 4, 3), np.float32)), ("4", "3-d", "3d", "dimension")),
        "one_d": ("oned.nii.gz", _nifti_bytes(np.zeros((100,), np.float32)), ("1", "3-d", "3d", "dimension")),
        "nan": ("nan.nii.gz", _nifti_bytes(nan), ("nan",)),
        "inf": ("inf.nii.gz", _nifti_bytes(inf), ("inf", "finite")),
        "absurd_header": ("huge.nii", absurd, ("large", "size", "big", "absurd", "voxels")),
    }


# ------------------------------------------------------------------------------------------------ TestClient
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        for sid, src in (studies or {}).items():
            shutil.copy(src, sdir / f"{sid}.nii.gz")
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


def parse_infer(response):
    """(params dict, file bytes, file name) from a multipart /infer answer."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    assert response.headers["content-type"].startswith("multipart/"), response.text[:300]
    params, data, name = None, None, None
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        disp = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disp:
            params = json.loads(part.content)
        else:
            data = part.content
            name = disp.split("filename=")[-1].strip('"') if "filename=" in disp else None
    return params, data, name


def load_bytes(data: bytes, suffix: str):
    """Load a NIfTI/NRRD result from bytes with the library's reader (returns spmamba Volume)."""
    import tempfile

    from spmamba.volume import load_volume

    fd, p = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        return load_volume(p)
    finally:
        os.unlink(p)
