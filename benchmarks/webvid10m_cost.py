"""The WebVid-10M bill: per-stage rates measured here, projected to the whole dataset.

    python benchmarks/webvid10m_cost.py [--clips 3] [--nodes 16 --cores 32 --gpus 8]
                                        [--gpu-tflops 989 --gpu-utilisation 0.35] [--out DIR]

The production config (``jobs/configs/preprocess_webvid.yaml``: 16 frames at 8 fps stored at
256x384, SfM with our settings, ZoeDepth at 384x512 with flip averaging) is run stage by stage,
in this process, on one core (``os.sched_setaffinity``, one torch thread), on clips rendered at
WebVid's resolution (596x336, 24 fps; the job decodes only the first 2 s of a clip, which is
all 16 frames at 8 fps need):

* ``decode``: read + decode forward + sample at 8 fps + full-size RGB frames for SfM and the
  stored frames centre-cropped and resized (``decode_clip``), seconds per clip;
* ``sfm``: ``run_sfm`` on those 16 frames (pycolmap, one thread), seconds per clip; beside it
  the same clips with every frame mapped at full size (``keyframe_stride`` 1,
  ``max_image_size`` null), so the saving is a ratio measured in one run;
* ``depth``: one forward of ZoeDepth with ``Intel/zoedepth-nyu-kitti``'s architecture (BEiT-L/16
  backbone, two metric heads; random weights: the weights do not change the cost) at the job's
  input size, on the CPU: seconds per frame, and its FLOPs per frame counted by
  ``torch.utils.flop_counter``;
* ``write``: the shard member encoding of a stored clip with its depth (``encode_sample``: 16
  JPEGs, npy arrays), seconds per clip.

Projection to ``--videos`` (10,727,607: WebVid-10M's train CSV rows): core-hours of each CPU
stage = clips x seconds / 3600 (measured rates); GPU-hours of depth = frames x FLOPs x (2 with
flip averaging) / (``--gpu-tflops`` x ``--gpu-utilisation``): **projected**, not measured (no GPU
here; an assumed sustained fraction of the GPU's fp32 peak, the precision the estimator runs at,
and beside it the bf16 figure it would reach with autocast), next to the CPU core-hours the same
depth would cost (measured rate). ``write`` is the encoding only, not the upload. Wall time on the stated cluster (``--nodes`` x
``--cores`` x ``--gpus``): the CPU stages share every core, depth runs on the GPUs, the stages
stream, so the wall time is the larger of the two and that resource bounds the run. Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time

WEBVID_10M_VIDEOS = 10_727_607  # rows of results_10M_train.csv
WEBVID_SIZE = {"height": 336, "width": 596, "fps": 24}  # WebVid's preview resolution


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=3, help="clips rendered and measured (orbit, arc, ...)")
    ap.add_argument("--videos", type=int, default=WEBVID_10M_VIDEOS, help="clips in the dataset")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--cores", type=int, default=32, help="CPU cores per node")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument(
        "--gpu-tflops",
        type=float,
        default=67.0,
        help="the GPU's fp32 peak (H100 SXM: 67; ZoeDepth runs fp32)",
    )
    ap.add_argument("--gpu-tflops-bf16", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--gpu-utilisation", type=float, default=0.35, help="assumed sustained fraction")
    ap.add_argument("--depth-frames", type=int, default=1, help="frames per timed CPU forward")
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from mvcustom.configs import PreprocessConfig, SampleDataConfig, from_dict, load_config
    from mvcustom.data.generator import generate_sample_data
    from mvcustom.data.schema import ClipSample, encode_sample
    from mvcustom.geometry.sfm import run_sfm
    from mvcustom.models.zoedepth import nyu_kitti_zoedepth_config
    from mvcustom.models.zoedepth import preprocess as zoe_preprocess
    from pipelines.webvid_records import decode_clip

    root = args.out or tempfile.mkdtemp(prefix="bench-webvid10m-")
    cfg = load_config(PreprocessConfig, "jobs/configs/preprocess_webvid.yaml", ["input=x", "output=y"])
    n = cfg.clip.num_frames
    t = time.perf_counter()
    spec = {
        "num_videos": args.clips,
        **WEBVID_SIZE,
        "duration_s": 2.5,  # the job reads the first 16 / 8 fps = 2 s
        "motions": ["orbit", "arc"],
    }
    index = f"{root}/data/ground_truth/index.json"
    if not os.path.exists(index) or json.load(open(index))["config"]["webvid"]["num_videos"] != args.clips:
        generate_sample_data(
            f"{root}/data", from_dict(SampleDataConfig, {"write_co3d": False, "webvid": spec}, "bench")
        )
    gen_s = time.perf_counter() - t
    videos = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(f"{root}/data/webvid/videos")
        for f in fs
        if f.endswith(".mp4")
    )

    decode_s, sfm_s, sfm_full_s, write_s, registered = [], [], [], [], 0
    for url in videos:

        def decode(url=url):
            d = decode_clip(url, n, cfg.webvid.target_fps, stored_hw=(cfg.clip.height, cfg.clip.width))
            return d.frames, d.stored

        s, (frames, stored) = _median_time(decode, 3)
        decode_s.append(s)
        t = time.perf_counter()
        res = run_sfm(frames, cfg.sfm)
        sfm_s.append(time.perf_counter() - t)
        registered += bool(res.ok)
        # beside it, the same clip with every frame mapped at full size (the settings before
        # keyframes and the size cap): the saving as a ratio, which holds across machines
        t = time.perf_counter()
        run_sfm(frames, dataclasses.replace(cfg.sfm, keyframe_stride=1, max_image_size=None))
        sfm_full_s.append(time.perf_counter() - t)
        sample = ClipSample(
            key="webvid_bench_0",
            meta={"source": "webvid", "pose_source": None},
            caption="a caption",
            frames=stored,
            intrinsics=None,
            extrinsics=None,
            depth=np.random.default_rng(0).uniform(0.5, 20, stored.shape[:3]).astype(np.float16),
        )
        write_s.append(_median_time(lambda sample=sample: encode_sample(sample), 3)[0])

    from torch.utils.flop_counter import FlopCounterMode
    from transformers import ZoeDepthForDepthEstimation

    torch.manual_seed(0)
    model = ZoeDepthForDepthEstimation(nyu_kitti_zoedepth_config()).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(stored[: args.depth_frames]))
    pv, _ = zoe_preprocess(x, cfg.depth.input_size)
    with torch.no_grad():
        model(pixel_values=pv[:1])  # warm-up (allocator, kernels)
        t = time.perf_counter()
        model(pixel_values=pv)
        depth_cpu_s = (time.perf_counter() - t) / len(pv)
        counter = FlopCounterMode(display=False)
        with counter:
            model(pixel_values=pv[:1])
    flops = counter.get_total_flops()

    passes = 2 if cfg.depth.flip_average else 1
    clips, frames = args.videos, args.videos * n
    rate = {
        "decode_s_per_clip": statistics.median(decode_s),
        "sfm_s_per_clip": statistics.median(sfm_s),
        "sfm_every_frame_full_size_s_per_clip": statistics.median(sfm_full_s),
        "write_s_per_clip": statistics.median(write_s),
        "depth_cpu_s_per_forward": depth_cpu_s,
        "depth_gflops_per_forward": flops / 1e9,
    }
    core_h = {
        "decode": clips * rate["decode_s_per_clip"] / 3600,
        "sfm": clips * rate["sfm_s_per_clip"] / 3600,
        "write": clips * rate["write_s_per_clip"] / 3600,
    }

    def gpu_hours(tflops: float) -> float:
        return frames * passes * flops / (tflops * 1e12 * args.gpu_utilisation) / 3600

    depth_gpu_h = gpu_hours(args.gpu_tflops)
    depth_cpu_core_h = frames * passes * depth_cpu_s / 3600
    cores, gpus = args.nodes * args.cores, args.nodes * args.gpus
    cpu_wall_h = sum(core_h.values()) / cores
    gpu_wall_h = depth_gpu_h / gpus
    result = {
        "benchmark": "webvid10m_cost",
        "measured_here": {
            "machine": f"{os.cpu_count()} cores, one used, torch threads 1; no GPU",
            "clips": len(videos),
            "clip_source": {**spec, "frames_stored": n, "stored_hw": [cfg.clip.height, cfg.clip.width]},
            "generation_s": round(gen_s, 1),  # 0 when --out held the clips
            "sfm_registered": f"{registered}/{len(videos)}",
            "per_stage": {k: round(v, 4) for k, v in rate.items()},
            "per_clip_s": {
                "decode": [round(v, 3) for v in decode_s],
                "sfm": [round(v, 3) for v in sfm_s],
                "sfm_every_frame_full_size": [round(v, 3) for v in sfm_full_s],
                "write": [round(v, 3) for v in write_s],
            },
            "zoedepth": {
                "architecture": "Intel/zoedepth-nyu-kitti (random weights)",
                "parameters_m": round(params / 1e6, 1),
                "input_hw": list(pv.shape[-2:]),
                "forwards_per_frame": passes,
            },
        },
        "projected": {
            "videos": clips,
            "frames": frames,
            "core_hours": {
                **{k: round(v) for k, v in core_h.items()},
                "total_cpu_stages": round(sum(core_h.values())),
                "sfm_if_every_frame_full_size": round(
                    clips * rate["sfm_every_frame_full_size_s_per_clip"] / 3600
                ),
            },
            "depth": {
                "gpu_hours": round(depth_gpu_h),
                "assumption": f"fp32 (what DepthEstimator runs): {args.gpu_tflops:g} TFLOP/s peak at "
                f"{args.gpu_utilisation:.0%} sustained",
                "gpu_hours_if_bf16": round(gpu_hours(args.gpu_tflops_bf16)),
                "bf16_assumption": f"{args.gpu_tflops_bf16:g} TFLOP/s dense bf16 peak at "
                f"{args.gpu_utilisation:.0%} sustained (the estimator has no bf16 path yet)",
                "cpu_core_hours_instead": round(depth_cpu_core_h),
            },
            "cluster": f"{args.nodes} nodes x {args.cores} cores x {args.gpus} GPUs",
            "wall_hours": {"cpu_stages": round(cpu_wall_h, 1), "depth_on_gpus": round(gpu_wall_h, 1)},
            "bound_by": (
                f"the CPU stages (largest: {max(core_h, key=core_h.get)})"
                if cpu_wall_h >= gpu_wall_h
                else "depth on the GPUs"
            ),
            "wall_hours_total": round(max(cpu_wall_h, gpu_wall_h), 1),
        },
    }
    print(json.dumps(result, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
