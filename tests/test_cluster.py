"""A real Ray cluster started with ``ray start`` (token auth on, loopback only), and job
submission through ``infra/submit.py`` (issue 7, first part)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(marker: str) -> None:
    """Kill every process whose command line names ``marker`` (this cluster's temp dir): the
    cluster is torn down by PID, never with ``ray stop`` (which would hit other Ray instances)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


def _wait_for_job_agent(address: str, token: str, timeout: float = 90.0) -> None:
    """``ray start`` returns before the node's job agent serves; a submission meanwhile gets
    "No available agent". Wait until a no-op job is accepted and finishes."""
    import time

    code = (
        "import os, sys, time; os.environ['RAY_AUTH_MODE'] = 'token'\n"
        "from ray.job_submission import JobSubmissionClient\n"
        f"c = JobSubmissionClient({address!r}); j = c.submit_job(entrypoint='true')\n"
        "while not c.get_job_status(j).is_terminal(): time.sleep(0.5)\n"
    )
    deadline = time.time() + timeout
    while True:
        env = {**os.environ, "RAY_AUTH_TOKEN_PATH": token}
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode == 0:
            return
        if time.time() > deadline or "No available agent" not in r.stderr:
            raise RuntimeError(f"the cluster's job server did not come up: {r.stderr[-2000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    """A head node on loopback with 2 CPUs and its dashboard (job server) on 127.0.0.1."""
    import secrets

    temp = tempfile.mkdtemp(prefix="mvc-ray-", dir="/tmp")  # short: Ray's unix socket paths
    port, dash = _free_port(), _free_port()
    # this cluster's own token (never the user's ~/.ray/auth_token), auth on
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cmd = [RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1"]
    cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"]
    # every per-node port explicit: the defaults (52365 for the job agent...) collide with any
    # other Ray on the machine, e.g. the embedded one other tests start
    for flag in (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
        "ray-client-server-port",
    ):
        cmd.append(f"--{flag}={_free_port()}")
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_agent(address, str(token))
        yield address, str(token)
    finally:
        _kill_tree(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_runtime_env_uploads_code_only():
    sys.path.insert(0, str(ROOT))
    from infra.submit import runtime_env

    env = runtime_env()
    assert set(env) == {"working_dir", "excludes"}  # no pip / conda / uv: nothing installed at start
    for must in (".venv", ".tmp", ".demo", ".git", "*.tar", "*.safetensors"):
        assert must in env["excludes"]


@pytest.mark.slow
def test_submit_runs_a_job_on_the_cluster_and_returns_its_status(ray_head, tmp_path, capfd):
    """The job runs on the cluster (its own process, the uploaded code), its logs stream back,
    the exit status is the job's; auth is on: a client without the token is refused."""
    address, token = ray_head
    out = tmp_path / "sample"
    job = [sys.executable, "infra/submit.py", "--address", address, "--token-file", token, "--"]
    ok = subprocess.run(
        job
        + [
            sys.executable,
            "-m",
            "jobs.make_sample_data",
            "--out",
            str(out),
            "--config",
            "jobs/configs/make_sample_data_debug.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    index = json.loads((out / "ground_truth" / "index.json").read_text())
    assert index["co3d"]["categories"]  # the job wrote its outputs
    assert "raysubmit_" in ok.stderr
    assert Path(token).read_text().strip() not in ok.stdout + ok.stderr  # the secret is never echoed

    bad = subprocess.run(
        job + [sys.executable, "-c", "import sys; print('about to fail'); sys.exit(3)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "about to fail" in bad.stdout and "FAILED" in bad.stderr

    # auth is on: a client that does not send the token is refused
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    code = f"from ray.job_submission import JobSubmissionClient as C; C({address!r}).list_jobs()"
    refused = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "authentication" in refused.stderr.lower()
