"""SP-Mamba's presets as dataclasses: the architecture (with its loss and score constants) and, under ``training``,
the optimisation settings (``methods.TrainingSettings``). A checkpoint stores the preset it was trained with."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..methods.base import MethodConfig, TrainingSettings


@dataclass(frozen=True)
class SPMambaConfig(MethodConfig):
    """Everything that defines an SP-Mamba model and its scoring; ``training`` says how it is optimised.

    Sizes follow the paper at 256x256: encoder levels 64x64x64, 32x32x128, 16x16x256, bottleneck 8x8x512.
    At other input sizes every map scales by image_size/256 (the bottleneck side is image_size/32).
    """

    name: str = "paper"
    image_size: int = 256
    encoder: str = "resnet34"  # resnet18 | resnet34 (MONAI's 2-D ResNet, torchvision parameter names)
    # encoder BatchNorm statistics: "adapt" re-estimates them on the training normals before training (AdaBN;
    # ResNetEncoder.adapt_batchnorm says why a random encoder needs it), "frozen" keeps those of the weights file,
    # "auto" adapts random encoders and keeps pretrained ones (as published).
    encoder_norm: str = "auto"
    decoder_dims: tuple[int, ...] = (512, 256, 128, 64)
    decoder_depths: tuple[int, ...] = (3, 4, 6, 3)
    # "mamba" (SP-Mamba's LSS/SS2D decoder) | "cnn" (RD4AD-style convolutional student, a reference baseline;
    # decoder_depths, scan and SSM settings are then unused)
    decoder: str = "mamba"
    d_state: int = 16
    ssm_expand: int = 2
    drop_path: float = 0.2
    scan: str = "ch"  # ch | hilbert | raster
    n_directions: int = 8
    use_prototypes: bool = True
    n_prototypes: int = 5
    prototype_window: int = 3
    # loss: sum over levels of mse_weight * MSE + prototype_weight * mean(d_up)
    mse_weight: float = 5.0
    prototype_weight: float = 25.0
    # anomaly map: mean(1 - cos) over levels (weighted by map_level_weights: encoder level1, level2, level3; equal
    # as published), Gaussian blur, + map_prototype_weight * d_up
    map_level_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    map_blur_sigma: float = 4.0
    map_prototype_weight: float = 0.5
    # image score: max(A) + score_beta * contrast + score_gamma * concentration
    use_score_terms: bool = True
    score_beta: float = 3750.0
    score_gamma: float = -0.08
    # optimisation (paper: AdamW lr 0.005 * batch / 16, wd 1e-4, lr x0.1 at 80%, clip 5, 1000 epochs, batch 16)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    TUPLE_SETTINGS = ("decoder_dims", "decoder_depths", "map_level_weights")

    @property
    def bottleneck_size(self) -> int:
        return self.image_size // 32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_dims"] = list(self.decoder_dims)
        d["decoder_depths"] = list(self.decoder_depths)
        d["map_level_weights"] = list(self.map_level_weights)
        return d

    def validate(self) -> None:
        s = self.image_size
        if s < 64 or s & (s - 1):
            raise ValueError(f"image_size must be a power of two >= 64 (the CH scan needs 2**k maps), got {s}")
        if len(self.decoder_dims) != 4 or len(self.decoder_depths) != 4:
            raise ValueError("decoder_dims and decoder_depths need 4 entries (bottleneck stage + 3 levels)")
        if tuple(self.decoder_dims) != (512, 256, 128, 64):
            raise ValueError("decoder_dims must be (512, 256, 128, 64): the decoder's levels are compared with the "
                             "ResNet encoder's 256/128/64-channel levels")
        if self.encoder not in ("resnet18", "resnet34"):
            raise ValueError(f"encoder must be resnet18 or resnet34, got {self.encoder!r}")
        if self.encoder_norm not in ("auto", "adapt", "frozen"):
            raise ValueError(f"encoder_norm must be auto, adapt or frozen, got {self.encoder_norm!r}")
        if self.decoder not in ("mamba", "cnn"):
            raise ValueError(f"decoder must be mamba or cnn, got {self.decoder!r}")
        w = tuple(self.map_level_weights)
        if len(w) != 3 or any(not (x >= 0) for x in w) or sum(w) <= 0:
            raise ValueError(f"map_level_weights must be 3 non-negative weights (encoder level1, level2, level3) with a "
                             f"positive sum, got {list(w)}")
        if self.n_directions not in (1, 2, 4, 8):
            raise ValueError("n_directions must be 1, 2, 4 or 8")


PRESETS: dict[str, SPMambaConfig] = {
    # As published (MambaAD/SP-Mamba): 256x256, ResNet34, decoder 512/256/128/64 x 3/4/6/3 VSS layers.
    "paper": SPMambaConfig(),
    # For a 2-core CPU: 128x128 input (bottleneck 4x4), one LSS block with one VSS layer per stage, SS2D with
    # expand 1 and 8 states (4x less scan work per token than the paper's expand 2 / 16 states); the same
    # encoder, 8-direction CH scan, window-sliding prototypes, loss and score. The map uses the finest level
    # only (level1, 32x32 at 128 px): within a CPU budget the coarse levels (16x16, 8x8; 13 mm and 26 mm per
    # feature on a 2 mm brain) blur lesions and add position-normalised noise (docs/BENCHMARKS.md, "Which levels
    # the map uses"); all three are still distilled, and level1's decoder output depends on the others.
    "fast": SPMambaConfig(
        name="fast", image_size=128, decoder_depths=(1, 1, 1, 1), ssm_expand=1, d_state=8,
        drop_path=0.1, map_blur_sigma=2.0, map_level_weights=(1.0, 0.0, 0.0), training=TrainingSettings(batch_size=16, base_lr=0.005, epochs=10),
    ),
    # For tests only: seconds per step.
    "tiny": SPMambaConfig(
        name="tiny", image_size=64, encoder="resnet18", decoder_depths=(1, 1, 1, 1), ssm_expand=1,
        drop_path=0.0, n_prototypes=2, map_blur_sigma=1.0,
        training=TrainingSettings(batch_size=4, base_lr=0.005, epochs=2),
    ),
}


def get_config(name_or_config: "str | SPMambaConfig | dict", **overrides: Any) -> SPMambaConfig:
    """A preset by name ("paper", "fast", "tiny"), a config, or a dict of settings; then overrides."""
    if isinstance(name_or_config, SPMambaConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = SPMambaConfig.from_dict(name_or_config)
    else:
        try:
            cfg = PRESETS[name_or_config]
        except KeyError:
            raise ValueError(f"unknown preset {name_or_config!r}; choose one of {sorted(PRESETS)}") from None
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    cfg.validate()
    return cfg


__all__ = ["SPMambaConfig", "PRESETS", "get_config", "field"]
