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
  4. evaluate: generate multi-view clips of the trained subject along camera trajectories placed
     around its reference views (Ray Data actors; with and without feature rendering), score
     them (pose accuracy, consistency, identity, text alignment), write results, an HTML
     report and an MLflow run.

    python -m jobs.demo --out .demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

# Ray Data logs its progress every 10 s when stdout is not a terminal (CI, a pipe): every 30 s
# keeps each stage of the demo on one screen. Read when ray.data is imported, so set first.
os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")

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

    print(f"[1/4] generating sample datasets under {out}/data ...", flush=True)
    index = generate_sample_data(f"{out}/data", load_config(SampleDataConfig, args.config))
    root = f"{out}/data/co3d"
    subject = None  # the one subject stage 2 customizes: the first sequence of the teddybears
    for category in index["co3d"]["categories"]:
        cat = co3d.load_category(root, category)
        if subject is None or category == "teddybear":
            subject = (category, sorted(cat.sequences)[0])
        n = sum(len(v) for v in cat.frames_by_sequence.values())
        print(
            f"  co3d/{category}: {len(cat.sequences)} sequences, {n} frames, subsets {co3d.available_subsets(root, category)}"
        )
    for v in index["webvid"]["videos"]:
        print(f"  webvid/{v['path']}: {v['num_frames']} frames, camera motion {v['motion']}")

    print("[2/4] preprocessing to WebDataset shards (Ray Data) ...", flush=True)
    from mvcustom.models.zoedepth import save_tiny_zoedepth
    from mvcustom.training.tracking import log_job, record_data_run
    from pipelines.preprocess import run_preprocess

    zoe = save_tiny_zoedepth(f"{out}/models/tiny-zoedepth")
    mlflow_uri = f"sqlite:///{out}/mlflow.db"
    summaries = {}
    cfgs = {
        source: load_config(
            PreprocessConfig,
            CONFIGS / f"preprocess_{source}_debug.yaml",
            [
                f"input={out}/data/{source}",
                f"output={out}/shards/{source}",
                f"depth.model={zoe}",
                f"mlflow.tracking_uri={mlflow_uri}",
            ],
        )
        for source in ("co3d", "webvid")
    }
    from mvcustom.configs.common import init_ray

    init_ray(cfgs["co3d"].ray, ray_train=True)  # the one embedded Ray of every stage (stage 3: Ray Train)
    for source, cfg in cfgs.items():
        s = run_preprocess(cfg)
        if not s["complete"]:
            from pipelines.preprocess import failure_report

            raise SystemExit(failure_report(s, "make demo"))
        artifacts = {}
        if s["clips_written"]:  # look at the data before training on it
            from mvcustom.data.inspector import inspect_shards

            (s["inspector"],) = inspect_shards(cfg.output, f"{out}/inspect/{source}", samples=3)
            artifacts["inspector"] = f"{out}/inspect/{source}"
        s["mlflow_run_id"] = log_job(cfg, cfg.mlflow, s, artifacts)
        record_data_run(cfg.output, s["mlflow_run_id"])  # lineage: the training runs tag it
        summaries[source] = s
        print(
            f"  {source}: {s['clips_written']} clips in {s['shards_total']} shards, {s['errors']} error records, {s['seconds']} s -> {cfg.output}"
        )
        if s.get("inspector"):
            print(f"    shard inspector: {s['inspector']}")
        for stage, info in s["failure_reasons"].items():
            print(f"    {stage}: {info['count']} (e.g. {info['examples'][0]})")

    print("[3/4] training stage 1 then stage 2 (Ray Train, 2 workers, DeepSpeed ZeRO-2) ...", flush=True)
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
        (
            "customize",
            [summaries["co3d"]["output"]],
            [f"init_from={out}/runs/backbone/export", f"data.subject={subject[0]}/{subject[1]}"],
        ),
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
        if t.get("subject"):
            print(f"  {stage}: learned {cfg.subject_token} = CO3D {', '.join(t['subject'])}")
        print(
            f"  {stage}: {t['step']} steps, loss {t['loss']:.3f}, {t['samples_per_s']:.2f} samples/s, "
            f"resumed from {t['resumed_from']} -> {t['export']}"
        )

    print("[4/4] evaluating: generate along camera paths, score, report (Ray Data) ...", flush=True)
    import yaml

    from mvcustom.configs import EvaluateConfig
    from pipelines.evaluation.job import run_evaluate

    spec = {
        "subjects": [
            {
                "name": f"{subject[0]}-{subject[1]}",
                "shards": summaries["co3d"]["output"],
                "sequence": subject[1],
                "num_references": 2,
            }
        ],
        "prompts": ["a photo of a <sks> teddybear in a garden"],
        "trajectories": [
            {"name": "arc60", "kind": "arc", "span_deg": 60},
            {"name": "lateral", "kind": "lateral"},  # the paper's x-translation (Fig. 5a)
            {"name": "zoom", "kind": "zoom", "end_fov_deg": 30},  # scored by homography
        ],
        "seeds": [0],
        "variants": {"mvcustom": {}, "no_rendering": {"feature_rendering": False}},
    }
    Path(f"{out}/eval_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # the demo evaluates afresh: a rerun of the demo retrains, and an evaluation output refuses
    # samples of another model (pipelines.evaluation.job.check_fingerprint)
    shutil.rmtree(f"{out}/eval", ignore_errors=True)
    ecfg = load_config(
        EvaluateConfig,
        CONFIGS / "evaluate_debug.yaml",
        [
            f"model={trained['customize']['export']}",
            f"depth_model={zoe}",
            f"spec={out}/eval_spec.yaml",
            f"output={out}/eval",
            f"mlflow.tracking_uri={mlflow_uri}",
            "clip.height=64",
            "clip.width=64",
        ],
    )
    ev = run_evaluate(ecfg)
    from pipelines.evaluation.job import failure_lines

    if not ev["complete"]:
        raise SystemExit(
            f"evaluation INCOMPLETE: {ev['failed']} of {ev['samples']} samples:\n  "
            + "\n  ".join(failure_lines(ev))
        )
    print(
        f"  {ev['scored']}/{ev['samples']} samples scored ({ev['failed']} failed), "
        f"{ev.get('samples_per_min', 0):.1f} samples/min -> {ev['output']}/results.parquet"
    )
    for line in failure_lines(ev):  # scored, but e.g. a pose reconstruction failed: once per reason
        print(f"    {line}")
    print(f"  report: {ev['report']}")
    print(f"  MLflow run {ev['mlflow_run_id']} ({mlflow_uri}; `mlflow ui --backend-store-uri {mlflow_uri}`)")

    summary = {
        "data": f"{out}/data",
        "shards": {k: v["output"] for k, v in summaries.items()},
        "clips": {k: v["clips_written"] for k, v in summaries.items()},
        "error_records": {k: v["errors"] for k, v in summaries.items()},
        "mlflow": mlflow_uri,
        "mlflow_runs": {k: v["mlflow_run_id"] for k, v in summaries.items()},
        "inspector": {k: v["inspector"] for k, v in summaries.items() if v.get("inspector")},
        "subject": f"{subject[0]}/{subject[1]}",
        "training": {
            k: {"export": v["export"], "mlflow_run_id": v["mlflow_run_id"], "loss": v["loss"]}
            for k, v in trained.items()
        },
        "evaluation": {
            "results": f"{ev['output']}/results.parquet",
            "report": ev["report"],
            "mlflow_run_id": ev["mlflow_run_id"],
            "scored": ev["scored"],
            **{k: v for k, v in ev.items() if k.endswith("_mean")},
        },
        "seconds": round(time.time() - t0, 1),
    }
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done in {summary['seconds']:.0f} s; summary (paths, run ids, figures): {out}/summary.json")
    return summary


if __name__ == "__main__":
    main()
