"""A model file written before the method seam (no 'method' tag; tests/data/make_spmamba_v0_tiny.py) still loads as
SP-Mamba, keeps its version string and gives the same heatmap, bit for bit."""
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.fixture()
def one_thread(monkeypatch):
    """The expected heatmap was made with one torch thread and the PyTorch scan: float sums split over more threads
    (or done in another order by the compiled scan) differ in the last bits, so 'bit for bit' holds at a fixed
    thread count and scan path (any machine, any OMP_NUM_THREADS)."""
    monkeypatch.setenv("SPMAMBA_SCAN", "torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_old_file_gives_the_same_heatmap_with_the_compiled_scan(monkeypatch):
    """The default CPU path (numba kernels) gives the old file's heatmap up to float32 rounding."""
    monkeypatch.setenv("SPMAMBA_SCAN", "numba")
    exp = np.load(DATA / "spmamba_v0_tiny_expected.npz")
    res = Detector.load(OLD, device="cpu").detect(exp["input"], exp["affine"])
    assert res.heatmap.shape == exp["heatmap"].shape
    np.testing.assert_allclose(res.heatmap, exp["heatmap"], rtol=1e-4, atol=1e-5 * float(np.abs(exp["heatmap"]).max()))
    assert res.score == pytest.approx(float(exp["score"]), rel=1e-4)


def test_old_file_gives_the_same_heatmap_bit_for_bit(one_thread):
    exp = np.load(DATA / "spmamba_v0_tiny_expected.npz")
    det = Detector.load(OLD, device="cpu")
    res = det.detect(exp["input"], exp["affine"])
    assert res.heatmap.dtype == exp["heatmap"].dtype
    assert np.array_equal(res.heatmap, exp["heatmap"])
    assert res.score == float(exp["score"])
    assert np.array_equal(np.array(res.slice_scores, dtype=np.float64), exp["slice_scores"])
