"""Shared fixtures for the CLI tests: a tiny synthetic data set made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_SPACING = "6"  # 6 mm grid: about 33 x 39 x 34 voxels, generated in a fraction of a second


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`spmamba synth` output with 4 normal training and 4 test volumes (2 abnormal) on a 6 mm grid."""
    from spmamba.cli import main

    out = tmp_path_factory.mktemp("synth") / "data"
    rc = main(["synth", str(out), "--n-train", "4", "--n-test", "4", "--seed", "1", "--spacing", TINY_SPACING,
               "--families", "tumour,haemorrhage", "-q"])
    assert rc == 0
    return out
