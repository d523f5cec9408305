from .settings import (
    CURATION_KEY,
    CURATION_STATES,
    SCORE_KEY,
    AppSettings,
    parse_conf,
)

__all__ = ["CURATION_KEY", "CURATION_STATES", "SCORE_KEY", "AppSettings", "parse_conf"]
