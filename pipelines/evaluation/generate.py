"""Generation: :class:`GenerateSamples` (one per Ray Data actor) loads the pipeline once and, per
sample, places the trajectory around the subject's reference views, generates, and writes the
frames (``frame_000.png``...), an image grid and ``sample.json`` (the row, the requested cameras,
the STT radius used and its source, the strategies' figures). A failure is recorded with its
reason; the other samples go on."""

from __future__ import annotations

import json
import math
import time

import fsspec
import numpy as np
import torch

from mvcustom.geometry.camera import Cameras
from pipelines.evaluation.files import (
    as_batch,
    cameras_json,
    failure_reason,
    records,
    sample_dir,
    write_json,
    write_png,
)
from pipelines.evaluation.spec import safe_name


def load_references(shards: str, sequence: str | None, num: int, image_hw: tuple[int, int]):
    """``num`` views spread over the first clip of ``sequence`` (``None``: the first clip in
    the shards), resized to ``image_hw``, as :class:`ReferenceViews`, with the clip's key and
    metadata (its ``category`` is the class word of the text-alignment prompt). One clip,
    because preprocessing normalises each clip's world frame on its own."""
    from mvcustom.data.reader import make_clip_dataset
    from mvcustom.inference.pipeline import ReferenceViews
    from mvcustom.training.data import resize_sample

    for sample in make_clip_dataset(shards, shuffle_buffer=0, shuffle_shards=False):
        if sequence is not None and str(sample["meta"].get("sequence")) != str(sequence):
            continue
        if "extrinsics" not in sample:
            raise ValueError(f"{shards}: clip {sample['key']} has no cameras; references need posed views")
        s = resize_sample(sample, *image_hw)
        n = s["frames"].shape[0]
        if num > n:
            raise ValueError(f"{shards}: clip {sample['key']} has {n} frames, fewer than {num} references")
        idx = [round(i * (n - 1) / max(num - 1, 1)) for i in range(num)]
        images = (
            ((s["frames"][idx] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        )
        cams = Cameras(s["extrinsics"][idx].double(), s["intrinsics"][idx].double(), image_hw)
        masks = (s["mask"][idx] > 0.5).numpy() if "mask" in s else None
        return ReferenceViews(np.ascontiguousarray(images), cams, masks), sample["key"], sample["meta"]
    raise ValueError(f"{shards}: no clip of sequence {sequence!r}" if sequence else f"{shards}: no clips")


def video_grid_image(frames: np.ndarray, columns: int = 8) -> np.ndarray:
    """``(F, H, W, 3)`` -> one image, ``columns`` frames per row."""
    Fr, H, W, _ = frames.shape
    rows = math.ceil(Fr / columns)
    cols = min(columns, Fr)
    grid = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = f
    return grid


def trained_stt_radius(model: str | None) -> int | None:
    """The STT radius ``model`` was trained at: ``final_stt_radius`` of the training record every
    export writes beside its weights (:data:`mvcustom.training.loop.TRAINING_RECORD`), read
    through fsspec (models may live in object storage). ``None`` when the folder has no record
    (a hub id, weights saved without training)."""
    from mvcustom.training.loop import TRAINING_RECORD

    if not model:
        return None
    url = f"{model.rstrip('/')}/{TRAINING_RECORD}"
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read().decode("utf8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:
        raise ValueError(
            f"{url} is not valid JSON ({e}): re-export the model, or set sampling.stt_radius to the "
            "radius it was trained at"
        ) from e
    radius = record.get("final_stt_radius") if isinstance(record, dict) else None
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < -1:
        raise ValueError(
            f"{url}: final_stt_radius must be an integer >= -1, got {radius!r}; re-export the model, or "
            "set sampling.stt_radius to the radius it was trained at"
        )
    return radius


def stt_radius_of(cfg) -> tuple[int, str]:
    """The STT radius the samples use (unless their variant sets ``radius``) and where it comes
    from: ``sampling.stt_radius`` when set; else the radius recorded in the model's training
    record (sampling at a radius the model never trained at, e.g. -1 after a stage 1 stopped
    early, is out of distribution); else -1, the whole feature map, stated as the default."""
    from mvcustom.training.loop import TRAINING_RECORD

    if cfg.sampling.stt_radius is not None:
        return cfg.sampling.stt_radius, "sampling.stt_radius"
    recorded = trained_stt_radius(cfg.model)
    if recorded is not None:
        return recorded, TRAINING_RECORD
    return -1, f"default -1 (no {TRAINING_RECORD} in the model folder)"


def inference_options(cfg, num_frames: int, overrides: dict, radius: int):
    """The sampler options of one sample: the config's (``radius``: :func:`stt_radius_of`), then
    the variant's overrides."""
    from mvcustom.inference.pipeline import InferenceOptions

    s = cfg.sampling
    opts = {
        "feature_rendering": s.feature_rendering,
        "feature_rendering_steps": s.feature_rendering_steps,
        "completion_until_step": s.completion_until_step,
        "anchors": s.anchor_frames(num_frames),
        "anchor_steps": s.anchor_steps,
        "depth_scale_search": s.depth_scale_search,
        "radius": radius,
    }
    bad = set(overrides) - set(InferenceOptions.__dataclass_fields__)
    if bad:
        raise ValueError(f"variant options {sorted(bad)} are not InferenceOptions fields")
    opts.update(overrides)
    if "anchors" in overrides:
        opts["anchors"] = tuple(overrides["anchors"])
    return InferenceOptions(**opts)


# ---------------------------------------------------------------------------- generation
class GenerateSamples:
    """Ray Data callable class (one per actor): loads the pipeline once, generates a batch.

    ``config``: the :class:`EvaluateConfig` as a dict (what reaches actors, never globals).
    """

    def __init__(self, config: dict):
        from mvcustom.configs import EvaluateConfig, from_dict
        from mvcustom.inference.pipeline import MVCustomPipeline

        self.cfg = from_dict(EvaluateConfig, config, "evaluate config")
        # read once per actor, before the weights: a malformed record fails here, not per sample
        self.stt_radius, self.stt_radius_source = stt_radius_of(self.cfg)
        device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.pipe = MVCustomPipeline.from_pretrained(
            self.cfg.model, depth_model=self.cfg.depth_model, dtype=dtype, device=device
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.references: dict[tuple, tuple] = {}

    def _refs(self, row: dict, image_hw):
        """The subject's reference views, the folder they are saved in (for the identity
        metric), its category and, for a subject with ``ground_truth``, where its true views
        come from (:class:`~mvcustom.data.generator.truth.SubjectTruth` as JSON): loaded and
        written once per subject and actor."""
        key = (row["shards"], row["sequence"], row["num_references"], row.get("ground_truth"))
        if key not in self.references:
            refs, clip_key, clip_meta = load_references(
                row["shards"], row["sequence"], row["num_references"], image_hw
            )
            truth = None
            if row.get("ground_truth"):
                from dataclasses import asdict

                from mvcustom.data.generator.truth import SubjectTruth

                truth = json.dumps(asdict(SubjectTruth.from_clip_meta(row["ground_truth"], clip_meta)))
            ref_dir = f"{self.cfg.output.rstrip('/')}/references/{safe_name(clip_key)}-{len(refs.images)}"
            for i, im in enumerate(refs.images):
                write_png(f"{ref_dir}/ref_{i:03d}.png", im)
            self.references[key] = (refs, ref_dir, clip_meta.get("category"), truth)
        return self.references[key]

    def generate(self, row: dict) -> dict:
        from mvcustom.geometry.trajectories import place_trajectory

        cfg = self.cfg
        out = sample_dir(cfg.output, row["sample_id"])
        image_hw = (cfg.clip.height, cfg.clip.width)
        t0 = time.perf_counter()
        device = self.pipe.model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        refs, ref_dir, category, truth = self._refs(row, image_hw)
        traj = dict(json.loads(row["trajectory"]))
        kind = traj.pop("kind")
        traj.pop("name", None)
        num_frames = int(traj.pop("num_frames", cfg.clip.num_frames))
        cams = place_trajectory(kind, num_frames, refs.cameras, image_hw, **traj)
        overrides = json.loads(row["options"])
        opts = inference_options(cfg, num_frames, overrides, self.stt_radius)
        g = torch.Generator(device=self.pipe.model.device).manual_seed(int(row["seed"]))
        result = self.pipe(
            row["prompt"],
            cams,
            refs,
            num_inference_steps=cfg.sampling.num_inference_steps,
            guidance_scale=cfg.sampling.guidance_scale,
            generator=g,
            options=opts,
            output_type="np",
            return_debug=True,
        )
        frames = result.frames[0]
        seconds = time.perf_counter() - t0
        for i, f in enumerate(frames):
            write_png(f"{out}/frame_{i:03d}.png", f)
        write_png(f"{out}/grid.png", video_grid_image(frames))
        info = result.debug[0] if result.debug else {}
        meta = {
            **row,
            "status": "generated",
            "num_frames": num_frames,
            "cameras": cameras_json(cams),
            "references": ref_dir,
            "subject_category": category,
            "subject_truth": truth,  # JSON of SubjectTruth, or None: scoring renders the true views
            "num_reference_views": len(refs.images),
            "stt_radius": opts.radius,
            "stt_radius_source": "variant option radius" if "radius" in overrides else self.stt_radius_source,
            "generate_seconds": seconds,
            # Table 2's cost column: peak accelerator memory of this sample (None on CPU)
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
            "covered_fraction": info.get("covered_fraction"),
            "depth_scale": info.get("depth_scale"),
            "depth_scale_source": info.get("depth_scale_source"),
        }
        write_json(f"{out}/sample.json", meta)
        return meta

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in records(batch):
            try:
                out.append(self.generate(row))
            except Exception as e:  # recorded and passed on: one bad sample must not stop the job
                out.append({**row, "status": "generation_failed", "failure_reason": failure_reason(e)})
        return as_batch(out)
