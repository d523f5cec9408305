"""A model file written before the method seam (no 'method' tag; tests/data/make_spmamba_v0_tiny.py) still loads as
SP-Mamba, keeps its version string and gives the same heatmap, bit for bit."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spmamba
from spmamba.checkpoint import load_checkpoint
from spmamba.detector import Detector

DATA = Path(__file__).resolve().parents[1] / "data"
OLD = DATA / "spmamba_v0_tiny.pt"


def test_old_file_has_no_method_tag():
    assert "method" not in load_checkpoint(OLD)


def test_old_file_loads_as_spmamba_with_its_version():
    det = Detector.load(OLD, device="cpu")
    assert det.version == load_checkpoint(OLD)["version"] == "1bb78b5c72b3"
    assert det.method_name == "spmamba"
    assert det.checkpoint_payload()["method"] == "spmamba"  # saved again, it names its method


def test_old_file_gives_the_same_heatmap_with_the_compiled_scan(monkeypatch):
    """The default CPU path (numba kernels) gives the old file's heatmap up to float32 rounding."""
    monkeypatch.setenv("SPMAMBA_SCAN", "numba")
    exp = np.load(DATA / "spmamba_v0_tiny_expected.npz")
    res = Detector.load(OLD, device="cpu").detect(exp["input"], exp["affine"])
    assert res.heatmap.shape == exp["heatmap"].shape
    np.testing.assert_allclose(res.heatmap, exp["heatmap"], rtol=1e-4, atol=1e-5 * float(np.abs(exp["heatmap"]).max()))
    assert res.score == pytest.approx(float(exp["score"]), rel=1e-4)


# The bit-for-bit check runs in a child process because what decides the last bits is fixed when torch starts:
# one torch thread and the PyTorch scan (float sums split over more threads, or done in another order by the compiled
# scan, differ in the last bits), and oneDNN's instruction set: its convolutions pick AVX-512 kernels where the CPU
# has them and AVX2 ones elsewhere, with different rounding (measured: 556 of the heatmap's voxels differ by 1-2
# ulp on an AVX-512 machine). The expected heatmap was written with AVX2 kernels; ONEDNN_MAX_CPU_ISA=AVX2 pins
# them on any x86-64 CPU that has AVX2.
_CHILD = """
import sys
import numpy as np, torch
torch.set_num_threads(1)
from spmamba.detector import Detector
exp = np.load(sys.argv[1])
res = Detector.load(sys.argv[2], device="cpu").detect(exp["input"], exp["affine"])
np.savez(sys.argv[3], heatmap=res.heatmap, score=res.score, slice_scores=np.array(res.slice_scores, dtype=np.float64))
"""


def test_old_file_gives_the_same_heatmap_bit_for_bit(tmp_path):
    out = tmp_path / "got.npz"
    env = {**os.environ, "SPMAMBA_SCAN": "torch", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(spmamba.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _CHILD, str(DATA / "spmamba_v0_tiny_expected.npz"), str(OLD), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    exp, got = np.load(DATA / "spmamba_v0_tiny_expected.npz"), np.load(out)
    assert got["heatmap"].dtype == exp["heatmap"].dtype
    assert np.array_equal(got["heatmap"], exp["heatmap"]), np.abs(got["heatmap"] - exp["heatmap"]).max()
    assert float(got["score"]) == float(exp["score"])
    assert np.array_equal(got["slice_scores"], exp["slice_scores"])
