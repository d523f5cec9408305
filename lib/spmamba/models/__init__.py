"""Models: SP-Mamba and its parts."""
from .config import PRESETS, SPMambaConfig, get_config
from .encoder import EncoderWeightsError, ResNetEncoder
from .prototypes import PrototypeBank, prototype_distance, prototype_distance_loop
from .spmamba import SPMamba, SPMambaOutput

__all__ = [
    "PRESETS", "SPMambaConfig", "get_config", "EncoderWeightsError", "ResNetEncoder", "PrototypeBank",
    "prototype_distance", "prototype_distance_loop", "SPMamba", "SPMambaOutput",
]
