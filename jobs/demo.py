"""The end-to-end demo on the embedded default (``make demo``): local Ray, local MLflow (sqlite),
local files, generated mini-datasets, tiny models.

Stages built so far:
  1. generate the sample datasets (CO3Dv2 + WebVid in their real on-disk formats, with ground
     truth) and read them back through the dataset readers;
  2. preprocess both into WebDataset shards with Ray Data (CO3D: annotated cameras and depth;
     WebVid: pycolmap SfM poses and depth from a tiny random ZoeDepth), logged to MLflow.
Planned stages (their issues are open): train stage 1 and 2, evaluate.

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

    print(f"[1/2] generating sample datasets under {out}/data ...", flush=True)
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

    print("[2/2] preprocessing to WebDataset shards (Ray Data) ...", flush=True)
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

    summary = {
        "data": f"{out}/data",
        "shards": {k: v["output"] for k, v in summaries.items()},
        "clips": {k: v["clips_written"] for k, v in summaries.items()},
        "error_records": {k: v["errors"] for k, v in summaries.items()},
        "mlflow": mlflow_uri,
        "mlflow_runs": {k: v["mlflow_run_id"] for k, v in summaries.items()},
        "seconds": round(time.time() - t0, 1),
        "planned": ["train (issue 5)", "evaluate (issue 6)"],
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
