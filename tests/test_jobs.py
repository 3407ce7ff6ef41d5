"""Entry points and fsspec paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mvcustom.configs import SampleDataConfig, from_dict
from mvcustom.data import co3d
from mvcustom.data.generator import generate_sample_data

#: One screen: what a stage of the demo may print, Ray's and the libraries' lines included.
SCREEN_LINES = 50


@pytest.mark.slow
def test_demo_job_runs_on_debug_data(tmp_path):
    """``python -m jobs.demo`` as a user runs it (its own process and embedded Ray, output to a
    pipe as in CI): it finishes, each stage's console fits one screen without COLMAP, glog or
    Ray Train noise, and everything it made is linked in MLflow."""
    import subprocess
    import sys

    import mlflow

    demo = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.demo",
            "--out",
            str(demo),
            "--config",
            "jobs/configs/make_sample_data_debug.yaml",
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((demo / "summary.json").read_text())
    assert f"summary (paths, run ids, figures): {demo}/summary.json" in out
    stages = re.split(r"^\[\d/4\] ", out, flags=re.M)[1:]
    assert len(stages) == 4, out[:2000]
    for text in stages:
        lines = text.splitlines()
        assert len(lines) <= SCREEN_LINES, f"{len(lines)} lines in stage {lines[0]!r}:\n" + text
    for noise in (
        "Failed to query Ray Train Controller",
        "sparse model",
        "RayDeprecationWarning",
        "Loading weights",
    ):
        assert noise not in out, noise
    glog = r"(^|\) |\x1b\[0m )[IWEF]\d{4}(\d{4})? \d\d:\d\d:\d\d"  # COLMAP's, driver's or workers'
    assert not re.search(glog, out, re.M), re.search(glog, out, re.M)
    # rank 0's progress: once per line, not twice (Ray Train's print patch is off)
    assert len(re.findall(r"\[rank 0\] step 4/4 ", out)) == 2, out
    assert "co3d/teddybear: 2 sequences, 16 frames" in out
    index = json.loads((tmp_path / "demo" / "data" / "ground_truth" / "index.json").read_text())
    assert len(index["webvid"]["videos"]) == 2
    assert summary["clips"]["co3d"] == 4 and summary["error_records"]["co3d"] == 0
    assert summary["clips"]["webvid"] + summary["error_records"]["webvid"] == 2
    assert (tmp_path / "demo" / "shards" / "co3d" / "manifest.parquet").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=summary["mlflow"])
    run = client.get_run(summary["mlflow_runs"]["co3d"])
    assert run.data.params["source"] == "co3d" and run.data.metrics["clips_written"] == 4
    # the shard inspector's page: printed, written, and an artifact of the preprocessing run
    page = summary["inspector"]["co3d"]
    assert f"shard inspector: {page}" in out and Path(page).is_file()
    assert "inspector/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "inspector")}
    # stage 1 then stage 2 trained (2 Ray Train workers, ZeRO-2) and exported loadable models
    from mvcustom.models import MVCustomModel

    for stage in ("backbone", "customize"):
        t = summary["training"][stage]
        assert (tmp_path / "demo" / "runs" / stage / "export" / "model_index.json").exists()
        assert client.get_run(t["mlflow_run_id"]).data.params["deepspeed.zero_stage"] == "2"
    # stage 2 customized one named subject, and says which (console, summary, MLflow tag)
    subject = summary["subject"]
    assert subject.startswith("teddybear/") and f"learned <sks> = CO3D {subject}" in out
    assert (
        client.get_run(summary["training"]["customize"]["mlflow_run_id"]).data.tags["mvcustom.subject"]
        == subject
    )
    assert MVCustomModel.from_pretrained(
        summary["training"]["customize"]["export"]
    ).config.subject_tokens == ["<sks>"]
    # and evaluated: 3 trajectories (arc, lateral, zoom) x (with, without feature rendering),
    # every one scored (zoom through homographies) and reported, the models named
    ev = summary["evaluation"]
    assert ev["scored"] == 6 and Path(ev["report"]).exists()
    assert f"(sequence {subject.split('/')[1]})" in Path(ev["report"]).read_text()  # the report names it
    results = pd.read_parquet(ev["results"])
    assert set(results.variant) == {"mvcustom", "no_rendering"} and (results.status == "scored").all()
    methods = {json.loads(t)["kind"]: m for t, m in zip(results.trajectory, results.pose_method, strict=True)}
    assert methods == {"arc": "sfm", "lateral": "sfm", "zoom": "homography"}
    assert results.clip_image_similarity.notna().all()
    assert results.distance_model.str.endswith("(not DreamSim)").all()
    assert "text_alignment_mean" in ev and client.get_run(ev["mlflow_run_id"]).data.metrics["scored"] == 6
    # lineage: data -> stage 1 -> stage 2 -> evaluation, by run ids and URIs
    runs = summary["mlflow_runs"]
    stage1 = client.get_run(summary["training"]["backbone"]["mlflow_run_id"]).data.tags
    stage2 = client.get_run(summary["training"]["customize"]["mlflow_run_id"]).data.tags
    evaluation = client.get_run(ev["mlflow_run_id"]).data.tags
    trained_on = {s for s in runs if summary["clips"][s]}  # the sources that produced shards
    assert set(stage1["mvcustom.data_run_ids"].split(",")) == {runs[s] for s in trained_on}
    assert stage1["mvcustom.data_uris"].split(",") == sorted(summary["shards"][s] for s in trained_on)
    assert stage2["mvcustom.data_run_ids"] == runs["co3d"]
    assert stage2["mvcustom.parent_run_id"] == summary["training"]["backbone"]["mlflow_run_id"]
    assert evaluation["mvcustom.model_run_id"] == summary["training"]["customize"]["mlflow_run_id"]
    assert evaluation["mvcustom.model_uri"] == summary["training"]["customize"]["export"]
    assert evaluation["mvcustom.data_run_ids"] == runs["co3d"]
    assert "report:" in out and "MLflow run" in out


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
