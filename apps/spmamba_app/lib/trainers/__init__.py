from .anomaly import AnomalyTrain

__all__ = ["AnomalyTrain"]
