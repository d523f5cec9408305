"""Write a volume as a DICOM image series (pydicom), for synthetic studies in a PACS and for tests.

``write_dicom_series(array, affine, folder)`` writes one single-frame MR (or CT) image per slice, with the geometry of
the voxel -> RAS ``affine`` (converted to DICOM's LPS patient coordinates) and the float intensities quantised to
16-bit integers with a rescale slope and intercept (at most half a slope off). ``spmamba.io.load_volume(folder)``
reads it back on the same grid.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["write_dicom_series", "MR_IMAGE_STORAGE", "CT_IMAGE_STORAGE"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_dicom_series(array: np.ndarray, affine: np.ndarray, folder: Union[str, Path], *,
                       patient_id: str = "SPMAMBA-PHANTOM", patient_name: str = "Phantom^Synthetic",
                       study_uid: Optional[str] = None, series_uid: Optional[str] = None,
                       series_description: str = "synthetic phantom", series_number: int = 1,
                       modality: str = "MR", study_description: str = "SP-Mamba synthetic study") -> dict:
    """Write ``array`` (X, Y, Z) as one DICOM file per Z slice into ``folder`` (created); returns the UIDs
    ``{"study_uid", "series_uid", "frame_of_reference_uid", "sop_instance_uids", "files", "slope", "intercept"}``.

    X runs along a row (DICOM columns), Y along a column (rows); ``affine`` must be orthogonal (no shear)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"write_dicom_series needs a 3-D array, got shape {a.shape}")
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    directions = lps[:3, :3] / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-4):
        raise ValueError("write_dicom_series needs an orthogonal (unsheared) affine")
    lo, hi = float(a.min()), float(a.max())
    slope = (hi - lo) / 60000.0 if hi > lo else 1.0
    stored = np.rint((a - lo) / slope).astype(np.int32) - 30000  # int16 range, intercept below
    intercept = lo + 30000 * slope
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
    now = datetime.datetime.now()
    uids, files = [], []
    for k in range(a.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDescription, ds.SeriesDescription = study_description, series_description
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, int(series_number), k + 1
        ds.Manufacturer = "SP-Mamba synthetic"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "SECONDARY"]
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.EchoTrainLength = 1
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([directions[:, 0], directions[:, 1]])]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows (Y), between columns (X)
        ds.SliceThickness = float(spacing[2])
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(a.shape[1]), int(a.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.RescaleType = "US"
        frame = np.ascontiguousarray(stored[:, :, k].T.astype(np.int16))  # (rows = Y, columns = X)
        ds.PixelData = frame.tobytes()
        ds.save_as(str(path), write_like_original=False)
        uids.append(sop_uid)
        files.append(str(path))
    return {"study_uid": study_uid, "series_uid": series_uid, "frame_of_reference_uid": frame_uid,
            "sop_instance_uids": uids, "files": files, "slope": float(f"{slope:.10g}"),
            "intercept": float(f"{intercept:.10g}")}
