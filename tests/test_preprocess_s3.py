"""s3:// end to end against a local S3-compatible server (moto's server mode, as s3fs's tests use)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # fsspec caches filesystem instances by their arguments: a bare S3FileSystem() made for an
    # earlier test would still point at that test's (stopped) server
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_preprocess_reads_and_writes_s3(sample_data, s3_server, tmp_path):
    import s3fs
    import webdataset as wds

    from mvcustom.data.schema import decode_sample

    fs = s3fs.S3FileSystem()
    fs.mkdir("mvc-bucket")
    fs.put(str(sample_data / "co3d"), "mvc-bucket/co3d", recursive=True)
    cmd = [
        sys.executable,
        "-m",
        "jobs.preprocess",
        "--config",
        "jobs/configs/preprocess_co3d_debug.yaml",
        "--set",
        "input=s3://mvc-bucket/co3d",
        "--set",
        "output=s3://mvc-bucket/shards/co3d",
        "--set",
        "mlflow.enabled=false",
        "--set",
        "ray.num_cpus=2",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("mvc-bucket/shards/co3d"))
    assert names == [
        "_job.json",
        "_plan-train.parquet",  # the lock is gone: the run released it
        "errors.parquet",
        "manifest.parquet",
        "train-000000.json",
        "train-000000.tar",
    ]
    local = tmp_path / "shard.tar"
    fs.get("mvc-bucket/shards/co3d/train-000000.tar", str(local))
    samples = [decode_sample(s) for s in wds.WebDataset(str(local), shardshuffle=False)]
    assert len(samples) == 4 and all(s.meta["source"] == "co3d" for s in samples)
    # the manifest is built from a fresh listing (s3fs caches listings per process): every
    # shard the workers just wrote is in it
    summary = json.loads(res.stdout[res.stdout.rindex('{\n "source"') :])
    with fs.open("mvc-bucket/shards/co3d/manifest.parquet", "rb") as f:
        manifest = pq.read_table(f)
    assert manifest.num_rows == summary["clips_written"] == 4 and summary["complete"]
    # the rerun skips the completed shard (resume works on object stores too)
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    assert res.returncode == 0 and '"shards_skipped_complete": 1' in res.stdout

    # one run at a time on an object store too: a held lock (S3 If-None-Match) refuses a second
    from pipelines.shards import OutputLock

    with OutputLock("s3://mvc-bucket/shards/co3d"):
        res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
        assert res.returncode == 1 and "is in use by another run" in res.stderr, res.stderr[-2000:]
    assert not fs.exists("mvc-bucket/shards/co3d/_lock.json")


@pytest.mark.slow
def test_evaluation_into_s3_logs_the_same_artifacts(train_shards, tiny_zoedepth, s3_server, tmp_path):
    """``jobs.evaluate`` with ``output=s3://...`` writes its samples, tables and report to the
    bucket and logs them to MLflow as a local output would (copied through fsspec)."""
    import mlflow
    import s3fs
    import yaml

    from mvcustom.models import MVCustomModel
    from mvcustom.models.mvcustom import MVCustomConfig

    fs = s3fs.S3FileSystem()
    fs.mkdir("mvc-eval")
    model = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"]), seed=0)
    model.save_pretrained(str(tmp_path / "model"))
    spec = {
        "subjects": [{"name": "teddy", "shards": train_shards, "num_references": 2}],
        "prompts": ["a photo of a <sks> teddybear"],
        "trajectories": [{"name": "arc40", "kind": "arc", "span_deg": 40}],
    }
    fs.pipe("mvc-eval/spec.yaml", yaml.safe_dump(spec).encode())  # the spec, too, from the bucket
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "jobs.evaluate", "--config", "jobs/configs/evaluate_debug.yaml"]
    for s in (
        f"model={tmp_path / 'model'}",
        f"depth_model={tiny_zoedepth}",
        "spec=s3://mvc-eval/spec.yaml",
        "output=s3://mvc-eval/eval1",
        f"mlflow.tracking_uri={uri}",
        "ray.num_cpus=2",
    ):
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{\n") :])
    assert summary["scored"] == 1 and summary["report"] == "s3://mvc-eval/eval1/report/index.html"
    fs.invalidate_cache()
    assert fs.exists("mvc-eval/eval1/results.parquet") and fs.exists("mvc-eval/eval1/report/index.html")
    client = mlflow.MlflowClient(uri)
    rid = summary["mlflow_run_id"]
    assert {"results.parquet", "aggregate.csv", "report", "samples"} <= {
        a.path for a in client.list_artifacts(rid)
    }
    assert {"report/index.html", "report/images"} <= {a.path for a in client.list_artifacts(rid, "report")}
    images = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(rid, "report/images")}
    assert images == {"teddy-mvcustom-arc40-p0-s0_grid.png", "teddy-mvcustom-arc40-p0-s0_trajectory.png"}
    page = Path(client.download_artifacts(rid, "report/index.html", str(tmp_path))).read_text()
    assert "teddy-mvcustom-arc40-p0-s0" in page and "images/teddy-mvcustom-arc40-p0-s0_grid.png" in page
    (sample,) = client.list_artifacts(rid, "samples")
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(rid, sample.path)} == {
        "grid.png",
        "trajectory.png",
    }
