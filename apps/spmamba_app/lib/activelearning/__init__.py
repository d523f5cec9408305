from .anomaly import MostAnomalousUnreviewed, SuspectNormal

__all__ = ["MostAnomalousUnreviewed", "SuspectNormal"]
