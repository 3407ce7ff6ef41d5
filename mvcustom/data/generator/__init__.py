"""Synthetic datasets in the real on-disk formats, with exact ground truth.

``generate_sample_data(out, cfg)`` writes::

    <out>/co3d/            a CO3Dv2 tree (mvcustom.data.co3d documents the layout)
    <out>/webvid/          a WebVid tree (CSV + videos/{page_dir}/{videoid}.mp4)
    <out>/ground_truth/    sidecar: true OpenCV cameras, exact depth, surface points
                           (for tests and benchmarks; dataset readers never look here)
    <out>/ground_truth/index.json
"""

from __future__ import annotations

import json
import time

import fsspec

from mvcustom.configs.base import to_dict
from mvcustom.configs.sample_data import SampleDataConfig


def generate_sample_data(out: str, cfg: SampleDataConfig | None = None) -> dict:
    """Render and write the sample datasets; returns the index (also saved as ground_truth/index.json)."""
    from mvcustom.data.generator.co3d_writer import write_co3d
    from mvcustom.data.generator.webvid_writer import write_webvid

    cfg = cfg or SampleDataConfig()
    out = out.rstrip("/")
    t0 = time.time()
    index: dict = {"config": to_dict(cfg), "co3d": None, "webvid": None}
    if cfg.write_co3d:
        index["co3d"] = write_co3d(f"{out}/co3d", cfg.co3d, cfg.seed, f"{out}/ground_truth")
    if cfg.write_webvid:
        index["webvid"] = write_webvid(f"{out}/webvid", cfg.webvid, cfg.seed, f"{out}/ground_truth")
    index["seconds"] = round(time.time() - t0, 2)
    fs, root = fsspec.core.url_to_fs(f"{out}/ground_truth")
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/index.json", "w") as f:
        json.dump(index, f, indent=1)
    return index


__all__ = ["generate_sample_data"]
