"""Detection results as DICOM objects that reference their source series (highdicom).

* :func:`parametric_map`: the float32 heatmap as a DICOM Parametric Map (Float Pixel Data, one frame per source
  slice, real-world value mapping "anomaly score, no units"), so any DICOM viewer can show it over the series;
* :func:`segmentation`: the abnormal voxels (``spmamba.scoring.abnormal_voxels``: heatmap at or above the calibrated
  pixel threshold) as a binary DICOM Segmentation with one segment ("Anomaly", a morphologically abnormal
  structure found by an AI algorithm);
* :func:`read_derived_volume`: a Parametric Map or Segmentation back on a volume grid (tests, round trips).

Both objects are in the source series' study and frame of reference and reference every source image
(highdicom fills the Source Image and Referenced Series sequences). The heatmap must be on the grid of the volume
read from that series (``spmamba.io.load_dicom_series``, or MONAI Label's DICOM conversion): each source slice is
located in it from its ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so the volume's voxel order
does not matter, and a heatmap on another grid is refused (:class:`DicomResultError`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["DicomResultError", "parametric_map", "segmentation", "read_derived_volume", "volume_to_frames",
           "PARAMETRIC_MAP_STORAGE", "SEGMENTATION_STORAGE"]

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS


class DicomResultError(ValueError):
    """A result that cannot be written as DICOM for these source images (the message says why)."""


def _frame_indices(affine: np.ndarray, shape: Sequence[int], position, orientation, spacing,
                   rows: int, columns: int, what: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel indices (3 arrays of shape (rows, columns)) of the pixels of one DICOM frame in a volume of ``shape``
    with the voxel -> RAS ``affine``; refuses a frame that does not lie on the volume's voxel grid."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    iop = np.asarray([float(v) for v in orientation])
    row_dir, col_dir = iop[:3] * _FLIP, iop[3:] * _FLIP  # along a row (columns increase), along a column
    d_row, d_col = float(spacing[0]), float(spacing[1])  # between rows, between columns
    origin = np.asarray([float(v) for v in position]) * _FLIP
    base = inv[:3, :3] @ origin + inv[:3, 3]
    step_col = inv[:3, :3] @ (row_dir * d_col)  # voxel-index step for one column to the right
    step_row = inv[:3, :3] @ (col_dir * d_row)  # ... for one row down
    for vec in (base, step_col, step_row):
        if np.abs(vec - np.rint(vec)).max() > 1e-2:
            raise DicomResultError(f"{what}: the result's grid does not match the source slice (off by "
                                   f"{np.abs(vec - np.rint(vec)).max():.3g} voxels); it must be on the grid of "
                                   "the volume read from this series")
    base, step_col, step_row = np.rint(base), np.rint(step_col), np.rint(step_row)
    if np.abs(step_col).sum() != 1 or np.abs(step_row).sum() != 1:
        raise DicomResultError(f"{what}: the source slices' pixel spacing or orientation differ from the result's "
                               "voxel grid")
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    idx = [(base[a] + c * step_col[a] + r * step_row[a]).astype(np.int64) for a in range(3)]
    for a in range(3):
        if idx[a].min() < 0 or idx[a].max() >= shape[a]:
            raise DicomResultError(f"{what}: the source slice lies outside the result's volume {tuple(shape)}")
    return idx[0], idx[1], idx[2]


def _source_geometry(ds) -> Tuple[Sequence[float], Sequence[float], Sequence[float]]:
    try:
        return ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    except AttributeError as e:
        raise DicomResultError(f"source image {getattr(ds, 'SOPInstanceUID', '?')} has no plane position, "
                               "orientation or pixel spacing; results need single-frame slices with geometry") from e


def _check_sources(sources: Sequence) -> list:
    if not sources:
        raise DicomResultError("no source images: results reference the series they were computed on")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise DicomResultError("multi-frame source images are not supported yet for DICOM results; the heatmap is "
                               "still returned as a volume file")
    return list(sources)


def volume_to_frames(volume: np.ndarray, affine: np.ndarray, sources: Sequence) -> np.ndarray:
    """The slices of ``volume`` (X, Y, Z) that correspond to each source image, as frames (n, rows, columns) in the
    order of ``sources``."""
    sources = _check_sources(sources)
    frames = []
    for ds in sources:
        pos, ori, sp = _source_geometry(ds)
        i, j, k = _frame_indices(affine, volume.shape, pos, ori, sp, int(ds.Rows), int(ds.Columns),
                                 f"slice {getattr(ds, 'InstanceNumber', '?')}")
        frames.append(volume[i, j, k])
    return np.stack(frames)


def _common(sources, series_number: int, model_version: str, method: str) -> dict:
    from pydicom.uid import generate_uid

    import spmamba

    return dict(
        source_images=sources,
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="SP-Mamba anomaly detection (open source)",
        manufacturer_model_name=str(method)[:64],
        software_versions=f"spmamba {spmamba.__version__}",
        device_serial_number=str(model_version)[:64],
    )


def parametric_map(heatmap: np.ndarray, affine: np.ndarray, sources: Sequence, *, model_version: str,
                   method: str = "spmamba", pixel_threshold: Optional[float] = None, series_number: int = 9901,
                   series_description: Optional[str] = None):
    """The float32 ``heatmap`` (X, Y, Z; voxel -> RAS ``affine``, the grid of the volume read from ``sources``) as a
    DICOM Parametric Map (pydicom Dataset) referencing ``sources`` (the pydicom headers of the series' slices).
    The display window spans the calibrated ``pixel_threshold`` (when given) to the maximum."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = volume_to_frames(np.asarray(heatmap, dtype=np.float32), affine, sources).astype(np.float32)
    lo, hi = float(frames.min()), float(frames.max())
    low = float(pixel_threshold) if pixel_threshold is not None and lo <= pixel_threshold < hi else lo
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation=f"{method} anomaly score (higher = more anomalous)",
        unit=codes.UCUM.NoUnits,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        pixel_array=frames,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        window_center=(low + hi) / 2.0,
        window_width=max(hi - low, 1e-6),
        content_label="ANOMALY",
        content_description=f"{method} anomaly heatmap, model {model_version}"[:64],
        **_common(sources, series_number, model_version, method),
    )
    pm.SeriesDescription = (series_description or f"Anomaly map ({method} {model_version})")[:64]
    return pm


