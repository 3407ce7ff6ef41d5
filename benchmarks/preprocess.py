"""Preprocessing throughput: the Ray Data job on 1 and 2 CPUs against a plain single-process loop.

    python benchmarks/preprocess.py [--co3d-sequences 8] [--webvid-videos 8] [--out DIR]

For each configuration (CO3D with dataset depth, CO3D + ZoeDepth, WebVid decode only, WebVid +
SfM + ZoeDepth) the same clips are produced three ways in one run:

* ``plain``: a single-process Python loop doing the same per-record work and writing the same
  shards (the decode-bound reference, no Ray), pinned to one core;
* ``ray_1cpu`` / ``ray_2cpu``: ``run_preprocess`` on an embedded Ray of 1 / 2 CPUs, the whole
  process tree (driver, raylet, workers) pinned to 1 / 2 cores.

Prints one JSON document: clips/s of each end to end (listing, Ray start-up of workers and
imports included; ``ray.init`` itself excluded) and in steady state (between the first and the
last shard commit), and the ratios ``ray_1cpu / plain`` (target >= 0.9) and ``ray_2cpu / plain``
(target >= 1.8). The ZoeDepth model is the tiny random one (the model's
own speed is not what is measured here), so depth figures show the pipeline's overhead only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _pin(cores: int) -> None:
    """Restrict this process (and every process it starts, Ray's included) to ``cores`` cores."""
    os.sched_setaffinity(0, set(range(min(cores, os.cpu_count() or 1))))
    import torch

    torch.set_num_threads(cores)


def _plain(cfg) -> tuple[float, float | None, int]:
    """The job's own per-shard functions (build, depth, write) called in a plain loop, one core."""
    _pin(1)
    from pipelines.preprocess import preprocess_inline, steady_rate

    t0 = time.perf_counter()
    out = preprocess_inline(cfg)
    n = out["clips_written"]
    return n / (time.perf_counter() - t0), steady_rate(out["commits"]), n


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


def _ray(cfg, num_cpus: int, profile: dict | None = None) -> tuple[float, float | None, int]:
    import ray

    from mvcustom.configs.common import init_ray
    from pipelines.preprocess import run_preprocess

    _pin(num_cpus)  # Ray's processes inherit the affinity: 1 CPU means one core for everything
    init_ray(dataclasses.replace(cfg.ray, num_cpus=num_cpus), log_to_driver=False)  # as the job does
    try:
        t0 = time.perf_counter()
        with CpuSampler() as cpu:
            s = run_preprocess(cfg)
        wall = time.perf_counter() - t0
        if profile is not None:
            profile.update(wall_s=round(wall, 2), cpu_s_by_process=cpu.by_role())
        return s["clips_written"] / wall, s["steady_clips_per_s"], s["clips_written"]
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--co3d-sequences", type=int, default=8, help="sequences per category (2 categories)")
    ap.add_argument("--webvid-videos", type=int, default=8)
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--profile", action="store_true", help="CPU seconds per Ray process during each run")
    ap.add_argument(
        "--depth-actors",
        choices=["config", "per-cpu"],
        default="config",
        help="ZoeDepth actors of the Ray runs: the config's (1) or one per CPU",
    )
    args = ap.parse_args()

    from mvcustom.configs import PreprocessConfig, SampleDataConfig, from_dict
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
            "co3d": {"depth": "dataset", "clips_per_sequence": 4},
        },
        "co3d_zoedepth": {
            "source": "co3d",
            "input": f"{root}/data/co3d",
            "samples_per_shard": 8,
            "co3d": {"depth": "zoedepth", "clips_per_sequence": 4},
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
    for name, extra in configs.items():
        row = {}
        for mode in ("plain", "ray_1cpu", "ray_2cpu"):
            out = f"{root}/out/{name}/{mode}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = from_dict(PreprocessConfig, {**base, **extra, "output": out}, name)
            if mode != "plain" and args.depth_actors == "per-cpu":
                cfg.depth.actors = 1 if mode == "ray_1cpu" else 2  # one model per core
            profile: dict | None = {} if args.profile and mode != "plain" else None
            if mode == "plain":
                rate, steady, n = _plain(cfg)
            else:
                rate, steady, n = _ray(cfg, 1 if mode == "ray_1cpu" else 2, profile)
            if profile:
                row[f"{mode}_profile"] = profile
            row[f"{mode}_clips_per_s"] = round(rate, 3)
            row[f"{mode}_steady_clips_per_s"] = None if steady is None else round(steady, 3)
            row["clips"] = n
        for m in ("ray_1cpu", "ray_2cpu"):
            row[f"ratio_{m}_vs_plain"] = round(row[f"{m}_clips_per_s"] / row["plain_clips_per_s"], 3)
            if row[f"{m}_steady_clips_per_s"] and row["plain_steady_clips_per_s"]:
                row[f"steady_ratio_{m}_vs_plain"] = round(
                    row[f"{m}_steady_clips_per_s"] / row["plain_steady_clips_per_s"], 3
                )
        results["configs"][name] = row
        print(json.dumps({name: row}), flush=True)
    results["targets"] = {"ratio_ray_1cpu_vs_plain": ">= 0.9", "ratio_ray_2cpu_vs_plain": ">= 1.8"}
    print(json.dumps(results, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
