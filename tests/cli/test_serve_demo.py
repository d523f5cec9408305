"""`spmamba serve` and `spmamba demo` as a new user meets them: a missing studies folder, which model is served and
what to do next, Ctrl-C, and a demo model that is reused only when the demo made it with the same settings."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spmamba import demo as spmamba_demo
from spmamba import server as spmamba_server
from spmamba.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_model(path: Path, training: dict | None = None) -> Path:
    """A real (untrained) tiny checkpoint with a training summary, for the messages that describe models."""
    import torch

    from spmamba.detector import Detector
    from spmamba.models import SPMamba, get_config
    from spmamba.preprocessing import Preprocessing

    torch.manual_seed(0)
    det = Detector(SPMamba(get_config("tiny")), Preprocessing(), device="cpu")
    det.meta["training"] = training or {}
    det.meta["created"] = "2026-01-02T03:04:05+0000"
    det.save(str(path))
    return path


@pytest.fixture()
def no_server(monkeypatch):
    """Replace the server start by a recorder: these tests check what happens before it."""
    from spmamba import server

    calls = []

    def fake_serve(**kw):
        calls.append(kw)
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    return calls


# ------------------------------------------------------------------------------------------------- serve (fast)
def test_serve_refuses_a_missing_studies_folder(tmp_path, capsys, no_server):
    missing = tmp_path / "my_studies"
    assert main(["serve", "--studies", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "my_studies: no such folder" in err and "--create" in err
    assert not missing.exists() and not no_server


def test_serve_create_makes_an_empty_folder_and_says_so(tmp_path, capsys, no_server):
    new = tmp_path / "my_studies"
    assert main(["serve", "--studies", str(new), "--create", "--port", str(_free_port())]) == 0
    assert new.is_dir() and len(no_server) == 1
    assert "created the empty studies folder" in capsys.readouterr().err


def test_serve_says_when_the_folder_has_no_volumes(tmp_path, capsys, no_server):
    assert main(["serve", "--studies", str(tmp_path), "--port", str(_free_port())]) == 0
    assert "holds no .nii, .nii.gz, .nrrd, .png, .jpg or .dcm studies" in capsys.readouterr().err


def test_ready_report_names_the_served_model_and_true_next_steps(tmp_path, monkeypatch, capsys):
    model = _fake_model(tmp_path / "m.pt", {
        "steps": 120, "steps_per_epoch": 40, "total_epochs": 20, "stop_reason": "time_limit", "time_limit_s": 600.0,
        "origin": "spmamba demo", "n_train_volumes": 16, "n_calibration_volumes": 4, "train_seconds": 597.0,
        "device": "cpu"})
    from spmamba.checkpoint import read_checkpoint_meta

    version = read_checkpoint_meta(model)["version"]
    url = "http://127.0.0.1:8765"
    info = {"spmamba": {"model": {"ready": True, "version": version, "path": str(model)},
                        "curation": {"normal": 2, "abnormal": 0, "excluded": 0, "unreviewed": 3}}}
    monkeypatch.setattr(spmamba_server, "get_json", lambda u, timeout=10.0: info)
    print(spmamba_server.ready_report("serve", url, tmp_path, requested_model=None, hint_model_option=True),
          file=sys.stderr)
    err = capsys.readouterr().err
    assert f"serving model {model}" in err
    assert f"version {version}" in err and "preset tiny" in err
    assert "120 optimisation steps (3 of 20 epochs)" in err and "time limit of 10.0 min" in err
    assert "made by `spmamba demo` in 9.9 min on cpu from 16 normal volumes (calibrated on 4 held-out" in err
    assert "created 2026-01-02" in err
    assert "5 studies: 2 normal, 3 unreviewed" in err
    assert "--model FILE" in err
    # the module that shows float heatmaps, not MONAI Label's stock plugin
    assert '"Anomaly Detection" module' in err and "slicer_extension" in err and "SLICER.md" in err
    assert "open it in 3D Slicer's MONAI Label module" not in err
    assert f"curl -s '{url}/datastore/?output=all'" in err and "Ctrl-C" in err

    # a different model than the one asked for is served: say so
    print(spmamba_server.ready_report("serve", url, tmp_path, requested_model=tmp_path / "other.pt",
                                      hint_model_option=True), file=sys.stderr)
    assert "note: not " in capsys.readouterr().err
    # no model at all
    info["spmamba"]["model"] = {"ready": False, "version": None, "path": None}
    print(spmamba_server.ready_report("serve", url, tmp_path, requested_model=None, hint_model_option=True),
          file=sys.stderr)
    err = capsys.readouterr().err
    assert "no model yet" in err and "--model model.pt" in err


# -------------------------------------------------------------------------------------------------- demo (fast)
def test_demo_model_lives_in_the_demo_folder():
    assert spmamba_demo.demo_model_path("x") == Path("x") / "model" / "demo.pt"


def test_demo_reuses_only_a_model_it_made_with_the_same_settings(tmp_path):
    model = tmp_path / "model" / "demo.pt"
    settings = {"config": "fast", "epochs": None, "train_minutes": 10.0, "n_train": 20, "n_test": 12, "seed": 0,
                "spacing": 2.0}
    assert spmamba_demo.demo_model_status(model, settings, "d1") == (False, "there is none yet")
    model.parent.mkdir(parents=True)
    model.write_bytes(b"a model from elsewhere (e.g. a test's 1-step model)")
    ok, why = spmamba_demo.demo_model_status(model, settings, "d1")
    assert not ok and "did not make it" in why
    prov = {"made_by": "spmamba demo", "settings": settings, "data": "d1",
            "model_sha256": spmamba_demo.sha256_file(model)}
    spmamba_demo.provenance_path(model).write_text(json.dumps(prov))
    ok, why = spmamba_demo.demo_model_status(model, settings, "d1")
    assert ok and "made by `spmamba demo`" in why
    ok, why = spmamba_demo.demo_model_status(model, {**settings, "train_minutes": 2.0}, "d1")
    assert not ok and "train_minutes 10.0 -> 2.0" in why
    ok, why = spmamba_demo.demo_model_status(model, settings, "d2")
    assert not ok and "training volumes changed" in why
    spmamba_demo.provenance_path(model).write_text(json.dumps({**prov, "stopped_early": True}))
    ok, why = spmamba_demo.demo_model_status(model, settings, "d1")
    assert not ok and "stopped early" in why
    spmamba_demo.provenance_path(model).write_text(json.dumps(prov))
    model.write_bytes(b"replaced by hand")
    ok, why = spmamba_demo.demo_model_status(model, settings, "d1")
    assert not ok and "changed after" in why
    spmamba_demo.provenance_path(model).write_text(json.dumps({**prov, "made_by": "someone"}))
    assert not spmamba_demo.demo_model_status(model, settings, "d1")[0]


def test_demo_serves_from_its_own_folder(tiny_data, tmp_path, capsys, no_server):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_data, demo)  # data present: nothing is generated
    model = _fake_model(tmp_path / "given.pt")
    assert main(["demo", "--dir", str(demo), "--model", str(model), "--port", str(_free_port()), "-q"]) == 0
    (call,) = no_server
    assert call["conf"]["model"] == str(model.resolve())
    assert call["conf"]["model_dir"] == str((demo / "model" / "app").resolve())  # retrained models stay in ./demo
    assert Path(call["log_dir"]) == (demo / "logs").resolve()
    assert "using existing model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- real server (slow)
@pytest.fixture(scope="module")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("serve_model") / "model.pt"
    assert main(["train", "--normal", str(tiny_data / "train"), "--out", str(model), "--config", "tiny",
                 "--epochs", "1", "--max-steps", "2", "--device", "cpu", "-q"]) == 0
    return model


def _wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text(errors="replace")
        if needle in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {needle!r}:\n{text[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {needle!r} within {timeout:.0f} s:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
def test_serve_ctrl_c_stops_the_server_and_its_children_quietly(tiny_data, tiny_model, tmp_path):
    psutil = pytest.importorskip("psutil")
    studies = tmp_path / "studies"
    studies.mkdir()
    for p in sorted((tiny_data / "train").glob("*.nii.gz")) + sorted((tiny_data / "test" / "images").glob("*.nii.gz")):
        shutil.copy(p, studies / p.name)
    port = _free_port()
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "spmamba", "serve", "--studies", str(studies), "--model", str(tiny_model),
           "--port", str(port), "--log-dir", str(tmp_path / "logs"), "--conf", f"model_dir={tmp_path / 'model_dir'}"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # its own process group, like a command in a terminal: Ctrl-C = SIGINT to that whole group
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(tmp_path), start_new_session=True)
        try:
            text = _wait_for(err_path, "stop       Ctrl-C", proc, timeout=240)
            assert f"serving model {tiny_model}" in text and "preset tiny" in text
            assert '"Anomaly Detection" module' in text

            # the printed way to list the studies works against this server
            line = next(ln for ln in text.splitlines() if "curl -s '" in ln and "datastore" in ln)
            argv = shlex.split(line.split(None, 1)[1])
            if shutil.which("curl"):
                listing = json.loads(subprocess.run(argv, capture_output=True, timeout=30, check=True).stdout)
            else:
                with urllib.request.urlopen(argv[-1], timeout=30) as r:
                    listing = json.loads(r.read())
            assert {p.name.split(".")[0] for p in studies.glob("*.nii.gz")} <= set(listing["objects"])

            # the start-up scoring runs in a child of the server: Ctrl-C while it runs printed a long traceback
            server = psutil.Process(proc.pid).children()[0]
            deadline = time.time() + 30
            while time.time() < deadline and not server.children():
                time.sleep(0.2)
            family = [server] + server.children(recursive=True)
            t0 = time.time()
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=60)
            took = time.time() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert took < 30
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.rstrip().endswith("[serve] stopped")
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"


@pytest.mark.slow
def test_demo_trains_into_its_folder_and_reuses_only_its_own_model(tiny_data, tmp_path, capsys):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_data, demo)
    args = ["demo", "--dir", str(demo), "--config", "tiny", "--epochs", "1", "--train-minutes", "0.3",
            "--device", "cpu", "--no-serve", "-q"]
    t0 = time.time()
    assert main(args) == 0
    took = time.time() - t0
    model = demo / "model" / "demo.pt"
    prov = json.loads((demo / "model" / "demo.pt.provenance.json").read_text())
    assert prov["made_by"] == "spmamba demo" and prov["settings"]["train_minutes"] == 0.3
    err = capsys.readouterr().err
    assert "training a quick model" in err and "at most 0.3 min of wall time" in err
    assert "[demo] model: version" in err and "made by `spmamba demo`" in err
    assert took < 0.3 * 60 + 15  # the training's wall-time bound, plus preparing the studies

    assert main(args) == 0  # same settings, same volumes: reused
    err = capsys.readouterr().err
    assert "using existing model" in err and "made by `spmamba demo` with these settings" in err
    before = model.stat().st_mtime_ns

    assert main([a if a != "0.3" else "0.25" for a in args]) == 0  # other settings: not reused
    err = capsys.readouterr().err
    assert "not using" in err and "train_minutes 0.3 -> 0.25" in err and "training a quick model" in err
    assert model.stat().st_mtime_ns != before
