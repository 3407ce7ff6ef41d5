"""Preprocessing throughput: the Ray Data job on 1 and 2 CPUs against a plain single-process loop.

    python benchmarks/preprocess.py [--co3d-sequences 8] [--clips-per-sequence 4] [--out DIR]
                                    [--only co3d_zoedepth] [--placement auto,separate] [--profile]

For each configuration (CO3D with dataset depth, CO3D + ZoeDepth, WebVid decode only, WebVid +
SfM + ZoeDepth) the same clips are produced three ways in one run, each in a fresh process:

* ``plain``: a single-process Python loop doing the same per-record work and writing the same
  shards (``preprocess_inline``: the job's own ``ShardWorker``, no Ray), pinned to one core;
* ``ray_1cpu`` / ``ray_2cpu``: the job (``run_preprocess``) on an embedded Ray of 1 / 2 CPUs, the
  whole process tree (driver, GCS, raylet, workers) pinned to 1 / 2 cores.

Both are timed as programs: from the process's start (interpreter, imports, model load, listing
included) to its end, less ``ray.init`` and ``ray.shutdown`` for the Ray runs (starting and stopping
the cluster is not the job's work: a cluster is up before jobs are submitted). Ray's worker processes import torch and load
the model on the clock, as the plain loop does. Prints one JSON document: clips/s of each end to
end and in steady state (between the first and the last shard commit), and the ratios
``ray_1cpu / plain`` (target >= 0.9) and ``ray_2cpu / plain`` (target >= 1.8). The ZoeDepth model
is the tiny random one (the model's own speed is not what is measured here), so depth figures
show the pipeline's overhead only. ``--placement`` runs the depth configurations' Ray runs once
per ``depth.placement`` (``fused``: one pool of shard workers; ``separate``: build tasks ->
depth actors -> write tasks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _pin(cores: int) -> None:
    """Restrict this process (and every process it starts, Ray's included) to ``cores`` cores."""
    os.sched_setaffinity(0, set(range(min(cores, os.cpu_count() or 1))))
    os.environ["OMP_NUM_THREADS"] = str(cores)


class CpuSampler:
    """CPU seconds of this process and every process below it (Ray's GCS, raylet, agents,
    workers), sampled every ``period`` s in a thread and grouped by role (a worker's process
    title names the task or actor it runs): where the cores go during a run."""

    def __init__(self, period: float = 0.25):
        import threading

        self.period, self.seen, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _role(p) -> str:
        cmd = p.cmdline()
        if not cmd:
            return p.name()
        head = os.path.basename(cmd[0])
        if head.startswith("ray::"):  # a worker's title: the task or actor it runs now
            return " ".join(cmd)[:50]
        for key in ("dashboard/agent.py", "runtime_env/agent", "log_monitor", "monitor.py"):
            if any(key in c for c in cmd):
                return key
        return head if p.pid != os.getpid() else "driver"

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = (self._role(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self.start = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self) -> dict[str, dict]:
        """``{role: {"cpu_s": seconds, "processes": n}}``, busiest first."""
        out: dict[str, dict] = {}
        for pid, (role, cpu) in self.seen.items():
            entry = out.setdefault(role.strip(), {"cpu_s": 0.0, "processes": 0})
            entry["cpu_s"] += cpu - self.start.get(pid, (role, 0.0))[1]
            entry["processes"] += 1
        ranked = sorted(out.items(), key=lambda kv: -kv[1]["cpu_s"])
        return {k: {**v, "cpu_s": round(v["cpu_s"], 2)} for k, v in ranked if v["cpu_s"] >= 0.05}


def _child(mode: str, cpus: int, cfg_json: str, profile: bool) -> None:
    """One measured run in this (fresh) process; prints its result as the last stdout line."""
    _pin(cpus)
    from mvcustom.configs import PreprocessConfig, from_dict

    cfg = from_dict(PreprocessConfig, json.loads(cfg_json), "bench")
    out: dict = {"cluster_s": 0.0}  # the embedded cluster's start and stop, not the job's work
    if mode == "plain":
        import torch

        torch.set_num_threads(cpus)
        from pipelines.preprocess import preprocess_inline

        r = preprocess_inline(cfg)
        out.update(clips=r["clips_written"], commits=r["commits"])
    else:
        import dataclasses

        import ray

        from mvcustom.configs.common import init_ray
        from pipelines.preprocess import run_preprocess

        t = time.perf_counter()
        init_ray(dataclasses.replace(cfg.ray, num_cpus=cpus), log_to_driver=False)  # as the job does
        out["cluster_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with CpuSampler() if profile else contextlib.nullcontext() as sampler:
            s = run_preprocess(cfg)
        if sampler:
            out["profile"] = {
                "wall_s": round(time.perf_counter() - t, 2),
                "cpu_s_by_process": sampler.by_role(),
            }
        out.update(clips=s["clips_written"], steady=s["steady_clips_per_s"])
        t = time.perf_counter()
        ray.shutdown()
        out["cluster_s"] += time.perf_counter() - t
    print("RESULT " + json.dumps(out), flush=True)


def _measure(mode: str, cpus: int, cfg_dict: dict, profile: bool) -> dict:
    """Run :func:`_child` in a fresh process; wall clock from its start to its end, less the embedded
    cluster's start and stop (``ray.init``, ``ray.shutdown``)."""
    from pipelines.preprocess import steady_rate

    cmd = [sys.executable, __file__, "--child", mode, "--cpus", str(cpus), "--cfg", json.dumps(cfg_dict)]
    if profile:
        cmd.append("--profile")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    r = json.loads(lines[-1][len("RESULT ") :])
    steady = steady_rate([tuple(c) for c in r["commits"]]) if mode == "plain" else r["steady"]
    result = {"clips_per_s": r["clips"] / (wall - r["cluster_s"]), "steady": steady, "clips": r["clips"]}
    return {**result, "cluster_s": r["cluster_s"], **({"profile": r["profile"]} if "profile" in r else {})}


def _run_mode(args, root: str, name: str, base: dict, extra: dict, mode: str, placement: str | None) -> dict:
    from mvcustom.configs import PreprocessConfig, from_dict

    out = f"{root}/out/{name}/{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_dict = {**base, **extra, "output": out}
    depth = {**extra.get("depth", {})}
    if placement is not None:
        depth["placement"] = placement
    cfg = from_dict(PreprocessConfig, {**cfg_dict, "depth": depth}, name)  # validated here
    cpus = 2 if mode.endswith("ray_2cpu") else 1
    if mode != "plain" and not cfg.depth.fused and args.depth_actors == "per-cpu":
        depth["actors"] = cpus  # one model per core
    kind = "plain" if mode == "plain" else "ray"
    return _measure(kind, cpus, {**cfg_dict, "depth": depth}, args.profile and kind == "ray")


def _summarise(runs: dict[str, list[dict]], repeats: int) -> dict:
    """Median clips/s per mode, and per-repeat ratios to that repeat's plain run (median, range)."""
    import statistics

    def rnd(v):
        return None if v is None else round(v, 3)

    row: dict = {"clips": runs["plain"][0]["clips"], "repeats": repeats}
    for mode, rs in runs.items():
        row[f"{mode}_clips_per_s"] = rnd(statistics.median(r["clips_per_s"] for r in rs))
        steady = [r["steady"] for r in rs if r["steady"]]
        row[f"{mode}_steady_clips_per_s"] = rnd(statistics.median(steady)) if steady else None
        if mode != "plain":
            row[f"{mode}_ray_start_stop_s"] = rnd(statistics.median(r["cluster_s"] for r in rs))
            if "profile" in rs[-1]:
                row[f"{mode}_profile"] = rs[-1]["profile"]
    for mode, rs in runs.items():
        if mode == "plain":
            continue
        ratios = [r["clips_per_s"] / p["clips_per_s"] for r, p in zip(rs, runs["plain"], strict=True)]
        row[f"ratio_{mode}_vs_plain"] = rnd(statistics.median(ratios))
        row[f"ratio_{mode}_vs_plain_range"] = [rnd(min(ratios)), rnd(max(ratios))]
        steady = [
            r["steady"] / p["steady"]
            for r, p in zip(rs, runs["plain"], strict=True)
            if r["steady"] and p["steady"]
        ]
        if steady:
            row[f"steady_ratio_{mode}_vs_plain"] = rnd(statistics.median(steady))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--co3d-sequences", type=int, default=8, help="sequences per category (2 categories)")
    ap.add_argument("--webvid-videos", type=int, default=8)
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--profile", action="store_true", help="CPU seconds per Ray process during each run")
    ap.add_argument(
        "--placement",
        default="auto",
        help="comma-separated depth.placement values to run (auto, fused, separate): the depth "
        "configurations' Ray runs are repeated for each",
    )
    ap.add_argument(
        "--depth-actors",
        choices=["config", "per-cpu"],
        default="config",
        help="ZoeDepth actors of the separate layout's Ray runs: the config's (1) or one per CPU",
    )
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians reported)")
    ap.add_argument("--clips-per-sequence", type=int, default=4, help="CO3D clips per sequence")
    ap.add_argument("--child", choices=["plain", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.cpus, args.cfg, args.profile)
        return

    from mvcustom.configs import SampleDataConfig, from_dict
    from mvcustom.data.generator import generate_sample_data
    from mvcustom.models.zoedepth import save_tiny_zoedepth

    root = args.out or tempfile.mkdtemp(prefix="bench-preprocess-")
    t = time.perf_counter()
    data_cfg = from_dict(
        SampleDataConfig,
        {
            "co3d": {
                "categories": ["chair", "car"],
                "sequences_per_category": args.co3d_sequences,
                "frames_per_sequence": 24,
                "image_sizes": [[240, 320]],
            },
            "webvid": {
                "num_videos": args.webvid_videos,
                "height": 180,
                "width": 320,
                "fps": 24,
                "duration_s": 2.0,
                "motions": ["orbit", "arc"],
            },
        },
        "bench",
    )
    if not os.path.exists(f"{root}/data/ground_truth/index.json"):  # --out DIR reuses its data
        generate_sample_data(f"{root}/data", data_cfg)
    zoe = save_tiny_zoedepth(f"{root}/tiny-zoedepth")
    gen_s = time.perf_counter() - t

    base = {
        "split": "train",
        "samples_per_shard": 2,
        "mlflow": {"enabled": False},
        "clip": {"num_frames": 16, "height": 128, "width": 128},
    }
    configs = {
        "co3d_dataset_depth": {
            "source": "co3d",
            "input": f"{root}/data/co3d",
            "samples_per_shard": 8,
            "co3d": {"depth": "dataset", "clips_per_sequence": args.clips_per_sequence},
        },
        "co3d_zoedepth": {
            "source": "co3d",
            "input": f"{root}/data/co3d",
            "samples_per_shard": 8,
            "co3d": {"depth": "zoedepth", "clips_per_sequence": args.clips_per_sequence},
            "depth": {"model": zoe, "input_size": [128, 128], "flip_average": False},
        },
        "webvid_decode_only": {
            "source": "webvid",
            "input": f"{root}/data/webvid",
            "estimate_poses": False,
            "estimate_depth": False,
            "webvid": {"target_fps": 8.0},
        },
        "webvid_sfm_zoedepth": {
            "source": "webvid",
            "input": f"{root}/data/webvid",
            "webvid": {"target_fps": 8.0},
            "depth": {"model": zoe, "input_size": [128, 128], "flip_average": False},
        },
    }
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    results = {"data_generation_s": round(gen_s, 1), "machine_cpus": os.cpu_count(), "configs": {}}
    placements = args.placement.split(",")
    for name, extra in configs.items():
        depth = extra.get("estimate_depth", True) and extra.get("co3d", {}).get("depth") != "dataset"
        modes = [("plain", None)] + [
            (f"{p}_{m}" if depth and len(placements) > 1 else m, p if depth else None)
            for p in (placements if depth else ["auto"])
            for m in ("ray_1cpu", "ray_2cpu")
        ]
        runs: dict[str, list[dict]] = {m: [] for m, _ in modes}
        for rep in range(args.repeats):  # interleaved, order reversed every other repeat: the
            for mode, placement in modes if rep % 2 == 0 else modes[::-1]:  # host's speed drifts
                runs[mode].append(_run_mode(args, root, name, base, extra, mode, placement))
        row = _summarise(runs, args.repeats)
        results["configs"][name] = row
        print(json.dumps({name: row}), flush=True)
    results["targets"] = {"ratio_ray_1cpu_vs_plain": ">= 0.9", "ratio_ray_2cpu_vs_plain": ">= 1.8"}
    print(json.dumps(results, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
