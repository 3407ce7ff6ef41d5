"""The one definition of MVCustom's architecture and of its training loss (issue 16, gap 3).

:class:`ArchitectureConfig` is what the model library builds (``mvcustom.models.MVCustomConfig``
adds the subject tokens to it) *and* what the training config's ``model`` section exposes
(``mvcustom.configs.train.ModelConfig`` extends it with where the weights come from and the
attention schedule), so a field is declared, defaulted and checked once.

Fields fall in two kinds, which decides what happens when a saved model is loaded under a config
(``init_from``, ``model.pretrained``): the **shape** fields change which weights exist, so a config
whose value differs from the saved model's is refused, naming the key; the **runtime** fields only
change how the weights are used (ray bounds, samples per ray, attention tiling), so the config's
value is applied and recorded in the next export.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mvcustom.configs.base import check

#: Fields that decide which weights exist (refused when they differ from a loaded model's).
SHAPE_FIELDS = (
    "camera_encoder",
    "camera_encoder_blocks",
    "camera_encoder_heads",
    "featurenerf_blocks",
    "nerf_hidden",
)
#: Fields that only change how the weights are used (applied over a loaded model's).
RUNTIME_FIELDS = ("nerf_samples", "near", "far", "stt_tile")


@dataclass
class ArchitectureConfig:
    """Architecture of what MVCustom adds to the backbone (the backbone's own configs travel
    with its components).

    Attributes:
        camera_encoder: CameraCtrl-style Plücker camera encoder in the motion modules (our
            addition beyond the paper; the ``paper`` preset turns it off, DESIGN.md §1).
        camera_encoder_blocks: residual blocks per level. camera_encoder_heads: its temporal heads.
        featurenerf_blocks: indices (0-15, forward order: down 0-5, middle 6, up 7-15) of the
            spatial transformer blocks that carry the FeatureNeRF branch (default: the 7
            lowest-resolution ones; the paper's list is not reachable, PAPER.md §3).
        nerf_hidden: FeatureNeRF width. nerf_samples: samples per ray (CD360: 24).
        near, far: ray bounds in the clip's world units (CO3D clips are normalised to mean camera
            distance 1).
        stt_tile: query tile side of windowed STT (``null``: ``min(2r + 1, 4)``).
    """

    camera_encoder: bool = True
    camera_encoder_blocks: int = 1
    camera_encoder_heads: int = 1
    featurenerf_blocks: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8, 9, 10])
    nerf_hidden: int = 64
    nerf_samples: int = 24
    near: float = 0.2
    far: float = 2.0
    stt_tile: int | None = None

    def __post_init__(self) -> None:
        check(
            len(set(self.featurenerf_blocks)) == len(self.featurenerf_blocks),
            f"model.featurenerf_blocks has repeats: {self.featurenerf_blocks}",
        )
        check(
            all(0 <= b < 16 for b in self.featurenerf_blocks),
            "model.featurenerf_blocks must be indices in [0, 16)",
        )
        check(0 < self.near < self.far, "model.near and model.far need 0 < near < far")
        check(self.nerf_samples >= 2, "model.nerf_samples must be >= 2")
        check(self.nerf_hidden >= 1, "model.nerf_hidden must be >= 1")
        check(
            self.camera_encoder_blocks >= 1 and self.camera_encoder_heads >= 1,
            "model.camera_encoder_blocks and model.camera_encoder_heads must be >= 1",
        )
        check(self.stt_tile is None or self.stt_tile >= 1, "model.stt_tile must be >= 1 or null")

    def architecture(self) -> dict:
        """The :class:`ArchitectureConfig` fields of this config (of a subclass too)."""
        return {f.name: getattr(self, f.name) for f in fields(ArchitectureConfig)}


def reconcile(saved: dict, wanted: ArchitectureConfig, source: str) -> dict:
    """The architecture a loaded model gets: ``saved`` (its recorded fields) with ``wanted``'s
    runtime fields applied. A shape field that differs is refused, naming the key and both values.
    """
    out = dict(saved)
    for name in SHAPE_FIELDS:
        have, want = saved.get(name), getattr(wanted, name)
        if name in saved and _norm(have) != _norm(want):
            raise ValueError(
                f"model.{name}={want!r} conflicts with the model loaded from {source} "
                f"(built with {name}={have!r}): this field decides which weights exist. Set "
                f"model.{name} to {have!r} (or load a model built with {want!r})"
            )
    for name in RUNTIME_FIELDS:
        out[name] = getattr(wanted, name)
    return out


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class LossConfig:
    """Weights of the training loss terms (CD360's recipe, PAPER.md §3; DESIGN.md §1).

    Attributes:
        masked: stage 2's denoising MSE only on the subject (where the batch has masks).
        fg_opacity: FeatureNeRF opacity pushed to 1 on the subject (MSE; CD360: 10).
        bg_alpha: FeatureNeRF opacity pushed to 0 off it (L1; CD360: 10).
        rgb: the FeatureNeRF's rendered colour against the target frame, subject only, the
            background composited to 0 (MSE; CD360: 5).
    """

    masked: bool = True
    fg_opacity: float = 10.0
    bg_alpha: float = 10.0
    rgb: float = 5.0

    def __post_init__(self) -> None:
        check(
            min(self.fg_opacity, self.bg_alpha, self.rgb) >= 0,
            "loss.fg_opacity, loss.bg_alpha and loss.rgb must be >= 0",
        )
