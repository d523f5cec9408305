from .anomaly import AnomalyInfer, AnomalySegmentationInfer

__all__ = ["AnomalyInfer", "AnomalySegmentationInfer"]
