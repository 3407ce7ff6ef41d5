"""Config of the evaluation job (``python -m jobs.evaluate``): generate with Ray Data, then score."""

from __future__ import annotations

from dataclasses import dataclass, field

from mvcustom.configs.base import check
from mvcustom.configs.common import ClipConfig, MlflowConfig, RayConfig


@dataclass
class SamplingConfig:
    """The MVCustom sampler (DESIGN.md §1, inference).

    Attributes:
        num_inference_steps: DDIM steps (50 by default).
        guidance_scale: classifier-free guidance.
        feature_rendering_steps: first steps during which depth-aware feature rendering replaces
            covered features (35 of 50 in the paper).
        completion_until_step: latent completion runs from the first step up to this step (tau).
        depth_scale_search: relative range of the depth-scale grid search (0.4 = +-40%).
        anchors: anchor frames fused by z-buffer (1 = the paper; 2+ is our extension).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    feature_rendering_steps: int = 35
    completion_until_step: int = 10
    depth_scale_search: float = 0.4
    anchors: int = 1

    def __post_init__(self) -> None:
        check(
            0 <= self.feature_rendering_steps <= self.num_inference_steps,
            "sampling.feature_rendering_steps must be within num_inference_steps",
        )
        check(
            0 <= self.completion_until_step <= self.num_inference_steps,
            "sampling.completion_until_step must be within num_inference_steps",
        )
        check(self.anchors >= 1, "sampling.anchors must be >= 1")


@dataclass
class MetricModelsConfig:
    """Feature models of the metrics (``from_pretrained`` paths or hub ids; ``None``: tiny random, tests only)."""

    clip: str | None = None
    dreamsim: str | None = None


@dataclass
class EvaluateConfig:
    """An evaluation run.

    Attributes:
        model: the ``from_pretrained`` folder of the trained model.
        spec: evaluation spec (parquet or YAML: subjects x prompts x trajectories x seeds).
        output: folder for generated frames and ``results.parquet``.
        actors: generation actor pool size. num_gpus: GPUs per actor (fractional allowed).
    """

    PRESETS = ("debug",)

    model: str = ""
    spec: str = ""
    output: str = ""
    actors: int = 1
    num_gpus: float = 0.0
    clip: ClipConfig = field(default_factory=ClipConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metric_models: MetricModelsConfig = field(default_factory=MetricModelsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="mvcustom-evaluate"))

    def __post_init__(self) -> None:
        check(self.actors >= 1 and self.num_gpus >= 0, "actors must be >= 1 and num_gpus >= 0")

    @classmethod
    def debug(cls) -> EvaluateConfig:
        return cls(
            clip=ClipConfig(num_frames=4, height=32, width=32),
            sampling=SamplingConfig(
                num_inference_steps=4, feature_rendering_steps=3, completion_until_step=1
            ),
        )
