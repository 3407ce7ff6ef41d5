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
    yield env
    server.stop()


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
