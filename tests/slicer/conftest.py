"""Fixtures for the Slicer module's headless tests (slicer-core from PyPI: MRML without Qt or slicer.app)."""
from __future__ import annotations

import sys

import pytest

from slicer_paths import MODULE_DIR

if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)  # what Slicer does for a scripted module's folder

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is needed for the Slicer module's tests")


@pytest.fixture()
def scene():
    """A fresh MRML scene as ``slicer.mrmlScene`` with Red/Yellow/Green slice views."""
    from AnomalyDetectionLib import testing

    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    testing.ensure_slice_views()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(True)
    slicer.mrmlScene = previous
