"""Accuracy and cost of the WebVid SfM stage against the generator's true cameras (JSON out).

    python benchmarks/sfm_accuracy.py [--videos 8] [--frames 16] [--fps 8]

Renders clips of every camera motion (orbit, arc, dolly, truck, static), decodes them as the
pipeline does, runs :func:`pipelines.sfm.run_sfm` (unknown shared focal) and reports, per clip:
registered frames, seconds, median/max relative rotation error (deg), median relative
translation-direction error (deg), camera-centre error after Umeyama similarity alignment (as a
fraction of the trajectory length), and focal-length error. Failures are reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from mvcustom.configs import SampleDataConfig, from_dict
from mvcustom.configs.preprocess import SfmConfig
from mvcustom.data.generator import generate_sample_data
from mvcustom.geometry import Cameras, align_cameras, relative_pose_errors
from pipelines.webvid_records import decode_frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=10)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--matcher", default="sequential", choices=["sequential", "exhaustive"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = from_dict(
            SampleDataConfig,
            {
                "write_co3d": False,
                "webvid": {
                    "num_videos": args.videos,
                    "duration_s": args.frames / args.fps + 0.2,
                    "motions": ["orbit", "arc", "dolly", "truck", "static"],
                },
            },
            "bench",
        )
        index = generate_sample_data(d, cfg)
        rows = []
        for v in index["webvid"]["videos"]:
            frames, fps, idx = decode_frames(f"{d}/webvid/{v['path']}", args.frames, args.fps)
            gt = np.load(f"{d}/ground_truth/webvid/{v['videoid']}.npz")
            true = Cameras(
                torch.from_numpy(gt["w2c"][idx]), torch.from_numpy(gt["K"][idx]), tuple(gt["image_hw"][0])
            )
            from pipelines.sfm import run_sfm

            t = time.perf_counter()
            res = run_sfm(frames, SfmConfig(matcher=args.matcher))
            row = {
                "motion": v["motion"],
                "registered": f"{res.registered}/{res.total}",
                "seconds": round(time.perf_counter() - t, 2),
            }
            if res.ok:
                err = relative_pose_errors(res.cameras, true)
                length = float((true.centers[1:] - true.centers[:-1]).norm(dim=-1).sum())
                try:
                    _, info = align_cameras(res.cameras, true)
                    center = round(float(info["center_error"].max()) / max(length, 1e-9), 4)
                except ValueError:  # a straight (dolly/truck) path: centre alignment is undetermined
                    center = None
                row.update(
                    rotation_err_deg_median=round(float(err["rotation_deg"].median()), 3),
                    rotation_err_deg_max=round(float(err["rotation_deg"].max()), 3),
                    translation_dir_err_deg_median=round(
                        float(np.nanmedian(err["translation_deg"].numpy())), 3
                    ),
                    center_err_vs_path=center,
                    focal_rel_err=round(float(res.cameras.K[0, 0, 0] / true.K[0, 0, 0] - 1), 4),
                )
            else:
                row["failure"] = res.reason
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in rows if "failure" not in r]
    summary = {
        "clips": len(rows),
        "posed": len(ok),
        "by_motion": {
            m: {
                "posed": sum(1 for r in ok if r["motion"] == m),
                "of": sum(1 for r in rows if r["motion"] == m),
                "median_rotation_err_deg": float(
                    np.median([r["rotation_err_deg_median"] for r in ok if r["motion"] == m])
                )
                if any(r["motion"] == m for r in ok)
                else None,
            }
            for m in sorted({r["motion"] for r in rows})
        },
        "mean_seconds_per_clip": round(float(np.mean([r["seconds"] for r in rows])), 2),
        "frames_per_clip": args.frames,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
