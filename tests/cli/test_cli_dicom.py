"""DICOM input at the command line, `spmamba serve` against a PACS and with sign-in, and `spmamba login`."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spmamba.cli import main


def _as_series(nifti: Path, folder: Path) -> dict:
    from spmamba.data.dicom import write_dicom_series

    img = nib.load(str(nifti))
    return write_dicom_series(np.asarray(img.dataobj, np.float32), img.affine, folder,
                              series_description=nifti.name.split(".")[0])


def test_train_and_detect_take_dicom_series_folders(tiny_data, tmp_path, capsys):
    normals = tmp_path / "normals"
    for p in sorted((tiny_data / "train").glob("*.nii.gz")):
        _as_series(p, normals / p.name.split(".")[0])  # one series per subfolder
    test_img = sorted((tiny_data / "test" / "images").glob("*.nii.gz"))[0]
    series = tmp_path / "case01"
    _as_series(test_img, series)
    model = tmp_path / "m.pt"
    # the voxel-wise method (one pass, no network) keeps this test quick; the reading is the same for every method
    rc = main(["train", "--normal", str(normals), "--out", str(model), "--method", "voxelwise", "--align", "none",
               "-q"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "trained on 4 volumes" in out.out
    rc = main(["detect", "--model", str(model), str(series), "--out", str(tmp_path / "res"), "-q"])
    assert rc == 0, capsys.readouterr().err
    heat = nib.load(str(tmp_path / "res" / "case01_anomaly.nii.gz"))
    src = nib.load(str(test_img))
    assert heat.shape == src.shape and np.allclose(heat.affine, src.affine, atol=1e-4)
    # a folder of one series given to --normal, and a folder mixing two series: one line that says what to do
    rc = main(["train", "--normal", str(series), "--out", str(tmp_path / "x.pt")])
    assert rc == 2 and "own subfolder" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, folder in enumerate(sorted(normals.iterdir())[:2]):
        for f in sorted(Path(folder).iterdir()):
            (mixed / f"{i}_{f.name}").write_bytes(f.read_bytes())
    rc = main(["detect", "--model", str(model), str(mixed), "--out", str(tmp_path / "res2"), "-q"])
    assert rc == 2 and "holds 2 DICOM series" in capsys.readouterr().err


def test_serve_on_a_network_address_without_sign_in_warns(monkeypatch, capsys, tmp_path):
    from spmamba import server

    calls = []
    monkeypatch.setattr(server, "serve", lambda **kw: calls.append(kw) or 0)
    (tmp_path / "studies").mkdir()
    assert main(["serve", "--studies", str(tmp_path / "studies"), "--host", "0.0.0.0"]) == 0
    assert "without sign-in" in capsys.readouterr().err and calls[-1]["env"] == {}
    assert main(["serve", "--studies", str(tmp_path / "studies"), "--host", "0.0.0.0", "--auth-issuer",
                 "https://idp.example/realms/r"]) == 0
    assert "without sign-in" not in capsys.readouterr().err
    assert calls[-1]["env"] == {"MONAI_LABEL_AUTH_ENABLE": "true",
                                "MONAI_LABEL_AUTH_REALM_URI": "https://idp.example/realms/r"}
    # a PACS URL is passed through as the studies (no folder check)
    assert main(["serve", "--studies", "http://127.0.0.1:8042/dicom-web/"]) == 0
    assert calls[-1]["studies"] == "http://127.0.0.1:8042/dicom-web"


class _MemoryKeyring:
    """A keyring backend in memory (stands in for the desktop's secret service)."""

    def __init__(self):
        import keyring.backend

        class Backend(keyring.backend.KeyringBackend):
            priority = 1
            store: dict = {}

            def set_password(self, service, username, password):
                self.store[(service, username)] = password

            def get_password(self, service, username):
                return self.store.get((service, username))

            def delete_password(self, service, username):
                self.store.pop((service, username), None)

        self.backend = Backend()


def test_remembered_sign_in_keeps_the_password_out_of_files(tmp_path, monkeypatch):
    import keyring
    from keyring.backends import fail

    from spmamba import remote

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    mem = _MemoryKeyring().backend
    previous = keyring.get_keyring()
    try:
        keyring.set_keyring(mem)
        assert remote.remember("http://127.0.0.1:8000/", "ann", "s3cret") is True
        assert remote.remembered() == ("http://127.0.0.1:8000", "ann")
        text = remote.config_path().read_text()
        assert "s3cret" not in text and json.loads(text)["servers"]["http://127.0.0.1:8000"] == {"user": "ann"}
        assert oct(remote.config_path().stat().st_mode & 0o777) == "0o600"
        assert mem.get_password("spmamba:http://127.0.0.1:8000", "ann") == "s3cret"
        remote.forget("http://127.0.0.1:8000")
        assert remote.remembered("http://127.0.0.1:8000")[1] is None
        assert mem.get_password("spmamba:http://127.0.0.1:8000", "ann") is None
        keyring.set_keyring(fail.Keyring())  # no usable keyring: the password is not stored anywhere
        assert remote.remember("http://127.0.0.1:8000", "ann", "s3cret") is False
        assert "s3cret" not in remote.config_path().read_text()
        assert remote.token_for("http://127.0.0.1:8000") is None
    finally:
        keyring.set_keyring(previous)


def test_login_refuses_a_server_that_is_not_there(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    rc = main(["login", "http://127.0.0.1:9", "--user", "ann", "--password-stdin"])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err