def segmentation(mask: np.ndarray, affine: np.ndarray, sources: Sequence, *, model_version: str,
                 method: str = "spmamba", series_number: int = 9902, series_description: Optional[str] = None):
    """The abnormal voxels ``mask`` (X, Y, Z, bool or 0/1 on the grid of the volume read from ``sources``) as a
    binary DICOM Segmentation (pydicom Dataset) with one segment, "Anomaly", referencing ``sources``. Every source
    slice gets a frame (empty ones too), so a viewer shows the segment on the whole series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = volume_to_frames(np.asarray(mask) > 0, affine, sources)
    algorithm = hd.AlgorithmIdentificationSequence(name=str(method)[:64],
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   version=str(model_version)[:64])
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        omit_empty_frames=False,
        content_label="ANOMALY",
        content_description=f"{method} abnormal regions, model {model_version}"[:64],
        **_common(sources, series_number, model_version, method),
    )
    seg.SeriesDescription = (series_description or f"Anomalies ({method} {model_version})")[:64]
    return seg


def read_derived_volume(ds, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A Parametric Map (float32 values) or a Segmentation (uint8 0/1, segment 1) placed back on the volume grid
    ``shape`` / ``affine`` by its per-frame plane positions; voxels no frame covers are 0."""
    sop = str(ds.SOPClassUID)
    if sop not in (PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE):
        raise DicomResultError(f"not a Parametric Map or Segmentation (SOP class {sop})")
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.float32 if sop == PARAMETRIC_MAP_STORAGE else np.uint8)
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if sop == SEGMENTATION_STORAGE:
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if number != 1:
                continue
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        i, j, k = _frame_indices(affine, shape, position, orientation, spacing, int(ds.Rows), int(ds.Columns),
                                 f"frame {n + 1}")
        out[i, j, k] = pixels[n]
    return out
