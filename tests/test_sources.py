"""The source registry: every source the config accepts is a Source, and says what depth it needs."""

from __future__ import annotations

import typing

import pytest

from mvcustom.configs import PreprocessConfig, from_dict
from pipelines.preprocess import depth_mode, needs_depth_model
from pipelines.sources import Source, get_source


def test_every_config_source_is_registered():
    choices = typing.get_args(typing.get_type_hints(PreprocessConfig)["source"])
    assert set(choices) == {"co3d", "webvid", "photos"}
    for name in choices:
        src = get_source(name)
        assert isinstance(src, Source) and src.name == name
        assert get_source(name) is src  # loaded once
    with pytest.raises(ValueError, match=r"unknown source 'webvid10m'.*known sources: co3d, photos, webvid"):
        get_source("webvid10m")


@pytest.mark.parametrize(
    ("source", "co3d_depth", "estimate", "needs", "mode"),
    [
        ("co3d", "dataset", True, False, "replace"),
        ("co3d", "zoedepth", True, True, "replace"),
        ("co3d", "both", True, True, "both"),
        ("webvid", "dataset", True, True, "replace"),
        ("webvid", "dataset", False, False, "replace"),
        ("photos", "dataset", True, True, "replace"),
    ],
)
def test_depth_need_comes_from_the_source(source, co3d_depth, estimate, needs, mode):
    cfg = from_dict(
        PreprocessConfig, {"source": source, "estimate_depth": estimate, "co3d": {"depth": co3d_depth}}, "t"
    )
    assert needs_depth_model(cfg) is needs and depth_mode(cfg) == mode
