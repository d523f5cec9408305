"""Synthetic cases shared by the module's in-Slicer Test class and the headless tests (numpy + MRML, no Qt)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import slicer
import vtk

#: Blobs written into the synthetic heatmap: (i0, i1, j0, j1, k0, k1, value); voxel (i, j, k) of the volume.
SYNTHETIC_BLOBS = (
    (4, 8, 5, 9, 3, 5, 0.9),  # 4 x 4 x 2 = 32 voxels, peak 0.9
    (14, 17, 12, 14, 8, 11, 0.7),  # 3 x 2 x 3 = 18 voxels, peak 0.7
    (20, 21, 2, 3, 12, 13, 0.6),  # 1 voxel, peak 0.6
)
SYNTHETIC_SHAPE_IJK = (24, 20, 16)
SYNTHETIC_SPACING = (1.5, 2.0, 2.5)
SYNTHETIC_ORIGIN = (-10.0, 20.0, -30.0)
SYNTHETIC_BACKGROUND = 0.1  # heatmap value outside the blobs (below every threshold used in the tests)


def synthetic_arrays(seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(image, heatmap) float32 arrays indexed [i, j, k] (the NIfTI/nibabel order)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, SYNTHETIC_SHAPE_IJK).astype(np.float32)
    heat = np.full(SYNTHETIC_SHAPE_IJK, SYNTHETIC_BACKGROUND, np.float32)
    for i0, i1, j0, j1, k0, k1, v in SYNTHETIC_BLOBS:
        heat[i0:i1, j0:j1, k0:k1] = v
        image[i0:i1, j0:j1, k0:k1] += 80.0
    return image, heat


def expected_regions(threshold: float) -> List[Dict[str, float]]:
    """Regions the Logic must find at ``threshold`` (sorted by peak, highest first): blobs whose float32 value is
    at or above the threshold rounded to float32 (the library's rule, ``heatmap >= threshold``).

    Each region also carries what the SP-Mamba app sends in its infer JSON: ``label``, ``mean``, ``peak_voxel`` and
    ``centroid_voxel`` ([i, j, k]).
    """
    voxel = float(np.prod(SYNTHETIC_SPACING))
    out = []
    for i0, i1, j0, j1, k0, k1, v in sorted(SYNTHETIC_BLOBS, key=lambda b: -b[6]):
        if np.float32(v) >= np.float32(threshold):
            n = (i1 - i0) * (j1 - j0) * (k1 - k0)
            centroid_ijk = ((i0 + i1 - 1) / 2.0, (j0 + j1 - 1) / 2.0, (k0 + k1 - 1) / 2.0)
            ras = tuple(o + s * c for o, s, c in zip(SYNTHETIC_ORIGIN, SYNTHETIC_SPACING, centroid_ijk))
            out.append({"label": len(out) + 1, "n_voxels": n, "volume_mm3": n * voxel, "peak": v,
                        "mean": float(np.float32(v)), "peak_voxel": [i0, j0, k0],
                        "centroid_voxel": list(centroid_ijk), "centroid_ras": ras})
    return out


def ijk_to_ras() -> np.ndarray:
    m = np.diag(list(SYNTHETIC_SPACING) + [1.0])
    m[:3, 3] = SYNTHETIC_ORIGIN
    return m


def add_volume(array_ijk: np.ndarray, name: str):
    """Add a scalar volume from an [i, j, k] array with the synthetic geometry (through MRML, no file)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras()[r, c]))
    node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    node.CreateDefaultDisplayNodes()
    return node


def make_synthetic_case(logic, directory: str) -> Tuple[object, str]:
    """Add the synthetic input volume to the scene and write its heatmap as ``directory/heat.nrrd``.

    The heatmap file is written through MRML (as a server's float32 result would arrive) and the node used to
    write it is removed again, so the Logic has to load the file itself.
    """
    image, heat = synthetic_arrays()
    reference = add_volume(image, "synthetic")
    heat_node = add_volume(heat, "heat-to-file")
    path = os.path.join(directory, "heat.nrrd")
    logic.write_volume(heat_node, path)
    slicer.mrmlScene.RemoveNode(heat_node)
    return reference, path


def ensure_slice_views() -> None:
    """Make Red/Yellow/Green slice and slice-composite nodes when the scene has none (headless scenes)."""
    if slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") > 0:
        return
    for name in ("Red", "Yellow", "Green"):
        slice_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
