"""Inference and evaluation cost (JSON on stdout).

    python benchmarks/inference.py [--frames 16] [--size 64x96] [--steps 10] [--samples 4]

1. **Seconds per generated sample**, plain DDIM vs DDIM + depth-aware feature rendering +
   latent completion, same tiny model, steps, frames and seed (target overhead <= 10%), with the
   anchor pass as long as the main one and with ``anchor_steps`` = steps / 5 (10 of 50). The
   overhead is split into the anchor pass (``K / F`` of a clip), depth, and rendering.
2. **Eval job throughput**: samples/min of ``run_evaluate`` with 1 vs 2 generation actors on
   the same spec (fresh output each; a local Ray with all CPUs), and scoring seconds per sample
   (pycolmap SfM + the metric encoders).

Models are tiny and random (no weights can be downloaded here): the figures measure the
machinery, not image quality. On CPU the UNet of the tiny model is cheap, which makes the fixed
costs of rendering look larger than on a real SD-1.5-sized model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scaled_model(width: int):
    """The tiny model's layout with ``width`` x its channels (1 = ``MVCustomModel.tiny``)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from mvcustom.models import MVCustomModel
    from mvcustom.models import components as comp
    from mvcustom.models.mvcustom import MVCustomConfig

    if width == 1:
        return MVCustomModel.tiny(seed=0)
    parts = comp.tiny_components(seed=0)
    unet_cfg = comp.tiny_unet2d_config()
    unet_cfg["block_out_channels"] = tuple(width * c for c in unet_cfg["block_out_channels"])
    unet_cfg["attention_head_dim"] = 8
    adapter_cfg = comp.tiny_motion_adapter_config()
    adapter_cfg["block_out_channels"] = unet_cfg["block_out_channels"]
    import torch

    torch.manual_seed(0)
    parts.unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg))
    return MVCustomModel(parts, MVCustomConfig())


