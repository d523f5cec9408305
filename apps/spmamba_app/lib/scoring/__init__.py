from .anomaly import AnomalyScoring, cached_score, score_study

__all__ = ["AnomalyScoring", "cached_score", "score_study"]
