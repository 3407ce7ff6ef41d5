"""Inference: the DDIM sampler, depth-aware feature rendering, latent completion and
:class:`MVCustomPipeline` (imported lazily: it pulls in diffusers' pipeline machinery)."""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("MVCustomPipeline", "ReferenceViews", "InferenceOptions", "MVCustomOutput"):
        from mvcustom.inference import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
