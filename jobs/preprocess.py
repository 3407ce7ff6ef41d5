"""Preprocess CO3Dv2 or WebVid into WebDataset shards (Ray Data).

python -m jobs.preprocess --config jobs/configs/preprocess_co3d_debug.yaml [--set key=value ...]
ray job submit --working-dir . -- python -m jobs.preprocess --config ...

Exits 1, naming the shards, when any planned shard was not committed (rerun = resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

import fsspec

from mvcustom.configs import PreprocessConfig, dump_config, load_config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (jobs/configs/preprocess_*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(PreprocessConfig, args.config, args.overrides)
    print(dump_config(cfg), flush=True)

    from mvcustom.training.tracking import log_job
    from pipelines.preprocess import run_preprocess

    summary = run_preprocess(cfg)
    fs, root = fsspec.core.url_to_fs(cfg.output)
    with tempfile.TemporaryDirectory() as d:  # MLflow artifacts must be local files
        os.makedirs(f"{d}/tables")
        for name in ("manifest.parquet", "errors.parquet"):
            fs.get(f"{root}/{name}", f"{d}/tables/{name}")
        artifacts = {"tables": f"{d}/tables"}
        if summary["clips_written"] and cfg.mlflow.enabled:  # the shard inspector (jobs.inspect_shards)
            from mvcustom.data.inspector import inspect_shards

            inspect_shards(cfg.output, f"{d}/inspector")
            artifacts["inspector"] = f"{d}/inspector"
        summary["mlflow_run_id"] = log_job(cfg, cfg.mlflow, summary, artifacts)
    from mvcustom.training.tracking import record_data_run

    record_data_run(cfg.output, summary["mlflow_run_id"])  # lineage: training tags this run
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    if not summary["complete"]:
        from pipelines.preprocess import failure_report

        rerun = shlex.join(["python", "-m", "jobs.preprocess", *(sys.argv[1:] if argv is None else argv)])
        print(failure_report(summary, rerun), file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
