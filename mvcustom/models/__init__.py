"""Models: the MVCustom assembly and its parts (no Ray, DeepSpeed or MLflow imports here)."""

from __future__ import annotations

from mvcustom.models.mvcustom import (
    ClipCameras,
    DenoiseOutput,
    MVCustomConfig,
    MVCustomModel,
    References,
)

__all__ = [
    "ClipCameras",
    "DenoiseOutput",
    "MVCustomConfig",
    "MVCustomModel",
    "References",
    "build_model",
]


def build_model(
    cfg,
    init_from: str | None = None,
    subject_tokens: list[str] | None = None,
    subject_init_words: list[str] | None = None,
    dtype=None,
) -> MVCustomModel:
    """The model a :class:`mvcustom.configs.train.ModelConfig` describes.

    ``init_from`` (or ``cfg.pretrained`` when it is an ``MVCustomModel`` folder) loads a saved
    model; otherwise ``tiny`` builds random components and ``sd15`` loads SD 1.5 plus the motion
    adapter. ``subject_tokens`` (stage 2) are added with trainable embeddings.
    """
    import os

    arch = MVCustomConfig(
        camera_encoder=cfg.camera_encoder,
        featurenerf_blocks=list(cfg.featurenerf_blocks),
        nerf_samples=cfg.nerf_samples,
        near=cfg.near,
        far=cfg.far,
        stt_tile=cfg.stt_tile,
        subject_tokens=list(subject_tokens or []),
        subject_init_words=list(subject_init_words or []),
    )
    source = init_from
    if (
        source is None
        and cfg.pretrained
        and os.path.isfile(os.path.join(cfg.pretrained, "mvcustom_config.json"))
    ):
        source = cfg.pretrained
    if source is not None:
        return MVCustomModel.from_pretrained(source, dtype, arch.subject_tokens, arch.subject_init_words)
    if cfg.size == "tiny":
        model = MVCustomModel.tiny(arch, prediction_type=cfg.prediction_type)
    else:
        model = MVCustomModel.from_sd15(cfg.pretrained, cfg.motion_adapter, arch, dtype)
        model.scheduler_config["prediction_type"] = cfg.prediction_type
    return model.to(dtype) if dtype is not None else model
