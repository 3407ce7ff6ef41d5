"""Models: the MVCustom assembly and its parts (no Ray, DeepSpeed or MLflow imports here)."""

from __future__ import annotations

from mvcustom.models.mvcustom import (
    ClipCameras,
    DenoiseOutput,
    MVCustomAdditions,
    MVCustomConfig,
    MVCustomModel,
    References,
    is_export,
)
from mvcustom.models.schedule import build_scheduler, clean_scheduler_config

__all__ = [
    "ClipCameras",
    "DenoiseOutput",
    "MVCustomAdditions",
    "MVCustomConfig",
    "MVCustomModel",
    "References",
    "build_model",
    "build_scheduler",
    "is_export",
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
    adapter. ``subject_tokens`` (stage 2) are added with trainable embeddings. Loading a saved
    model refuses a ``cfg`` whose shape fields differ from it and applies its runtime fields
    (:mod:`mvcustom.configs.model`).
    """
    arch = MVCustomConfig(
        **cfg.architecture(),
        subject_tokens=list(subject_tokens or []),
        subject_init_words=list(subject_init_words or []),
    )
    source = init_from
    if source is None and cfg.pretrained and is_export(cfg.pretrained):
        source = cfg.pretrained
    if source is not None:
        model = MVCustomModel.from_pretrained(
            source, dtype, arch.subject_tokens, arch.subject_init_words, architecture=cfg
        )
        _check_saved_schedule(model, cfg, source)
        return model
    if cfg.size == "tiny":
        model = MVCustomModel.tiny(arch, prediction_type=cfg.prediction_type)
    else:
        model = MVCustomModel.from_sd15(cfg.pretrained, cfg.motion_adapter, arch, dtype)
    model.scheduler_config = clean_scheduler_config(
        {**model.scheduler_config, **wanted_schedule(cfg)}, "model.prediction_type / model.scheduler"
    )
    return model.to(dtype) if dtype is not None else model


def wanted_schedule(cfg) -> dict:
    """The scheduler keys a :class:`mvcustom.configs.train.ModelConfig` sets (``prediction_type``
    and the ``scheduler`` overrides)."""
    return {"prediction_type": cfg.prediction_type, **cfg.scheduler}


def _check_saved_schedule(model: MVCustomModel, cfg, source: str) -> None:
    """A loaded model keeps the schedule it was trained on: a config asking for another is refused."""
    for key, want in wanted_schedule(cfg).items():
        have = model.scheduler_config.get(key)
        if have != want:
            name = "model.prediction_type" if key == "prediction_type" else f"model.scheduler.{key}"
            raise ValueError(
                f"{name}={want!r} conflicts with the model loaded from {source} (trained with "
                f"{key}={have!r}): a model is sampled and trained further on the schedule it was trained "
                f"on; set {name} to {have!r}"
            )
