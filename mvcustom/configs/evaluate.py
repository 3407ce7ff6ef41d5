"""Config of the evaluation job (``python -m jobs.evaluate``): generate with Ray Data, then score."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        anchors: anchor frames fused by z-buffer (1 = the paper; 2+ is our extension), spread
            evenly over the clip (first and last frame for 2).
        feature_rendering: depth-aware feature rendering (and the anchor pass) on/off.
        anchor_steps: DDIM steps of the anchor pass (``null``: num_inference_steps; fewer replays
            the anchors through the forward process, ``InferenceOptions.anchor_steps``).
        stt_radius: STT radius at inference (-1 = the whole feature map). ``null`` (default):
            the radius the model was trained at, ``final_stt_radius`` of the
            ``mvcustom_training.json`` every training export writes beside its weights (a stage
            1 stopped before its radius schedule ends never trained at -1); a model folder
            without that record (a hub id, weights saved by hand) gets -1, and the results say
            so. An integer overrides the record. Each sample's radius and where it came from
            are in the results (``stt_radius``, ``stt_radius_source``).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    feature_rendering_steps: int = 35
    completion_until_step: int = 10
    depth_scale_search: float = 0.4
    anchors: int = 1
    feature_rendering: bool = True
    anchor_steps: int | None = None
    stt_radius: int | None = None

    def anchor_frames(self, num_frames: int) -> tuple[int, ...]:
        """The anchor frame indices for a clip of ``num_frames``."""
        if self.anchors == 1:
            return (0,)
        return tuple(round(i * (num_frames - 1) / (self.anchors - 1)) for i in range(self.anchors))

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
        check(
            self.stt_radius is None or self.stt_radius >= -1,
            f"sampling.stt_radius must be >= 0, -1 (the whole feature map) or null (the radius the "
            f"model was trained at), got {self.stt_radius}",
        )
        check(
            self.anchor_steps is None or 1 <= self.anchor_steps <= self.num_inference_steps,
            "sampling.anchor_steps must be within 1..num_inference_steps (or null)",
        )


@dataclass
class MetricModelsConfig:
    """Feature models of the metrics (``from_pretrained`` paths or hub ids).

    Attributes:
        clip: a CLIP model (text alignment and CLIP image similarity; also the distances when
            ``distance`` is ``clip``). ``None``: a tiny random CLIP (tests and the demo only; its
            figures mean nothing).
        distance: what multi-view consistency and identity are computed with: ``dreamsim``
            (the paper's DreamSim through the ``dreamsim`` package, weights from ``dreamsim``),
            ``backbone`` (the cosine distance of ``distance_backbone``'s embeddings, e.g.
            DINOv2: a labelled fallback) or ``clip`` (of CLIP's image embeddings: a labelled
            fallback). ``null``: ``dreamsim`` when ``dreamsim`` is set, else ``backbone`` when
            ``distance_backbone`` is set, else ``clip``. Results name it in ``distance_model``.
        dreamsim: local folder of DreamSim's checkpoints (the package's ``cache_dir``).
        dreamsim_type: DreamSim variant (``ensemble``: the paper's default model).
        distance_backbone: an image backbone folder or hub id for ``distance: backbone``.
        pose_threshold_deg: pose accuracy counts a frame pair correct below this error.
    """

    clip: str | None = None
    distance: Literal["dreamsim", "backbone", "clip"] | None = None
    dreamsim: str | None = None
    dreamsim_type: str = "ensemble"
    distance_backbone: str | None = None
    pose_threshold_deg: float = 10.0

    def __post_init__(self) -> None:
        check(self.pose_threshold_deg > 0, "metric_models.pose_threshold_deg must be positive")
        if self.distance is None:
            self.distance = "dreamsim" if self.dreamsim else "backbone" if self.distance_backbone else "clip"
        check(
            self.distance != "dreamsim" or bool(self.dreamsim),
            "metric_models.distance=dreamsim needs metric_models.dreamsim (the folder of DreamSim's weights)",
        )
        check(
            self.distance != "backbone" or bool(self.distance_backbone),
            "metric_models.distance=backbone needs metric_models.distance_backbone (an image model folder or hub id)",
        )


@dataclass
class EvaluateConfig:
    """An evaluation run.

    Attributes:
        model: the ``from_pretrained`` folder of the trained model (path, fsspec URL or hub id).
        depth_model: ZoeDepth ``from_pretrained`` path or hub id (feature rendering needs it).
        spec: evaluation spec, YAML (subjects x prompts x trajectories x seeds [x variants]) or
            parquet (one row per sample); see ``pipelines/evaluation/spec.py``.
        output: folder (any fsspec URL) for generated samples, ``results.parquet``, the
            aggregate table and the HTML report.
        actors: generation actor pool size. num_gpus: GPUs per generation actor (fractional
            allowed: several actors share a GPU). scorers: scoring actor pool size (CPU: SfM).
        actor_cpus, scorer_cpus: CPUs reserved per generation / scoring actor. Keep
            ``actors * actor_cpus + scorers * scorer_cpus`` within the cluster's CPUs, or the
            scorers wait for generation to end (on 2 CPUs, whole-CPU actors starved Ray Data,
            STACK.md); the debug preset uses 0.5.
        num_references: reference views per subject unless the spec says otherwise.
        report_samples: samples whose image grids and trajectory plots go to MLflow.
    """

    PRESETS = ("debug",)

    model: str = ""
    depth_model: str | None = "Intel/zoedepth-nyu-kitti"
    spec: str = ""
    output: str = ""
    actors: int = 1
    num_gpus: float = 0.0
    scorers: int = 1
    actor_cpus: float = 1.0
    scorer_cpus: float = 1.0
    num_references: int = 5
    report_samples: int = 8
    clip: ClipConfig = field(default_factory=ClipConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metric_models: MetricModelsConfig = field(default_factory=MetricModelsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="mvcustom-evaluate"))

    def __post_init__(self) -> None:
        check(self.actors >= 1 and self.num_gpus >= 0, "actors must be >= 1 and num_gpus >= 0")
        check(self.scorers >= 1, "scorers must be >= 1")
        check(self.actor_cpus > 0 and self.scorer_cpus > 0, "actor_cpus and scorer_cpus must be positive")
        check(self.num_references >= 1, "num_references must be >= 1")
        check(
            self.sampling.anchors <= self.clip.num_frames,
            f"sampling.anchors ({self.sampling.anchors}) exceeds clip.num_frames ({self.clip.num_frames})",
        )

    @classmethod
    def debug(cls) -> EvaluateConfig:
        return cls(
            depth_model=None,
            num_references=2,
            actor_cpus=0.5,
            scorer_cpus=0.5,
            clip=ClipConfig(num_frames=4, height=32, width=32),
            sampling=SamplingConfig(
                num_inference_steps=4, feature_rendering_steps=3, completion_until_step=1
            ),
        )
