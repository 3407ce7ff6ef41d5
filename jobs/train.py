"""Train stage 1 (backbone) or stage 2 (customization) with Ray Train + DeepSpeed ZeRO.

python -m jobs.train --config jobs/configs/train_backbone_debug.yaml [--set key=value ...]
ray job submit --working-dir . -- python -m jobs.train --config ... --set ray.address=auto

Rerunning the same command resumes from the latest checkpoint in ``<output>/train``.
"""

from __future__ import annotations

import argparse
import json

from mvcustom.configs import TrainConfig, dump_config, load_config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (jobs/configs/train_*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    print(dump_config(cfg), flush=True)

    from mvcustom.training.launch import run_training

    summary = run_training(cfg)
    print(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
