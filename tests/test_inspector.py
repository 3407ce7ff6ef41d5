"""The shard inspector (issue 17): a static page per shard folder from real shards."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_inspector_page_shows_summary_clips_and_resolving_images(train_shards, tmp_path, capsys):
    import pandas as pd

    from jobs.inspect_shards import main

    (page,) = main([train_shards, "--samples", "3", "--out", str(tmp_path / "inspect")])
    assert f"shard inspector: {page}" in capsys.readouterr().out
    text = Path(page).read_text()
    manifest = pd.read_parquet(Path(train_shards) / "manifest.parquet")
    assert f"{len(manifest)} clip(s) (co3d: {len(manifest)})" in text
    assert "Error records" in text and "3 sampled clip(s)" in text
    # three different clips, from evenly spread shards; each with its caption and data
    keys = re.findall(r"<h3>([^<]+)</h3>", text)
    assert len(set(keys)) == 3 and set(keys) <= set(manifest.key)
    assert text.count("Caption:") == 3 and text.count("Depth (") == 3 and text.count("Masks:") == 3
    assert "Poses: co3d" in text
    # every image the page links to exists and decodes; the strips are as wide as 8 frames
    images = re.findall(r"src='([^']+)'", text)
    assert len(images) == 3 * 4
    for name in images:
        im = np.asarray(Image.open(Path(page).parent / name))
        assert im.size > 0
    frames = np.asarray(Image.open(Path(page).parent / images[0]))
    assert frames.shape[1] == 8 * 64 + 7 * 2  # 8 frames of 64 px with 2-px gaps
    depth = np.asarray(Image.open(Path(page).parent / "clip000_depth.png"))
    assert depth.shape == frames.shape and depth.std() > 0  # colour-mapped, not blank


def test_inspector_frusta_follow_the_cameras():
    """The frusta plot is drawn from the cameras: a different path draws a different picture."""
    from mvcustom.data.inspector import depth_strip, frusta_plot
    from mvcustom.geometry.trajectories import arc, forward

    a = arc(6, span_deg=90, image_hw=(32, 48))
    b = forward(6, image_hw=(32, 48))
    pa = frusta_plot(a.w2c.numpy(), a.K.numpy(), (32, 48))
    pb = frusta_plot(b.w2c.numpy(), b.K.numpy(), (32, 48))
    assert pa.shape == pb.shape and pa.ndim == 3 and not np.array_equal(pa, pb)
    depth = np.zeros((2, 4, 4), np.float32)
    depth[:, :, 2:] = np.array([1.0, 3.0])
    rgb, lo, hi = depth_strip(depth, [0, 1])
    assert (rgb[:, :2] == 0).all()  # unknown depth is black
    assert (lo, hi) == (1.0, 3.0)  # the 2nd and 98th percentiles of the known depths


def test_inspector_refuses_a_folder_without_shards(tmp_path):
    from mvcustom.data.inspector import inspect_shards

    with pytest.raises(FileNotFoundError, match="no shards match"):
        inspect_shards(str(tmp_path), str(tmp_path / "out"))


def test_inspector_reads_and_writes_through_fsspec_urls(train_shards):
    """memory:// stands in for s3:// / gs://: shards read and the page written through fsspec."""
    import fsspec

    from mvcustom.data.inspector import inspect_shards

    fs = fsspec.filesystem("memory")
    for p in Path(train_shards).iterdir():
        fs.pipe(f"/inspect-in/{p.name}", p.read_bytes())
    (page,) = inspect_shards("memory://inspect-in", "memory://inspect-out", samples=1)
    assert page == "memory://inspect-out/index.html"
    text = fs.cat("/inspect-out/index.html").decode()
    assert "1 sampled clip(s)" in text
    for name in re.findall(r"src='([^']+)'", text):
        assert fs.exists(f"/inspect-out/{name}")
