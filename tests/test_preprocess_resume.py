"""Kill -9 the preprocessing job midway; the rerun completes it with the manifest of a clean run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session (the job and the Ray processes it started)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "pid (comm)": state ppid pgrp session ...
            try:
                os.kill(int(Path(stat).parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _job(inp, out, *extra):
    return [
        sys.executable,
        "-m",
        "jobs.preprocess",
        "--config",
        "jobs/configs/preprocess_co3d_debug.yaml",
        "--set",
        f"input={inp}",
        "--set",
        f"output={out}",
        "--set",
        "samples_per_shard=1",
        "--set",
        "co3d.clips_per_sequence=3",
        "--set",
        "mlflow.enabled=false",
        "--set",
        "ray.num_cpus=1",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_the_clean_manifest(sample_data, tmp_path):
    inp = sample_data / "co3d"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    p = subprocess.Popen(
        _job(inp, killed),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.time()
        while time.time() - t0 < 240 and not glob.glob(f"{killed}/train-*.json"):
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait()
        _kill_session(p.pid)
    done_at_kill = sorted(glob.glob(f"{killed}/train-*.json"))
    assert 1 <= len(done_at_kill) < 12, "the kill must land midway"
    assert not (killed / "manifest.parquet").exists()
    subprocess.run(_job(inp, killed), cwd=ROOT, check=True, capture_output=True)
    subprocess.run(_job(inp, clean), cwd=ROOT, check=True, capture_output=True)
    m_resumed = pq.read_table(killed / "manifest.parquet").to_pylist()
    m_clean = pq.read_table(clean / "manifest.parquet").to_pylist()
    assert len(m_clean) == 12 and m_resumed == m_clean  # no duplicates, nothing missing
    assert len({r["key"] for r in m_resumed}) == 12
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean))  # no temporaries left behind
