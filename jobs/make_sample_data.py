"""Write the synthetic CO3Dv2 and WebVid sample datasets (real on-disk formats) plus ground truth.

python -m jobs.make_sample_data --out DIR [--config jobs/configs/make_sample_data_demo.yaml] [--set co3d.frames_per_sequence=8]
"""

from __future__ import annotations

import argparse
import json

from mvcustom.configs import SampleDataConfig, dump_config, from_dict, load_config
from mvcustom.data.generator import generate_sample_data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder or fsspec URL")
    ap.add_argument("--config", help="YAML config (default: the demo preset)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )
    args = ap.parse_args(argv)
    cfg = (
        load_config(SampleDataConfig, args.config, args.overrides)
        if args.config
        else from_dict(SampleDataConfig, {}, "--set", args.overrides)
    )
    print(dump_config(cfg))
    index = generate_sample_data(args.out, cfg)
    out = args.out.rstrip("/")
    summary = {
        "co3d": f"{out}/co3d" if index["co3d"] else None,
        "webvid": f"{out}/webvid" if index["webvid"] else None,
        "ground_truth": f"{out}/ground_truth",
        "co3d_sequences": sum(len(v) for v in (index["co3d"] or {"categories": {}})["categories"].values()),
        "webvid_videos": len((index["webvid"] or {"videos": []})["videos"]),
        "seconds": index["seconds"],
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
