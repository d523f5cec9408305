"""Fixtures of the multi-process tests: tiny normal volumes in a folder (helpers: ``ddp_helpers``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "core"):  # ddp_helpers, ddp_worker, core_helpers
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


@pytest.fixture(scope="session")
def normal_folder(tmp_path_factory) -> Path:
    """5 tiny normal volumes (24 x 28 x 6 voxels) as .nii.gz files."""
    from core_helpers import small_volumes
    from spmamba.io import save_volume

    folder = tmp_path_factory.mktemp("normals")
    for i, v in enumerate(small_volumes(5)):
        save_volume(v.array, v.affine, folder / f"normal{i}.nii.gz")
    return folder
