"""Submit one of our jobs to a Ray cluster, follow its logs, exit with the job's status.

    python infra/submit.py --address http://127.0.0.1:8265 -- \
        python -m jobs.preprocess --config jobs/configs/preprocess_co3d.yaml --set ray.address=auto
    make submit ARGS="python -m jobs.train --config ..."          # same, address from RAY_ADDRESS

What it does, and why:

* **Auth stays on.** Ray 2.60 clusters require a token; Ray's clients only send it when
  ``RAY_AUTH_MODE=token`` is set in *their* environment (STACK.md). This script sets it (unless
  set) before Ray is imported; the token itself comes from ``RAY_AUTH_TOKEN``,
  ``--token-file`` / ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and is never printed.
* **The upload is the code only**: ``working_dir`` is the repository with the virtualenv, scratch,
  demo and data folders, caches and shard/model files excluded (:data:`EXCLUDES`), and nothing is
  installed at job start (no ``pip``/``conda`` in the runtime env): the cluster's image must hold
  the pinned environment.
* **One exit status**: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 130 on Ctrl-C
  (which stops the job, so nothing keeps running unattended).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Never uploaded with the working directory (gitignore-style patterns, Ray's ``excludes``).
EXCLUDES = [
    ".git",
    ".venv",
    ".tmp",
    ".demo",
    ".lockvenv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    # anchored at the repository root: an unanchored "data/" would also drop mvcustom/data/
    "/data/",
    "/shards/",
    "/runs/",
    "/mlruns/",
    "*.db",
    "*.tar",
    "*.safetensors",
    "*.ckpt",
    "*.pt",
    "*.mp4",
]


def runtime_env(working_dir: str | Path = ROOT, env_vars: dict | None = None) -> dict:
    """The runtime env of every submission: the code, no installs, optional env vars."""
    env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def _client(address: str):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(
    entrypoint: list[str],
    address: str,
    working_dir: str | Path = ROOT,
    env_vars: dict | None = None,
    follow: bool = True,
    poll_s: float = 1.0,
) -> tuple[str, str]:
    """Submit ``entrypoint`` (argv list), optionally stream its logs, wait for the end.

    Returns ``(job_id, status)`` with ``status`` one of ``SUCCEEDED``, ``FAILED``, ``STOPPED``.
    """
    import shlex

    if not entrypoint:
        raise ValueError("nothing to submit: give the job's command after '--'")
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(working_dir, env_vars)
    )
    print(f"[submit] job {job_id} on {address}: {shlex.join(entrypoint)}", file=sys.stderr, flush=True)
    try:
        if follow:
            asyncio.run(_follow(client, job_id))
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            time.sleep(poll_s)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"\n[submit] stopped job {job_id}", file=sys.stderr)
        raise
    info = client.get_job_info(job_id)
    if str(status.value) != "SUCCEEDED":
        print(f"[submit] job {job_id} {status.value}: {info.message}", file=sys.stderr)
    return job_id, str(status.value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
        help="the cluster's dashboard (job server) URL (default $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    ap.add_argument("--token-file", help="file holding the cluster's auth token (default ~/.ray/auth_token)")
    ap.add_argument("--no-follow", action="store_true", help="do not stream the job's logs")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var for the job")
    ap.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command")
    args = ap.parse_args(argv)
    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if args.token_file:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(args.token_file).expanduser())
    env_vars = {}
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            ap.error(f"--env takes KEY=VALUE, got {kv!r}")
        env_vars[key] = value
    try:
        _, status = submit(entry, args.address, env_vars=env_vars, follow=not args.no_follow)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        ap.error(str(e))
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
