"""3-D smoothing of the assembled heatmap inside the foreground, in millimetres on the canonical grid."""
import nibabel as nib
import numpy as np
import pytest

from spmamba.preprocessing import Preprocessing, to_canonical
from spmamba.scoring import smooth_within_mask


def test_smoothing_only_averages_inside_the_mask():
    mask = np.zeros((12, 12, 12), bool)
    mask[2:10, 2:10, 2:10] = True
    flat = np.where(mask, 3.0, 0.0)
    out = smooth_within_mask(flat, mask, (1.0, 1.0, 1.0))
    # a constant map stays constant up to the brain surface (no dip from the zeros outside), and 0 outside
    assert np.allclose(out[mask], 3.0, atol=1e-5) and np.all(out[~mask] == 0)
    spike = np.where(mask, 0.0, 0.0)
    spike[6, 6, 6] = 1.0
    s = smooth_within_mask(spike, mask, (1.0, 1.0, 1.0))
    assert 0 < s[6, 6, 6] < 1 and s[6, 6, 7] > 0 and s[7, 6, 6] > 0 and s.sum() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_canonical_spacing_follows_the_reorientation(slice_axis):
    affine = np.array([[0, 0, 3.0, 0], [-1.5, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    zooms = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)).header.get_zooms()
    expected = [zooms[slice_axis]] + [z for i, z in enumerate(zooms) if i != slice_axis]
    assert np.allclose(to_canonical(np.zeros((4, 5, 6)), affine).spacing_slice_first(slice_axis), expected)
    assert np.allclose(to_canonical(np.zeros((4, 5, 6)), None).spacing_slice_first(slice_axis), 1.0)


def test_detector_smooths_across_slices_by_default_and_old_files_do_not(tmp_path):
    from spmamba.detector import Detector
    from spmamba.models import SPMamba

    rng = np.random.default_rng(0)
    vol = np.zeros((24, 28, 8), np.float32)
    vol[4:20, 5:23, :] = 1 + 0.2 * rng.standard_normal((16, 18, 8))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    model = SPMamba("tiny")
    raw = Detector(model, Preprocessing(heatmap_sigma_mm=0.0), device="cpu").detect(vol, affine)
    smooth = Detector(model, Preprocessing(), device="cpu").detect(vol, affine)
    jump = lambda h: np.abs(np.diff(h[6:18, 7:21, :], axis=2)).mean()  # noqa: E731  (inside the foreground)
    assert Preprocessing().heatmap_sigma_mm == 2.0
    assert jump(smooth.heatmap) < 0.7 * jump(raw.heatmap)
    assert np.all(smooth.heatmap[~smooth.foreground] == 0)
    assert Preprocessing.from_dict({"slice_axis": 2}).heatmap_sigma_mm == 0.0
