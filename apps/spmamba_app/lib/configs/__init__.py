from .settings import (
    CURATION_KEY,
    CURATION_STATES,
    SCORE_KEY,
    AppSettings,
    ConfError,
    parse_conf,
)

__all__ = ["CURATION_KEY", "CURATION_STATES", "SCORE_KEY", "AppSettings", "ConfError", "parse_conf"]