def sample_cost(
    frames: int,
    hw: tuple[int, int],
    steps: int,
    repeats: int,
    width: int = 1,
    anchor_steps: int | None = None,
) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from mvcustom.geometry.trajectories import orbit
    from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline, ReferenceViews
    from mvcustom.models.zoedepth import DepthEstimator, save_tiny_zoedepth

    torch.manual_seed(0)
    model = scaled_model(width).eval()
    with tempfile.TemporaryDirectory() as d:
        zoe = DepthEstimator(save_tiny_zoedepth(f"{d}/zoe"), device="cpu", input_size=hw)
    pipe = MVCustomPipeline(model, depth_estimator=zoe)
    pipe.set_progress_bar_config(disable=True)
    cams = orbit(frames, radius=2.0, span_deg=60, image_hw=hw)
    rng = np.random.default_rng(0)
    refs = ReferenceViews(
        rng.integers(0, 255, (2, *hw, 3), dtype=np.uint8),
        orbit(2, radius=2.0, span_deg=90, start_azimuth_deg=120, image_hw=hw),
        np.ones((2, *hw), bool),
    )
    full = InferenceOptions(
        feature_rendering_steps=int(0.7 * steps), completion_until_step=max(1, steps // 5)
    )
    short = dataclasses.replace(full, anchor_steps=anchor_steps or max(1, steps // 5))
    plain = InferenceOptions(feature_rendering=False)

    def run(opts):
        return pipe(
            "a photo of a toy",
            cams,
            refs,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            options=opts,
            output_type="pt",
        )

    run(plain)  # warm-up
    # interleaved (plain, full, short) per repeat, so a drift in machine speed (a shared host)
    # hits all three alike; ratios are medians of the per-repeat ratios
    times: dict[str, list[float]] = {"plain": [], "full": [], "short": []}
    for _ in range(repeats):
        for name, opts in (("plain", plain), ("full", full), ("short", short)):
            t = time.perf_counter()
            run(opts)
            times[name].append(time.perf_counter() - t)
    t_plain, t_full, t_short = (statistics.median(times[k]) for k in ("plain", "full", "short"))
    ratios = {k: [a / b for a, b in zip(times[k], times["plain"], strict=True)] for k in ("full", "short")}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    t_depth = _median_seconds(lambda: zoe(np.zeros((1, *hw, 3), np.uint8)), repeats)
    return {
        "unet_widths": list(model.unet.config.block_out_channels),
        "unet_params_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 2),
        "frames": frames,
        "size": list(hw),
        "steps": steps,
        "plain_ddim_s": round(t_plain, 3),
        "rendering_completion_s": round(t_full, 3),
        "overhead_ratio": round(ratio["full"], 3),
        "anchor_steps_short": short.anchor_steps,
        "rendering_completion_short_anchor_s": round(t_short, 3),
        "overhead_ratio_short_anchor": round(ratio["short"], 3),
        "overhead_ratio_range": [round(min(ratios["full"]), 3), round(max(ratios["full"]), 3)],
        "overhead_ratio_short_anchor_range": [round(min(ratios["short"]), 3), round(max(ratios["short"]), 3)],
        "target_overhead_ratio": 1.10,
        "anchor_pass_expected_ratio": round(1 / frames, 3),
        "depth_estimate_s": round(t_depth, 3),
    }


def anchor_coverage(frames: int = 8, span_deg: float = 100.0, hw: tuple[int, int] = (48, 64)) -> dict:
    """Share of the inner frames' pixels (all but the first and last) covered by 1 anchor (the
    first frame) vs 2 (first and last), with the generator's exact depth of a chair scene along
    an arc."""
    from mvcustom.data.generator.scene import render
    from mvcustom.data.generator.subjects import make_scene, make_subject, subject_extent
    from mvcustom.geometry.trajectories import orbit
    from mvcustom.inference.feature_rendering import FeatureRenderer

    c, r = subject_extent(make_subject("chair", 5))
    cams = orbit(
        frames, radius=3 * r, elevation_deg=25, span_deg=span_deg, target=tuple(c.tolist()), image_hw=hw
    )
    depth = render(make_scene("chair", 5, 6), cams).depth
    out = {"frames": frames, "span_deg": span_deg}
    for name, anchors in (("one_anchor", [0]), ("two_anchors", [0, frames - 1])):
        renderer = FeatureRenderer(depth[anchors], cams, anchors)
        for label, (h, w) in (("", hw), ("_latent_res", (hw[0] // 8, hw[1] // 8))):
            covered = renderer.render_map(h, w).covered[1:-1]
            out[f"{name}{label}"] = round(float(covered.float().mean()), 4)
    return out


def eval_throughput(samples: int, actors_list: list[int]) -> dict:
    import yaml

    from benchmarks.train import make_shards
    from mvcustom.configs import EvaluateConfig, load_config
    from mvcustom.models import MVCustomModel
    from mvcustom.models.mvcustom import MVCustomConfig
    from mvcustom.models.zoedepth import save_tiny_zoedepth
    from pipelines.evaluation.job import run_evaluate

    root = tempfile.mkdtemp(prefix="mvc-bench-eval-")
    shards = make_shards(root)
    MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"])).save_pretrained(
        f"{root}/model"
    )
    zoe = save_tiny_zoedepth(f"{root}/zoe")
    spec = {
        "subjects": [{"name": "subject", "shards": shards, "num_references": 2}],
        "prompts": ["a photo of a <sks> toy"],
        "trajectories": [{"name": "arc", "kind": "arc", "span_deg": 60}],
        "seeds": list(range(samples)),
    }
    Path(f"{root}/spec.yaml").write_text(yaml.safe_dump(spec))
    out = {}
    for actors in actors_list:
        cfg = load_config(
            EvaluateConfig,
            Path(__file__).resolve().parents[1] / "jobs/configs/evaluate_debug.yaml",
            [
                f"model={root}/model",
                f"depth_model={zoe}",
                f"spec={root}/spec.yaml",
                f"output={root}/eval-{actors}",
                f"actors={actors}",
                "mlflow.enabled=false",
                "clip.height=64",
                "clip.width=64",
                "clip.num_frames=8",
                "sampling.num_inference_steps=10",
                "sampling.feature_rendering_steps=7",
                "sampling.completion_until_step=2",
            ],
        )
        s = run_evaluate(cfg)
        out[f"actors_{actors}"] = {
            "samples": s["generated_now"],
            "seconds": s["seconds"],
            "samples_per_min": s.get("samples_per_min"),
            "score_seconds_per_sample": round(s.get("score_seconds_mean", float("nan")), 3),
            "generate_seconds_per_sample": round(s.get("generate_seconds_mean", float("nan")), 3),
        }
    if len(actors_list) == 2:
        a, b = (out[f"actors_{n}"]["samples_per_min"] for n in actors_list)
        out["speedup"] = round(b / a, 3) if a and b else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", default="64x128", help="HxW of the generated frames")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4, help="samples per eval-job run")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--widths", default="1,8", help="UNet width multipliers of the tiny layout")
    ap.add_argument(
        "--anchor-steps", type=int, default=None, help="short anchor pass (default steps // 5: 10 of 50)"
    )
    args = ap.parse_args()
    H, W = (int(v) for v in args.size.split("x"))
    report = {"anchor_coverage": anchor_coverage()}
    report["sample_cost"] = [
        sample_cost(args.frames, (H, W), args.steps, args.repeats, int(w), args.anchor_steps)
        for w in args.widths.split(",")
    ]
    print(json.dumps(report), flush=True)
    report["eval_job"] = eval_throughput(args.samples, [int(a) for a in args.actors.split(",")])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
