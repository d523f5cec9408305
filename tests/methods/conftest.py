"""The seam tests import the toy method from this folder (and pass it to subprocesses through PYTHONPATH)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def normals():
    """5 normal box volumes (method_helpers.box_volume) on 2 x 2 x 3 mm voxels."""
    from method_helpers import AFFINE, box_volume

    from spmamba.io import Volume

    rng = np.random.default_rng(0)
    return [Volume(box_volume(rng), AFFINE) for _ in range(5)]
