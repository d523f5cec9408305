from .anomaly import AnomalyInfer, AnomalySegmentationInfer, Detection

__all__ = ["AnomalyInfer", "AnomalySegmentationInfer", "Detection"]
