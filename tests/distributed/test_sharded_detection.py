"""`spmamba detect --shard K/N`: shards of the inputs give, merged, what one unsharded run gives; a shard killed
half-way and run again does only what was missing; `--merge` refuses an unfinished or mixed set of shards."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ddp_helpers import process_env, stop

SLOW_DETECT = '''
import os, time
from spmamba.detector import Detector
_orig = Detector.detect
def _slow(self, *a, **kw):
    time.sleep(float(os.environ["SPMAMBA_TEST_DETECT_SLEEP"]))
    return _orig(self, *a, **kw)
Detector.detect = _slow
'''


@pytest.fixture(scope="module")
def model_and_inputs(tmp_path_factory):
    """A tiny model (untrained, calibrated on one volume: detection is all these tests need) and 6 tiny volumes."""
    from core_helpers import small_volumes
    from spmamba.detector import Detector
    from spmamba.io import save_volume
    from spmamba.models import SPMamba, get_config
    from spmamba.train import calibrate

    root = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    det = Detector(SPMamba(get_config("tiny")), device="cpu")
    det.calibration = calibrate(det, small_volumes(1, seed=9))
    model = det.save(root / "tiny.pt")
    inputs = root / "inputs"
    inputs.mkdir()
    for i, v in enumerate(small_volumes(6, seed=5)):
        save_volume(v.array, v.affine, inputs / f"case{i}.nii.gz")
    return model, inputs


def detect(*args: str) -> int:
    from spmamba.cli import main

    return main(["detect", "-q", *args])


def heatmaps(folder: Path) -> dict:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*_anomaly.nii.gz"))}


def same_results(a: Path, b: Path) -> None:
    assert (a / "scores.csv").read_text() == (b / "scores.csv").read_text()
    ha, hb = heatmaps(a), heatmaps(b)
    assert ha.keys() == hb.keys() and all(np.array_equal(ha[k], hb[k]) for k in ha)


def test_two_shards_equal_one_run(tmp_path, model_and_inputs, capsys):
    from spmamba.results import read_detect_meta

    model, inputs = model_and_inputs
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert detect("--model", str(model), str(inputs), "--out", str(one)) == 0
    assert detect("--model", str(model), str(inputs), "--out", str(sharded), "--shard", "1/2") == 0
    assert not (sharded / "scores.csv").exists() and "waiting for shard(s) 0/2" in capsys.readouterr().out
    assert detect("--merge", str(sharded)) == 2  # shard 0 not run yet
    assert "0/2 not finished" in capsys.readouterr().err
    assert detect("--model", str(model), str(inputs), "--out", str(sharded), "--shard", "0/2") == 0
    assert "scores.csv built" in capsys.readouterr().out  # the last shard merges
    same_results(one, sharded)
    meta = read_detect_meta(sharded)
    assert meta["shards"] == 2 and meta["n_done"] == meta["n_inputs"] == 6 and meta["version"] == read_detect_meta(one)["version"]
    assert len(list(sharded.glob("scores.shard-*-of-2.csv"))) == 2
    assert detect("--merge", str(sharded)) == 0  # merging again gives the same
    same_results(one, sharded)
    # another shard count in the same folder, bad --shard values, --merge with inputs: clear errors, exit 2
    assert detect("--model", str(model), str(inputs), "--out", str(sharded), "--shard", "0/3") == 2
    assert "in 2 shards" in capsys.readouterr().err
    for bad in ("2/2", "x", "1/0"):
        assert detect("--model", str(model), str(inputs), "--out", str(tmp_path / "b"), "--shard", bad) == 2
    assert detect("--merge", str(sharded), str(inputs)) == 2
    assert detect("--merge", str(tmp_path / "nowhere")) == 2


def test_torchrun_environment_chooses_the_shard(tmp_path, model_and_inputs, monkeypatch):
    model, inputs = model_and_inputs
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert detect("--model", str(model), str(inputs), "--out", str(tmp_path / "r")) == 0
    rows = list(csv.DictReader(open(tmp_path / "r" / "scores.shard-2-of-3.csv")))
    assert [r["id"] for r in rows] == ["case2", "case5"]  # positions 2, 5 of the inputs sorted by id


@pytest.mark.slow
def test_a_killed_shard_reruns_only_what_is_missing(tmp_path, model_and_inputs, monkeypatch):
    model, inputs = model_and_inputs
    out = tmp_path / "out"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_DETECT)
    # as many threads as this process: the same sums in the same order, the same heatmaps to the bit
    env = process_env(SPMAMBA_TEST_DETECT_SLEEP="0.8", OMP_NUM_THREADS=str(torch.get_num_threads()))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    scores = out / "scores.shard-0-of-1.csv"
    proc = subprocess.Popen([sys.executable, "-m", "spmamba", "detect", "-q", "--model", str(model), str(inputs),
                             "--out", str(out), "--shard", "0/1"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it once 2 of the 6 volumes are done
        deadline = time.time() + 120
        while time.time() < deadline and (not scores.exists() or len(scores.read_text().splitlines()) < 3):
            time.sleep(0.05)
    finally:
        stop(proc)
    done_before = [r["id"] for r in csv.DictReader(open(scores))]
    assert 2 <= len(done_before) < 6, done_before
    with open(scores, "a") as fh:  # as if killed in the middle of writing a row
        fh.write("case5,0.12")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*_anomaly.nii.gz")}

    from spmamba.detector import Detector

    detected = []
    orig = Detector.detect
    monkeypatch.setattr(Detector, "detect", lambda self, *a, **kw: detected.append(kw.get("name")) or orig(self, *a, **kw))
    assert detect("--model", str(model), str(inputs), "--out", str(out), "--shard", "0/1") == 0
    assert sorted(Path(n).name for n in detected) == sorted(f"{i}.nii.gz" for i in
                                                            {f"case{k}" for k in range(6)} - set(done_before))
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items() if n[:-len("_anomaly.nii.gz")]
               in done_before)  # what was done is not written again
    one = tmp_path / "one"
    monkeypatch.setattr(Detector, "detect", orig)
    assert detect("--model", str(model), str(inputs), "--out", str(one)) == 0
    same_results(one, out)
