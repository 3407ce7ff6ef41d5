"""Entry points and fsspec paths."""

from __future__ import annotations

import json

import numpy as np

from mvcustom.configs import SampleDataConfig, from_dict
from mvcustom.data import co3d
from mvcustom.data.generator import generate_sample_data


def test_demo_job_runs_on_debug_data(tmp_path, capsys):
    from jobs.demo import main

    summary = main(["--out", str(tmp_path / "demo"), "--config", "jobs/configs/make_sample_data_debug.yaml"])
    out = capsys.readouterr().out
    assert "co3d/teddybear: 2 sequences, 16 frames" in out
    assert (tmp_path / "demo" / "data" / "co3d" / "car" / "frame_annotations.jgz").exists()
    assert summary["webvid"].endswith("data/webvid")
    index = json.loads((tmp_path / "demo" / "data" / "ground_truth" / "index.json").read_text())
    assert len(index["webvid"]["videos"]) == 2


def test_generator_and_reader_work_through_fsspec_urls():
    """memory:// stands in for s3:// / gs://: the same fsspec code paths, no server needed."""
    cfg = from_dict(
        SampleDataConfig,
        {
            "preset": "debug",
            "write_webvid": False,
            "co3d": {"categories": ["apple"], "sequences_per_category": 1, "frames_per_sequence": 3},
        },
        "test",
    )
    generate_sample_data("memory://mvc-sample", cfg)
    cat = co3d.load_category("memory://mvc-sample/co3d", "apple")
    fa = cat.frames[2]
    depth = co3d.load_depth("memory://mvc-sample/co3d", fa.depth)
    assert depth.shape == tuple(fa.image.size) and np.isfinite(depth).all() and depth.max() > 0
    assert co3d.available_subsets("memory://mvc-sample/co3d", "apple") == ["fewview_dev"]
