"""Helpers shared by the MONAI Label app tests: tiny volumes, bad uploads, result parsing (a plain module, so
any test order can import it; the fixtures are in conftest.py)."""
from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path
from typing import Dict

import nibabel as nib
import numpy as np

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

# ------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



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

    from spmamba.io import load_volume

    fd, p = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        return load_volume(p)
    finally:
        os.unlink(p)


def wait_for_training(client, timeout: float = 300, headers=None) -> dict:
    """Poll ``GET /train/`` until the training task ends (DONE, ERROR or STOPPED) or ``timeout`` s pass; its JSON.
    ``headers``: e.g. the bearer token when sign-in is on."""
    import time

    deadline, task = time.time() + timeout, {}
    while time.time() < deadline:
        r = client.get("/train/", headers=headers)
        assert r.status_code in (200, 404), r.text
        task = r.json()
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    return task


def stop_server(proc) -> None:
    """Terminate a server subprocess (``spmamba.server.serve(block=False)``), killing it if it lingers."""
    proc.terminate()
    try:
        proc.wait(20)
    except Exception:  # noqa: BLE001
        proc.kill()
        proc.wait(10)
