"""The datasets the preprocessing job reads, each one :class:`Source`, found by name.

A source does two things: list its records (deterministically, with an error row for each one
it rejects) and build one record into a :class:`~mvcustom.data.schema.ClipSample`. It also says
whether its clips need the depth model. The job (:mod:`pipelines.preprocess`) knows nothing
else about a dataset, so adding one is a module with a class of this shape, its entry in
``_SOURCES`` and its name among the config's ``source`` choices (so that a typo there is a
config error at load time)::

    class MySource:
        name = "mine"
        def list(self, cfg): ...            # -> (items with an ``id``, error rows)
        def build(self, item, cfg): ...     # -> ClipSample; raise RecordError on bad input
        def depth_estimate(self, cfg): ...  # -> None, "replace" or "both"

Each source's module is imported when it is first asked for: the modules pull in PyAV, pycolmap
and the like, which a job reading another dataset does not need.
"""

from __future__ import annotations

import importlib
from typing import Literal, Protocol, runtime_checkable

from mvcustom.configs.preprocess import PreprocessConfig
from mvcustom.data.schema import ClipSample

DepthEstimate = Literal["replace", "both"] | None


@runtime_checkable
class Source(Protocol):
    """One dataset's records: how to list them and how to build each into a clip."""

    name: str

    def list(self, cfg: PreprocessConfig) -> tuple[list, list[dict]]:
        """Every usable record of ``cfg.input`` (each with a unique ``id``), in a deterministic
        order, and one error row (``id``, ``stage``, ``reason``) per rejected record."""
        ...

    def build(self, item, cfg: PreprocessConfig) -> ClipSample:
        """One record -> one clip; bad input raises with a reason (an error row, not a crash)."""
        ...

    def depth_estimate(self, cfg: PreprocessConfig) -> DepthEstimate:
        """Whether the clips get ZoeDepth depth: ``None`` (no model), ``"replace"`` (the
        estimate is the depth) or ``"both"`` (the estimate beside the dataset's own depth).
        Asked only when ``estimate_depth`` is on."""
        ...


_SOURCES = {
    "co3d": "pipelines.co3d_records:Co3dSource",
    "webvid": "pipelines.webvid_records:WebVidSource",
    "photos": "pipelines.photos_records:PhotosSource",
}
_LOADED: dict[str, Source] = {}


def get_source(name: str) -> Source:
    """The source registered as ``name`` (config key ``source``)."""
    if name not in _LOADED:
        if name not in _SOURCES:
            known = ", ".join(sorted(_SOURCES))
            raise ValueError(f"unknown source {name!r} (config key 'source'); known sources: {known}")
        module, cls = _SOURCES[name].split(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]
