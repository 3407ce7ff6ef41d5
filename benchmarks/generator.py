"""Throughput of the synthetic-data generator and of the CO3D format reader (JSON on stdout).

    python benchmarks/generator.py [--frames 16]

Figures: rendered frames/s and million rays/s at the CO3D and WebVid sample sizes (one process,
torch CPU threads as configured), H.264 encode frames/s, and CO3D frames/s decoded through
``mvcustom.data.co3d`` (JPEG image + mask PNG + float16 depth PNG + depth mask).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from mvcustom.configs.sample_data import Co3dSampleConfig
from mvcustom.data import co3d
from mvcustom.data.generator.co3d_writer import write_co3d
from mvcustom.data.generator.scene import Scene, render
from mvcustom.data.generator.subjects import make_room, make_subject
from mvcustom.data.generator.webvid_writer import encode_h264
from mvcustom.geometry import make_trajectory


def bench_render(hw: tuple[int, int], frames: int) -> dict:
    scene = Scene(make_subject("car", 0) + make_room(0))
    cams = make_trajectory("orbit", frames, radius=2.0, target=(0, 0, 0.3), image_hw=hw)
    render(scene, cams[:1])  # warm-up
    t = time.perf_counter()
    out = render(scene, cams)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    encode_h264(out.rgb.numpy(), 24, 18)
    enc = time.perf_counter() - t
    rays = frames * hw[0] * hw[1]
    return {
        "size_hw": list(hw),
        "frames": frames,
        "render_frames_per_s": round(frames / dt, 2),
        "render_mrays_per_s": round(rays / dt / 1e6, 3),
        "h264_encode_frames_per_s": round(frames / enc, 1),
    }


def bench_co3d_read(frames: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = Co3dSampleConfig(
            categories=["chair"],
            sequences_per_category=1,
            frames_per_sequence=frames,
            image_sizes=[(240, 320)],
        )
        t = time.perf_counter()
        write_co3d(f"{d}/co3d", cfg, 0, f"{d}/gt")
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        cat = co3d.load_category(f"{d}/co3d", "chair")
        ann_s = time.perf_counter() - t
        t = time.perf_counter()
        for fa in cat.frames:
            co3d.load_image(f"{d}/co3d", fa.image)
            co3d.load_mask(f"{d}/co3d", fa.mask)
            co3d.load_depth(f"{d}/co3d", fa.depth)
            co3d.load_depth_mask(f"{d}/co3d", fa.depth)
        read_s = time.perf_counter() - t
    return {
        "size_hw": [240, 320],
        "frames": frames,
        "write_sequence_frames_per_s": round(frames / write_s, 2),
        "annotations_load_ms": round(ann_s * 1e3, 2),
        "decode_frames_per_s": round(frames / read_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    result = {
        "torch_threads": torch.get_num_threads(),
        "render_co3d_size": bench_render((120, 160), args.frames),
        "render_webvid_size": bench_render((180, 320), args.frames),
        "co3d_reader": bench_co3d_read(args.frames),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
