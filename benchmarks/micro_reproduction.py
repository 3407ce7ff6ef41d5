"""Table 2 in miniature: the whole method trained from scratch on generated scenes whose truth is
known, with the paper's ablations, through the project's own jobs.

    python benchmarks/micro_reproduction.py --quick     # <= 10 min on 2 CPU cores
    python benchmarks/micro_reproduction.py             # the default scale, <= 60 min

Prints one JSON (also ``<out>/micro_reproduction.json``) and writes ``<out>/grid.png``.

1. **Data.** The generator renders textured subjects of several categories in rooms, each on a
   hand-held orbit with exact cameras and depth, in CO3Dv2's on-disk layout: the training set,
   and one held-out subject (another seed: a subject never seen in stage 1) for customization
   and evaluation. ``jobs.preprocess`` makes both into shards.
2. **Stand-ins for the pretrained parts**, trained here by plain loops
   (``mvcustom.training.standins``; a real run loads SD 1.5 and ZoeDepth): the VAE and the image
   layers (the frozen image prior of stage 1) on the training frames, and a ZoeDepth on their
   exact depths.
3. **The method**, trained by ``jobs.train`` (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers):
   stage 1 three times (camera encoder on with dense STT, off with dense STT, on with STT radius
   0 throughout) and stage 2 on the held-out subject from each (FeatureNeRF + fusion + subject
   token), plus a baseline whose stage 2 has no FeatureNeRF (only the token).
4. **Evaluation** by ``jobs.evaluate`` along trajectories placed around the held-out subject's
   reference views (cameras no training clip used), scored against the generator's true view at
   every requested camera (PSNR / SSIM of the frame and of the subject, identity to truth) and
   by the paper's metrics (pose accuracy and SfM pose errors, multi-view consistency, identity).

Rows (``table`` in the JSON):

* ``no_camera``: no camera conditioning (stage 1 without the camera encoder, stage 2 learns
  only the token, no feature rendering): the baseline;
* ``paper``: the paper's preset (FeatureNeRF in stage 2, depth-aware feature rendering and latent
  completion at inference, no Plücker encoder);
* ``ours``: ``paper`` plus the Plücker camera encoder in stage 1;
* ``ours_no_rendering`` / ``ours_no_completion``: ``ours`` sampled without feature rendering /
  without latent completion;
* ``ours_stt0``: ``ours`` trained and sampled at STT radius 0 (1D temporal attention);
* ``ours_before_stage2``: ``ours``'s stage-1 model, before customization.

Each row's mean ± std is over its samples: the sampling seeds times the trajectories, one
training seed (the budget on 2 cores; say ``--train-seeds`` to repeat training). The paper's
directions are judged from those: ``held`` when the difference has the claimed sign and the
mean ± std intervals do not overlap, ``did not hold`` when it has the other sign without overlap,
else ``inconclusive``. Nothing here is tuned to make a direction hold.

``--in-process`` (implied by ``--device cuda``: the GPU machine's image has no Ray): the same
work without Ray, in this process: preprocessing by ``preprocess_inline``, the training job's
loop by ``run_local`` (DeepSpeed, one rank), the evaluation job's generate and score classes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "jobs" / "configs"

from pipelines.evaluation.score import METRICS, TRUTH_METRICS  # noqa: E402  (after the path)

#: the evaluation's columns: against the true views, then the paper's (pipelines/evaluation/score.py)
COLUMNS = (*TRUTH_METRICS, *METRICS)
HIGHER_IS_BETTER = {"psnr_truth", "psnr_truth_subject", "ssim_truth", "ssim_truth_subject", "pose_accuracy"}


@dataclass
class Scale:
    """How big a run is. Stated in the JSON."""

    name: str
    categories: tuple[str, ...]
    sequences_per_category: int  # training subjects per category
    frames_per_sequence: int  # views rendered per subject (a hand-held orbit)
    render: int  # the generator's image side
    res: int  # training and evaluation side
    clip_frames: int  # frames of a preprocessed clip (views of one subject)
    clips_per_sequence: int
    train_frames: int  # frames per training example (frame 0 + random others)
    vae_steps: int
    prior_steps: int
    depth_steps: int
    stage1_steps: int
    stage2_steps: int
    eval_frames: int
    ddim_steps: int
    guidance_scale: float
    seeds: list[int]
    trajectories: list[dict] = field(default_factory=list)


QUICK = Scale(
    name="quick",
    categories=("teddybear", "chair", "car"),
    sequences_per_category=2,
    frames_per_sequence=16,
    render=64,
    res=32,
    clip_frames=8,
    clips_per_sequence=2,
    train_frames=4,
    vae_steps=300,
    prior_steps=150,
    depth_steps=100,
    stage1_steps=120,
    stage2_steps=60,
    eval_frames=4,
    ddim_steps=20,
    guidance_scale=1.0,
    seeds=[0, 1],
    trajectories=[{"name": "arc90", "kind": "arc", "span_deg": 90}],
)
DEFAULT = Scale(
    name="default",
    categories=("teddybear", "chair", "car", "hydrant", "apple"),
    sequences_per_category=4,
    frames_per_sequence=24,
    render=64,
    res=32,
    clip_frames=8,
    clips_per_sequence=3,
    train_frames=4,
    vae_steps=600,
    prior_steps=400,
    depth_steps=300,
    stage1_steps=600,
    stage2_steps=200,
    eval_frames=4,
    ddim_steps=25,
    guidance_scale=1.0,
    seeds=[0, 1, 2],
    trajectories=[
        {"name": "arc90", "kind": "arc", "span_deg": 90},
        {"name": "lateral", "kind": "lateral"},
    ],
)

#: the same code path at toy size (figures meaningless): what a test can afford
TOY = replace(
    QUICK,
    name="toy",
    categories=("teddybear", "chair"),
    sequences_per_category=1,
    frames_per_sequence=8,
    clips_per_sequence=1,
    vae_steps=4,
    prior_steps=4,
    depth_steps=4,
    stage1_steps=3,
    stage2_steps=3,
    ddim_steps=3,
    seeds=[0],
)

#: stage-1 runs: (camera encoder, STT radius schedule as fractions of the steps)
STAGE1 = {
    "s1_camera": (True, [(0.0, 0), (1 / 3, 1), (2 / 3, -1)]),
    "s1_no_camera": (False, [(0.0, 0), (1 / 3, 1), (2 / 3, -1)]),
    "s1_camera_stt0": (True, [(0.0, 0)]),
}
#: stage-2 runs: (from which stage-1 run, FeatureNeRF kept)
STAGE2 = {
    "ours": ("s1_camera", True),
    "paper": ("s1_no_camera", True),
    "no_camera": ("s1_no_camera", False),
    "ours_stt0": ("s1_camera_stt0", True),
}
#: evaluated rows: (model run, inference options of jobs.evaluate's variant)
ROWS = {
    "no_camera": ("no_camera", {"feature_rendering": False}),
    "paper": ("paper", {}),
    "ours": ("ours", {}),
    "ours_no_rendering": ("ours", {"feature_rendering": False}),
    "ours_no_completion": ("ours", {"completion_until_step": 0}),
    "ours_stt0": ("ours_stt0", {}),
    "ours_before_stage2": ("s1_camera", {}),
}
#: the paper's directions: (claim, metric, row claimed better, row compared with, "better" or
#: "at least as good")
DIRECTIONS = (
    (
        "camera-conditioned beats no-camera on PSNR to the true view",
        "psnr_truth",
        "ours",
        "no_camera",
        "better",
    ),
    (
        "the paper's preset beats no-camera on PSNR to the true view",
        "psnr_truth",
        "paper",
        "no_camera",
        "better",
    ),
    (
        "camera-conditioned beats no-camera on rotation error",
        "rotation_error_deg",
        "ours",
        "no_camera",
        "better",
    ),
    (
        "feature rendering improves multi-view consistency",
        "multiview_consistency",
        "ours",
        "ours_no_rendering",
        "better",
    ),
    ("feature rendering improves PSNR to the true view", "psnr_truth", "ours", "ours_no_rendering", "better"),
    ("stage 2 improves identity", "identity", "ours", "ours_before_stage2", "better"),
    ("stage 2 improves identity to the true views", "identity_truth", "ours", "ours_before_stage2", "better"),
    (
        "dense STT is at least as consistent as 1D",
        "multiview_consistency",
        "ours",
        "ours_stt0",
        "at least as good",
    ),
)


def _sets(pairs: dict) -> list[str]:
    out = []
    for k, v in pairs.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"]
    return out


def log(msg: str) -> None:
    print(f"[micro-reproduction {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- 1. data
def make_data(out: Path, scale: Scale, uri: str, in_process: bool) -> dict:
    from jobs.preprocess import main as preprocess_job
    from mvcustom.configs import PreprocessConfig, SampleDataConfig, load_config
    from mvcustom.configs.sample_data import Co3dSampleConfig
    from mvcustom.data.generator import generate_sample_data

    sets = {
        "train": Co3dSampleConfig(
            categories=list(scale.categories),
            sequences_per_category=scale.sequences_per_category,
            frames_per_sequence=scale.frames_per_sequence,
            image_sizes=[(scale.render, scale.render)],
            depth_hole_fraction=0.0,
        ),
        # one subject no training clip shows (another seed), with more views to customize on
        "heldout": Co3dSampleConfig(
            categories=[scale.categories[0]],
            sequences_per_category=1,
            frames_per_sequence=scale.frames_per_sequence,
            image_sizes=[(scale.render, scale.render)],
            depth_hole_fraction=0.0,
        ),
    }
    data = {}
    for i, (name, co3d) in enumerate(sets.items()):
        raw = out / "data" / name
        index = generate_sample_data(str(raw), SampleDataConfig(seed=101 + i, co3d=co3d, write_webvid=False))
        shards = out / "shards" / name
        argv = ["--config", str(CONFIGS / "preprocess_co3d_debug.yaml")] + _sets(
            {
                "input": raw / "co3d",
                "output": shards,
                "clip.num_frames": scale.clip_frames,
                "clip.height": scale.res,
                "clip.width": scale.res,
                "co3d.clips_per_sequence": scale.clips_per_sequence if name == "train" else 1,
                "mlflow.tracking_uri": uri,
            }
        )
        if in_process:
            from pipelines.preprocess import preprocess_inline

            summary = preprocess_inline(load_config(PreprocessConfig, argv[1], argv[3::2]))
        else:
            summary = preprocess_job(argv)
        sequences = [s["sequence_name"] for c in index["co3d"]["categories"].values() for s in c]
        data[name] = {
            "raw": str(raw),
            "shards": str(shards),
            "clips": summary["clips_written"],
            "sequences": sequences,
            "preprocess_mlflow_run_id": summary.get("mlflow_run_id"),
        }
    data["subject"] = f"{scale.categories[0]}/{data['heldout']['sequences'][0]}"
    return data


def read_frames(shards: str, res: int):
    """Every clip of ``shards`` once: frames ``(N, 3, res, res)``, captions, depths ``(N, res, res)``."""
    import torch

    from mvcustom.data.reader import make_clip_dataset
    from mvcustom.training.data import resize_sample

    frames, captions, depths = [], [], []
    for sample in make_clip_dataset(shards, shuffle_buffer=0, shuffle_shards=False):
        s = resize_sample(sample, res, res)
        frames.append(s["frames"])
        captions += [sample["caption"]] * len(s["frames"])
        depths.append(s["depth"].reshape(len(s["frames"]), res, res))
    return torch.cat(frames), captions, torch.cat(depths).float()


# ---------------------------------------------------------------------------- 2. stand-ins
def train_stand_ins(out: Path, data: dict, scale: Scale) -> dict:
    import torch
    from transformers import ZoeDepthForDepthEstimation

    from mvcustom.models import MVCustomConfig, MVCustomModel
    from mvcustom.models.zoedepth import tiny_zoedepth_config
    from mvcustom.training.standins import save_depth_model, train_depth, train_image_prior, train_vae

    frames, captions, depths = read_frames(data["train"]["shards"], scale.res)
    t0 = time.time()
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(), seed=0, prediction_type="v_prediction")
    figures = {"frames": len(frames)}
    figures.update(train_vae(model, frames, steps=scale.vae_steps, lr=5e-3, batch_size=16))
    figures.update(
        train_image_prior(model, frames, captions, steps=scale.prior_steps, lr=1e-3, batch_size=16)
    )
    starts = {
        "camera": str(out / "models" / "start_camera"),
        "no_camera": str(out / "models" / "start_no_camera"),
    }
    model.save_pretrained(starts["camera"])
    # the same trained VAE and image layers in the architecture without the camera encoder
    bare = MVCustomModel.tiny(MVCustomConfig(camera_encoder=False), seed=0, prediction_type="v_prediction")
    missing, unexpected = bare.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("camera_encoder.", "camera_merges.")) for k in unexpected)
    bare.vae.register_to_config(scaling_factor=model.vae.config.scaling_factor)
    bare.save_pretrained(starts["no_camera"])
    figures["vae_and_prior_seconds"] = round(time.time() - t0, 1)
    t0 = time.time()
    torch.manual_seed(0)
    depth = ZoeDepthForDepthEstimation(tiny_zoedepth_config())
    size = (max(64, scale.res), max(64, scale.res))
    figures.update(train_depth(depth, frames, depths, steps=scale.depth_steps, input_size=size))
    figures["depth_seconds"] = round(time.time() - t0, 1)
    return {
        "figures": figures,
        "starts": starts,
        "depth_model": save_depth_model(depth, str(out / "models" / "depth"), size),
        "note": "VAE, image layers and depth are stand-ins trained by plain loops in this benchmark",
    }


# ---------------------------------------------------------------------------- 3. training
def _schedule(fractions, steps: int) -> list[list[int]]:
    return [[int(round(f * steps)), r] for f, r in fractions]


def without_featurenerf(export: str, dest: str) -> str:
    """The stage-1 export without its (untrained) FeatureNeRF branch: the baseline's stage 2 then
    learns only the token. Same weights otherwise; the training record goes along."""
    import torch

    from mvcustom.models import MVCustomModel

    m = MVCustomModel.from_pretrained(export)
    bare = MVCustomModel.tiny(
        replace(m.config, featurenerf_blocks=[]), prediction_type=m.scheduler_config["prediction_type"]
    )
    missing, unexpected = bare.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith("pose_blocks.") for k in unexpected), (missing, unexpected)
    bare.vae.register_to_config(scaling_factor=m.vae.config.scaling_factor)
    with torch.no_grad():
        bare.save_pretrained(dest)
    from mvcustom.training.loop import TRAINING_RECORD

    shutil.copy(f"{export}/{TRAINING_RECORD}", f"{dest}/{TRAINING_RECORD}")
    return dest


def train_all(out: Path, data: dict, stand_ins: dict, scale: Scale, uri: str, device: str, seed: int) -> dict:
    """Every training run, by ``jobs.train`` (``device`` ``cpu``), else by its loop in-process
    (``in-process`` on CPU, ``cuda`` on a GPU)."""
    runs: dict = {}

    def train(name: str, config: str, overrides: dict) -> dict:
        t0 = time.time()
        common = {
            "output": str(out / "runs" / name),
            "batch_size": 2,
            "checkpoint_every": 10**6,
            "sample_every": 10**6,
            "seed": seed,
            "clip.num_frames": scale.train_frames,
            "clip.height": scale.res,
            "clip.width": scale.res,
            "model.prediction_type": "v_prediction",
            "data.frame_selection": "anchored_random",
            "data.shuffle_buffer": 8,
            "optim.warmup_steps": 10,
            "deepspeed.zero_stage": 2,
            "deepspeed.precision": "fp32",
            "mlflow.tracking_uri": uri,
            "mlflow.experiment": "micro-reproduction",
        }
        argv = ["--config", str(CONFIGS / config)] + _sets({**common, **overrides})
        if device != "cpu":
            from mvcustom.configs import TrainConfig, load_config
            from mvcustom.training.launch import run_local

            gpu = f"scaling.use_gpu={'true' if device == 'cuda' else 'false'}"
            summary = run_local(load_config(TrainConfig, argv[1], [*argv[3::2], gpu]), track=True)
        else:
            from jobs.train import main as train_job

            summary = train_job(argv + ["--set", "scaling.num_workers=2"])
        runs[name] = {
            "steps": summary.get("step"),
            "loss": summary.get("loss"),
            "export": summary["export"],
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "seconds": round(time.time() - t0, 1),
        }
        log(f"trained {name}: {runs[name]}")
        return runs[name]

    for name, (camera, fractions) in STAGE1.items():
        train(
            name,
            "train_backbone_debug.yaml",
            {
                "shards": [data["train"]["shards"]],
                "max_steps": scale.stage1_steps,
                "model.pretrained": stand_ins["starts"]["camera" if camera else "no_camera"],
                "model.camera_encoder": camera,
                "model.stt_radius_schedule": _schedule(fractions, scale.stage1_steps),
                "optim.lr": 3e-3,
            },
        )
    for name, (source, featurenerf) in STAGE2.items():
        init = runs[source]["export"]
        extra = {}
        if not featurenerf:
            init = without_featurenerf(init, str(out / "models" / f"{source}_without_featurenerf"))
            extra["model.featurenerf_blocks"] = []
        train(
            name,
            "train_customize_debug.yaml",
            {
                "shards": [data["heldout"]["shards"]],
                "init_from": init,
                "data.subject": data["subject"],
                "max_steps": scale.stage2_steps,
                "model.camera_encoder": STAGE1[source][0],
                "optim.lr": 1e-3,
                **extra,
            },
        )
    return runs


# ---------------------------------------------------------------------------- 4. evaluation
def evaluate_all(out: Path, data: dict, stand_ins: dict, runs: dict, scale: Scale, uri: str, device: str):
    import pandas as pd
    import yaml

    category, sequence = data["subject"].split("/", 1)
    frames = []
    evaluations = {}
    for model in dict.fromkeys(m for m, _ in ROWS.values()):
        variants = {row: opts for row, (m, opts) in ROWS.items() if m == model}
        spec = {
            "subjects": [
                {
                    "name": "heldout",
                    "shards": data["heldout"]["shards"],
                    "sequence": sequence,
                    "num_references": 2,
                    "ground_truth": f"{data['heldout']['raw']}/ground_truth",
                }
            ],
            "prompts": [f"a photo of <sks> {category}"],
            "trajectories": scale.trajectories,
            "seeds": scale.seeds,
            "variants": variants,
        }
        spec_path = out / "eval" / f"{model}.yaml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        output = out / "eval" / model
        shutil.rmtree(output, ignore_errors=True)  # a rerun retrains, so it evaluates afresh
        sets = {
            "model": runs[model]["export"],
            "depth_model": stand_ins["depth_model"],
            "spec": spec_path,
            "output": output,
            "clip.num_frames": scale.eval_frames,
            "clip.height": scale.res,
            "clip.width": scale.res,
            "sampling.num_inference_steps": scale.ddim_steps,
            "sampling.feature_rendering_steps": round(0.7 * scale.ddim_steps),
            "sampling.completion_until_step": round(0.2 * scale.ddim_steps),
            "sampling.guidance_scale": scale.guidance_scale,
            "mlflow.tracking_uri": uri,
            "mlflow.experiment": "micro-reproduction",
            "report_samples": 4,
        }
        t0 = time.time()
        argv = ["--config", str(CONFIGS / "evaluate_debug.yaml")] + _sets(sets)
        if device != "cpu":
            summary = evaluate_in_process(argv, device)
        else:
            from jobs.evaluate import main as evaluate_job

            try:
                summary = evaluate_job(argv)
            except SystemExit:  # incomplete: its failed samples are in results.parquet
                summary = {"complete": False}
        results = pd.read_parquet(output / "results.parquet")
        results["model"] = model
        frames.append(results)
        evaluations[model] = {
            "output": str(output),
            "complete": summary.get("complete"),
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "seconds": round(time.time() - t0, 1),
        }
        log(f"evaluated {model}: {evaluations[model]}")
    return pd.concat(frames, ignore_index=True), evaluations


def evaluate_in_process(argv: list[str], device: str) -> dict:
    """jobs.evaluate's generate and score classes without Ray (a GPU machine without Ray): the
    same samples, results.parquet and report, no MLflow run."""
    import pandas as pd

    from mvcustom.configs import EvaluateConfig, load_config
    from mvcustom.configs.base import to_dict
    from pipelines.evaluation.files import as_batch, records
    from pipelines.evaluation.generate import GenerateSamples
    from pipelines.evaluation.report import write_report
    from pipelines.evaluation.score import ScoreSamples, aggregate
    from pipelines.evaluation.spec import load_spec

    cfg = load_config(EvaluateConfig, argv[1], [*argv[3::2], f"num_gpus={1 if device == 'cuda' else 0}"])
    raw = to_dict(cfg)
    gen, score = GenerateSamples(raw), ScoreSamples(raw)
    rows = []
    for r in load_spec(cfg.spec, cfg.num_references):
        rows += records(score(gen(as_batch([r]))))
    results = pd.DataFrame(rows)
    os.makedirs(cfg.output, exist_ok=True)
    results.to_parquet(f"{cfg.output}/results.parquet")
    write_report(cfg.output, results, aggregate(results))
    return {"complete": bool((results["status"] == "scored").all())}


# ---------------------------------------------------------------------------- 5. the table
def table_of(results) -> dict:
    import pandas as pd

    table = {}
    for row in ROWS:
        r = results[results["variant"] == row]
        scored = r[r["status"] == "scored"]
        entry = {
            "model": ROWS[row][0],
            "options": ROWS[row][1],
            "n": int(len(scored)),
            "failed": int(len(r) - len(scored)),
        }
        for c in COLUMNS:
            if c not in scored:
                continue
            v = pd.to_numeric(scored[c], errors="coerce").dropna()
            entry[c] = {
                "mean": round(float(v.mean()), 4) if len(v) else None,
                "std": round(float(v.std()), 4) if len(v) > 1 else None,
                "n": int(len(v)),
            }
        table[row] = entry
    return table


def directions_of(table: dict) -> list[dict]:
    out = []
    for claim, metric, a, b, kind in DIRECTIONS:
        fa, fb = table.get(a, {}).get(metric), table.get(b, {}).get(metric)
        entry = {"claim": claim, "metric": metric, "row": a, "against": b}
        if not fa or not fb or fa["mean"] is None or fb["mean"] is None:
            out.append({**entry, "verdict": "not measured", "why": f"{metric} has no value for {a} or {b}"})
            continue
        sign = 1 if metric in HIGHER_IS_BETTER else -1
        gain = sign * (fa["mean"] - fb["mean"])  # > 0: the row is better
        spread = (fa["std"] or 0.0) + (fb["std"] or 0.0)
        if abs(gain) <= spread:
            verdict = (
                "held (within the spread)" if kind == "at least as good" and gain >= 0 else "inconclusive"
            )
        else:
            verdict = "held" if gain > 0 else "did not hold"
        out.append(
            {
                **entry,
                "row_mean": fa["mean"],
                "row_std": fa["std"],
                "against_mean": fb["mean"],
                "against_std": fb["std"],
                "gain": round(gain, 4),
                "verdict": verdict,
            }
        )
    return out


def grid_image(results, out: Path, scale: Scale) -> str:
    """Generated frames of every row against the true views, trajectory 1, seed 0."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pipelines.evaluation.files import read_png

    traj = scale.trajectories[0]["name"]
    seed = scale.seeds[0]
    rows, labels = [], []
    for row, (model, _) in ROWS.items():
        hit = results[
            (results["variant"] == row) & (results["seed"] == seed) & (results["status"] == "scored")
        ]
        hit = hit[hit["trajectory"].map(lambda t: json.loads(t).get("name") == traj)]
        if hit.empty:
            continue
        sample = out / "eval" / model / "samples" / hit.iloc[0]["sample_id"]
        if not rows:
            rows.append(
                np.concatenate(
                    [read_png(str(sample / f"truth_{i:03d}.png")) for i in range(scale.eval_frames)], 1
                )
            )
            labels.append("true view")
        rows.append(
            np.concatenate(
                [read_png(str(sample / f"frame_{i:03d}.png")) for i in range(scale.eval_frames)], 1
            )
        )
        labels.append(row)
    zoom, margin = 3, 150
    img = np.concatenate(rows, 0).repeat(zoom, 0).repeat(zoom, 1)
    canvas = Image.new("RGB", (img.shape[1] + margin, img.shape[0]), "white")
    canvas.paste(Image.fromarray(img), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    h = scale.res * zoom
    for i, label in enumerate(labels):
        draw.text((4, i * h + h // 2 - 6), label, fill="black")
    path = out / "grid.png"
    canvas.save(path)
    return str(path)


def log_summary(uri: str, report: dict, grid: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("micro-reproduction")
    with mlflow.start_run(run_name=f"micro-reproduction-{report['scale']['name']}") as run:
        mlflow.log_params({f"scale.{k}": str(v)[:500] for k, v in report["scale"].items()})
        for row, entry in report["table"].items():
            for metric, v in entry.items():
                if isinstance(v, dict) and v.get("mean") is not None:
                    mlflow.log_metric(f"{row}/{metric}_mean", v["mean"])
        mlflow.log_dict(report, "micro_reproduction.json")
        mlflow.log_artifact(grid)
        return run.info.run_id


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the <= 10 min scale (fewer subjects, steps, seeds)")
    ap.add_argument(
        "--toy", action="store_true", help="the same code path at toy size (tests; figures meaningless)"
    )
    ap.add_argument("--out", default=str(ROOT / ".tmp" / "micro_reproduction"), help="work folder (emptied)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda implies --in-process")
    ap.add_argument("--in-process", action="store_true", help="no Ray: the jobs' work in this process")
    ap.add_argument("--train-seed", type=int, default=0)
    args = ap.parse_args(argv)
    scale = TOY if args.toy else QUICK if args.quick else DEFAULT
    mode = "cuda" if args.device == "cuda" else "in-process" if args.in_process else "cpu"
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    uri = f"sqlite:///{out}/mlflow.db"
    t0 = time.time()
    seconds = {}

    from mvcustom.configs.common import RayConfig, init_ray

    if mode == "cpu":
        init_ray(RayConfig(), ray_train=True)  # one embedded Ray for every job of the run
    log(f"scale {scale.name}: data")
    data = make_data(out, scale, uri, in_process=mode != "cpu")
    seconds["data"] = round(time.time() - t0, 1)
    log(f"stand-ins ({data['train']['clips']} training clips)")
    stand_ins = train_stand_ins(out, data, scale)
    seconds["stand_ins"] = round(time.time() - t0 - sum(seconds.values()), 1)
    log(f"stand-ins: {stand_ins['figures']}")
    runs = train_all(out, data, stand_ins, scale, uri, mode, args.train_seed)
    seconds["training"] = round(time.time() - t0 - sum(seconds.values()), 1)
    results, evaluations = evaluate_all(out, data, stand_ins, runs, scale, uri, mode)
    seconds["evaluation"] = round(time.time() - t0 - sum(seconds.values()), 1)
    table = table_of(results)
    report = {
        "benchmark": "micro_reproduction",
        "scale": asdict(scale),
        "device": args.device,
        "mode": {"cpu": "jobs (Ray)", "in-process": "in-process (no Ray)", "cuda": "in-process on CUDA"}[
            mode
        ],
        "train_seeds": [args.train_seed],
        "spread": f"std over {len(scale.seeds)} sampling seeds x {len(scale.trajectories)} trajectories, one training seed",
        "data": data,
        "stand_ins": stand_ins,
        "training": runs,
        "evaluations": evaluations,
        "table": table,
        "directions": directions_of(table),
        "seconds": {**seconds, "total": round(time.time() - t0, 1)},
    }
    report["grid"] = grid_image(results, out, scale)
    report["mlflow"] = {"tracking_uri": uri, "summary_run_id": log_summary(uri, report, report["grid"])}
    (out / "micro_reproduction.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        json.dumps(
            {k: report[k] for k in ("scale", "table", "directions", "seconds", "grid")}, indent=1, default=str
        )
    )
    return report


if __name__ == "__main__":
    main()
