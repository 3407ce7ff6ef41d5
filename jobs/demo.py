"""The end-to-end demo on the embedded default (``make demo``).

Stages built so far:
  1. generate the sample datasets (CO3Dv2 + WebVid in their real on-disk formats, with ground
     truth) and read them back through the dataset readers.
Planned stages (their issues are open): preprocess to shards, train stage 1 and 2, evaluate.

    python -m jobs.demo --out .demo
"""

from __future__ import annotations

import argparse
import json
import time

from mvcustom.configs import SampleDataConfig, load_config
from mvcustom.data import co3d
from mvcustom.data.generator import generate_sample_data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".demo", help="demo folder (default .demo)")
    ap.add_argument("--config", default="jobs/configs/make_sample_data_demo.yaml")
    args = ap.parse_args(argv)
    out = args.out.rstrip("/")
    t0 = time.time()
    cfg = load_config(SampleDataConfig, args.config)
    print(f"[1/1] generating sample datasets under {out}/data ...", flush=True)
    index = generate_sample_data(f"{out}/data", cfg)
    root = f"{out}/data/co3d"
    for category in index["co3d"]["categories"]:
        cat = co3d.load_category(root, category)
        n = sum(len(v) for v in cat.frames_by_sequence.values())
        print(
            f"  co3d/{category}: {len(cat.sequences)} sequences, {n} frames, subsets {co3d.available_subsets(root, category)}"
        )
    for v in index["webvid"]["videos"]:
        print(f"  webvid/{v['path']}: {v['num_frames']} frames, camera motion {v['motion']}")
    summary = {
        "co3d": root,
        "webvid": f"{out}/data/webvid",
        "ground_truth": f"{out}/data/ground_truth",
        "seconds": round(time.time() - t0, 1),
        "planned": ["preprocess -> shards (issue 3)", "train (issue 5)", "evaluate (issue 6)"],
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
