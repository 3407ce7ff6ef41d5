"""Repeat the two-node fault drill under the fused shard workers N times in a row (one cluster).

    python benchmarks/fault_drills.py [--repeats 10] [--control] [--out drills.json]

Each repeat submits the preprocessing job (12 clips, ZoeDepth, 4 shard workers over a head and
a worker node made with ``ray start``), SIGKILLs the worker node while its shard workers run,
and checks that the job exits 0 with every clip exactly once, no error rows and no partial
files (``tests/test_cluster.py::test_fault_drill_kills_a_node_under_the_fused_shard_workers``).

``--control`` reruns the drill with ``ray.actor_task_retries=3`` (the bound this project shipped
before issue 15): Ray core spends those retries pushing to the dead node's actors before the
node is declared dead, so shards are lost and the job must now exit non-zero; the drill fails.

Prints JSON: repeats passed / failed, per-repeat figures (kill time, shards committed at the
kill, actor restarts, time to finish) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_cluster.py::test_fault_drill_kills_a_node_under_the_fused_shard_workers"


def run(repeats: int, control: bool, log: str | None = None) -> dict:
    env = {**os.environ, "DRILL_REPEATS": str(repeats)}
    if control:
        env["DRILL_SETS"] = "ray.actor_task_retries=3"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=900", TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    if log:
        Path(log).write_text(out)
    errors = sorted(set(re.findall(r"\b(ray\.exceptions\.\w+|\w+Error): ", out)))
    figures = [json.loads(m) for m in re.findall(r"fused drill figures: (\{.*\})", out)]
    passed = re.search(r"(\d+) passed", out)
    failed = re.search(r"(\d+) failed", out)
    failures = re.findall(r"^E\s+(.{0,300})", out, flags=re.M)
    return {
        "drill": TEST,
        "control_actor_task_retries_3": control,
        "repeats": repeats,
        "passed": int(passed.group(1)) if passed else 0,
        "failed": int(failed.group(1)) if failed else 0,
        "pytest_exit": proc.returncode,
        "per_repeat": figures,
        "first_failure_lines": failures[:8],
        "error_types_seen": errors,
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--control", action="store_true", help="with the old ray.actor_task_retries=3")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--log", help="write pytest's whole output here (the failures' tracebacks)")
    args = ap.parse_args()
    result = run(args.repeats, args.control, args.log)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
