"""Training throughput, memory and ZeRO partitioning on Ray Train (JSON on stdout).

    python benchmarks/train.py [--workers 2] [--steps 8] [--stages 0,2,3] [--configs debug,larger]

For each config and ZeRO stage: a real ``run_training`` job (Ray Train, ``--workers`` CPU
workers, DeepSpeed) on CO3D shards made from the sample generator. Figures per run, from its
MLflow metrics (rank 0): steady samples/s (median over the steps after the first), peak memory
of the rank-0 process (``ru_maxrss``; CUDA: ``max_memory_allocated``), optimizer-state bytes per
rank and their ratio to stage 0 (target ``1/N``). The loader alone (``batch_stream`` in one
process, the trainer's decode + frame selection) is measured against the trainer's per-rank
consumption (target >= 3x).

Configs: ``debug`` (tiny model, 4 frames of 64x64, batch 1) and ``larger`` (tiny model widths,
8 frames of 64x64, batch 2: the largest that keeps a run under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def make_shards(root: str) -> str:
    from mvcustom.configs import PreprocessConfig, SampleDataConfig
    from mvcustom.configs.base import from_dict
    from mvcustom.data.generator import generate_sample_data
    from pipelines.preprocess import preprocess_inline

    generate_sample_data(f"{root}/data", SampleDataConfig.debug())
    cfg = from_dict(
        PreprocessConfig,
        {
            "preset": "debug",
            "source": "co3d",
            "input": f"{root}/data/co3d",
            "output": f"{root}/shards",
            "samples_per_shard": 1,
            "co3d": {"depth": "dataset"},
        },
        "bench",
    )
    preprocess_inline(cfg)
    return f"{root}/shards"


CONFIGS = {
    "debug": {},
    "larger": {"batch_size": 2, "clip": {"num_frames": 8, "height": 64, "width": 64}},
}


def loader_rate(shards: str, cfg, seconds: float = 10.0) -> float:
    from mvcustom.training.data import batch_stream

    stream = batch_stream(
        shards, cfg.stage, cfg.batch_size, cfg.clip.num_frames, cfg.clip.height, cfg.clip.width, 0, 0, 1
    )
    next(stream)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(stream)
        n += cfg.batch_size
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--configs", default="debug,larger")
    args = ap.parse_args()

    import mlflow
    import ray

    from mvcustom.configs.base import from_dict
    from mvcustom.configs.train import TrainConfig
    from mvcustom.training.launch import run_training

    root = tempfile.mkdtemp(prefix="bench-train-")
    shards = make_shards(root)
    uri = f"sqlite:///{root}/mlflow.db"
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    results = []
    for name in args.configs.split(","):
        base = None
        for stage in [int(s) for s in args.stages.split(",")]:
            data = {
                "preset": "debug",
                "shards": [shards],
                "output": f"{root}/runs/{name}-zero{stage}",
                "max_steps": args.steps,
                "checkpoint_every": 10**6,
                "sample_every": 10**6,
                "deepspeed": {"zero_stage": stage},
                "scaling": {"num_workers": args.workers},
                "mlflow": {"tracking_uri": uri, "experiment": "bench-train"},
                **CONFIGS[name],
            }
            cfg = from_dict(TrainConfig, data, "bench")
            t0 = time.perf_counter()
            out = run_training(cfg)
            wall = time.perf_counter() - t0
            client = mlflow.MlflowClient(uri)

            def history(key, run_id=out["mlflow_run_id"], client=client):
                return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

            rate = statistics.median(history("samples_per_s")[1:] or history("samples_per_s"))
            opt = history("optimizer_state_mib")[-1]
            row = {
                "config": name,
                "zero_stage": stage,
                "workers": args.workers,
                "steady_samples_per_s": round(rate, 3),
                "wall_s": round(wall, 1),
                "peak_memory_mib_rank0": round(max(history("peak_memory_mib")), 1),
                "optimizer_state_mib_per_rank": round(opt, 3),
                "data_wait_fraction": round(statistics.median(history("data_wait_fraction")), 4),
            }
            if stage == 0:
                base = opt
            if base:
                row["optimizer_state_vs_stage0"] = round(opt / base, 3)
                row["target_vs_stage0"] = round(1 / args.workers, 3) if stage else 1.0
            results.append(row)
            print(json.dumps(row), flush=True)
        cfg = from_dict(TrainConfig, {"preset": "debug", **CONFIGS[name]}, "bench")
        consumed = max(r["steady_samples_per_s"] for r in results if r["config"] == name) / args.workers
        rate = loader_rate(shards, cfg)
        results.append(
            {
                "config": name,
                "loader_samples_per_s": round(rate, 2),
                "trainer_samples_per_s_per_rank": round(consumed, 3),
                "loader_vs_consumption": round(rate / consumed, 1),
                "target": 3.0,
            }
        )
    ray.shutdown()
    print(json.dumps({"benchmark": "train", "results": results}, indent=2))


if __name__ == "__main__":
    main()
