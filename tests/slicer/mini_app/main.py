"""A minimal MONAI Label app for the Slicer module's client tests: a real server, a trivial float "heatmap".

Not the product (that is apps/spmamba_app): it lets the tests check the module's detect path (upload, multipart
answer from MONAI Label's own encoder, float heatmap on the input grid) without a trained SP-Mamba model.
Heatmap = |intensity - mean| / std of the input, written on the input's grid (.nii.gz with nibabel, .nrrd with
pynrrd, header copied).
"""
import tempfile

import numpy as np
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

PIXEL_THRESHOLD = 2.0


class ZScoreHeatmap(InferTask):
    def __init__(self):
        super().__init__(type=InferType.OTHERS, labels=[], dimension=3, description="z-score heatmap (test only)")

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        path = request["image"]
        if path.endswith(".nrrd"):
            import nrrd

            data, header = nrrd.read(path)
            heat = self._heat(data)
            out = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False).name
            keep = {k: header[k] for k in ("space", "space directions", "space origin", "kinds") if k in header}
            nrrd.write(out, heat, header=keep)
        else:
            import nibabel as nib

            img = nib.load(path)
            heat = self._heat(np.asarray(img.dataobj))
            out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
            nib.save(nib.Nifti1Image(heat, img.affine), out)
        score = float(heat.max())
        return out, {"score": score, "threshold": 3.0, "pixel_threshold": PIXEL_THRESHOLD,
                     "verdict": "abnormal" if score > 3.0 else "normal", "model_version": "mini-1",
                     "shape": list(heat.shape)}

    @staticmethod
    def _heat(data):
        data = np.asarray(data, np.float64)
        return (np.abs(data - data.mean()) / (data.std() + 1e-6)).astype(np.float32)


class MiniApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="mini", description="test app",
                         version="0")

    def init_infers(self):
        return {"spmamba": ZScoreHeatmap()}
