"""The end-to-end demo on the embedded default (``make demo``): local Ray, local MLflow (sqlite),
local files, generated mini-datasets, tiny models.

Stages built so far:
  1. generate the sample datasets (CO3Dv2 + WebVid in their real on-disk formats, with ground
     truth) and read them back through the dataset readers;
  2. preprocess both into WebDataset shards with Ray Data (CO3D: annotated cameras and depth;
     WebVid: pycolmap SfM poses and depth from a tiny random ZoeDepth), logged to MLflow.
  3. train stage 1 (backbone: motion modules with progressive STT + camera encoder) on the shards
     with Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, then stage 2 (customization: FeatureNeRF +
     subject token) from the stage-1 export on the CO3D shards; both logged to MLflow.
Planned stage (its issue is open): evaluate.

    python -m jobs.demo --out .demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mvcustom.configs import PreprocessConfig, SampleDataConfig, load_config
from mvcustom.data import co3d
from mvcustom.data.generator import generate_sample_data

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".demo", help="demo folder (default .demo)")
    ap.add_argument(
        "--config", default=str(CONFIGS / "make_sample_data_demo.yaml"), help="sample-data config"
    )
    args = ap.parse_args(argv)
    out = str(Path(args.out).resolve())
    t0 = time.time()

    print(f"[1/3] generating sample datasets under {out}/data ...", flush=True)
    index = generate_sample_data(f"{out}/data", load_config(SampleDataConfig, args.config))
    root = f"{out}/data/co3d"
    for category in index["co3d"]["categories"]:
        cat = co3d.load_category(root, category)
        n = sum(len(v) for v in cat.frames_by_sequence.values())
        print(
            f"  co3d/{category}: {len(cat.sequences)} sequences, {n} frames, subsets {co3d.available_subsets(root, category)}"
        )
    for v in index["webvid"]["videos"]:
        print(f"  webvid/{v['path']}: {v['num_frames']} frames, camera motion {v['motion']}")

    print("[2/3] preprocessing to WebDataset shards (Ray Data) ...", flush=True)
    from mvcustom.models.zoedepth import save_tiny_zoedepth
    from pipelines.preprocess import run_preprocess
    from pipelines.tracking import log_job

    zoe = save_tiny_zoedepth(f"{out}/models/tiny-zoedepth")
    mlflow_uri = f"sqlite:///{out}/mlflow.db"
    summaries = {}
    for source in ("co3d", "webvid"):
        cfg = load_config(
            PreprocessConfig,
            CONFIGS / f"preprocess_{source}_debug.yaml",
            [
                f"input={out}/data/{source}",
                f"output={out}/shards/{source}",
                f"depth.model={zoe}",
                f"mlflow.tracking_uri={mlflow_uri}",
            ],
        )
        s = run_preprocess(cfg)
        s["mlflow_run_id"] = log_job(cfg, cfg.mlflow, s)
        summaries[source] = s
        print(
            f"  {source}: {s['clips_written']} clips in {s['shards_total']} shards, {s['errors']} error records, {s['seconds']} s -> {cfg.output}"
        )
        for stage, info in s["failure_reasons"].items():
            print(f"    {stage}: {info['count']} (e.g. {info['examples'][0]})")

    print("[3/3] training stage 1 then stage 2 (Ray Train, 2 workers, DeepSpeed ZeRO-2) ...", flush=True)
    from mvcustom.configs import TrainConfig
    from mvcustom.data.reader import expand_shards
    from mvcustom.training.launch import run_training

    with_shards = []
    for k, v in summaries.items():
        try:
            expand_shards(v["output"])
            with_shards.append(v["output"])
        except FileNotFoundError:
            print(f"  ({k} produced no shards; training without it)")
    trained = {}
    for stage, shards, extra in (
        ("backbone", with_shards, []),
        ("customize", [summaries["co3d"]["output"]], [f"init_from={out}/runs/backbone/export"]),
    ):
        cfg = load_config(
            TrainConfig,
            CONFIGS / f"train_{stage}_debug.yaml",
            [
                f"shards=[{', '.join(shards)}]",
                f"output={out}/runs/{stage}",
                f"mlflow.tracking_uri={mlflow_uri}",
                "scaling.num_workers=2",
                "deepspeed.zero_stage=2",
                *extra,
            ],
        )
        trained[stage] = run_training(cfg)
        t = trained[stage]
        print(
            f"  {stage}: {t['step']} steps, loss {t['loss']:.3f}, {t['samples_per_s']:.2f} samples/s, "
            f"resumed from {t['resumed_from']} -> {t['export']}"
        )

    summary = {
        "data": f"{out}/data",
        "shards": {k: v["output"] for k, v in summaries.items()},
        "clips": {k: v["clips_written"] for k, v in summaries.items()},
        "error_records": {k: v["errors"] for k, v in summaries.items()},
        "mlflow": mlflow_uri,
        "mlflow_runs": {k: v["mlflow_run_id"] for k, v in summaries.items()},
        "training": {
            k: {"export": v["export"], "mlflow_run_id": v["mlflow_run_id"], "loss": v["loss"]}
            for k, v in trained.items()
        },
        "seconds": round(time.time() - t0, 1),
        "planned": ["evaluate (issue 6)"],
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
