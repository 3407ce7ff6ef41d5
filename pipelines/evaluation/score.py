"""Scoring: :class:`ScoreSamples` reads a generated sample back, scores it with
:mod:`mvcustom.metrics` (pose accuracy by pycolmap, multi-view consistency, identity, text
alignment) and writes ``result.json`` and a trajectory plot (requested vs recovered camera
centres); :func:`aggregate` makes the per-variant and per-trajectory table."""

from __future__ import annotations

import json
import time

import numpy as np

from mvcustom.data.inspector import figure_image
from mvcustom.geometry.camera import Cameras
from pipelines.evaluation.files import (
    as_batch,
    cameras_from_json,
    failure_reason,
    read_png,
    records,
    sample_dir,
    write_json,
    write_png,
)

METRICS = ("pose_accuracy", "multiview_consistency", "identity", "text_alignment", "clip_image_similarity")
#: against the true view at each requested camera, for subjects with ``ground_truth``
#: (:meth:`ScoreSamples.score_truth`); the pose errors are the SfM medians behind pose_accuracy
TRUTH_METRICS = (
    "psnr_truth",
    "psnr_truth_subject",
    "ssim_truth",
    "ssim_truth_subject",
    "identity_truth",
    "rotation_error_deg",
    "translation_error_deg",
)


class ScoreSamples:
    """Ray Data callable class: scores generated samples (pycolmap SfM + feature models)."""

    def __init__(self, config: dict):
        from mvcustom.configs import EvaluateConfig, from_dict
        from mvcustom.metrics import ImageTextEncoder

        self.cfg = from_dict(EvaluateConfig, config, "evaluate config")
        mm = self.cfg.metric_models
        self.encoder = ImageTextEncoder.from_pretrained(mm.clip) if mm.clip else ImageTextEncoder.tiny(seed=0)
        self.distance = None  # distance "clip": the CLIP encoder, labelled as the fallback it is
        if mm.distance == "dreamsim":
            from mvcustom.metrics import DreamSimEncoder

            self.distance = DreamSimEncoder.from_pretrained(mm.dreamsim, dreamsim_type=mm.dreamsim_type)
        elif mm.distance == "backbone":
            self.distance = ImageTextEncoder.from_pretrained(mm.distance_backbone)

    def score(self, meta: dict) -> dict:
        from mvcustom.metrics import class_word_prompt, pose_accuracy, score_views

        out = sample_dir(self.cfg.output, meta["sample_id"])
        t0 = time.perf_counter()
        frames = np.stack([read_png(f"{out}/frame_{i:03d}.png") for i in range(meta["num_frames"])])
        refs = np.stack(
            [read_png(f"{meta['references']}/ref_{i:03d}.png") for i in range(meta["num_reference_views"])]
        )
        cams = cameras_from_json(meta["cameras"])
        pose = pose_accuracy(frames, cams, threshold_deg=self.cfg.metric_models.pose_threshold_deg)
        # CLIP has never seen the subject token: score against the class word (class_word_prompt)
        text_prompt = class_word_prompt(meta["prompt"], meta.get("subject_category"))
        sims = score_views(self.encoder, frames, refs, text_prompt, self.distance)
        result = {
            **{k: v for k, v in meta.items() if k != "cameras"},
            "status": "scored",
            "pose_accuracy": pose.score,
            "pose_failed": pose.failed,
            "pose_failure_reason": pose.reason,
            # sfm, or homography for one-centre trajectories (zoom); zoom_error with the latter
            "pose_method": pose.method,
            "zoom_error": pose.zoom_error,
            "registered_frames": pose.registered,
            "rotation_error_deg": pose.rotation_error_deg,
            "translation_error_deg": pose.translation_error_deg,
            # appendix Table A3: points COLMAP triangulated with the requested cameras
            "colmap_points": pose.colmap_points,
            **sims,
            "text_alignment_prompt": text_prompt,
        }
        if meta.get("subject_truth"):
            result.update(self.score_truth(out, frames, cams, meta["subject_truth"]))
        result["score_seconds"] = time.perf_counter() - t0
        write_png(f"{out}/trajectory.png", trajectory_plot(cams, pose.recovered, pose.registered_frames))
        write_json(f"{out}/result.json", result)
        return result

    def score_truth(self, out: str, frames: np.ndarray, cams: Cameras, subject_truth: str) -> dict:
        """Scores against the true view at each requested camera, which the generator renders
        (:func:`~mvcustom.data.generator.truth.true_views`): PSNR and SSIM of the whole frame
        and of the subject (:func:`~mvcustom.metrics.fidelity.truth_scores`), and identity to
        truth, the distance model's distance of each frame to its true view
        (:func:`~mvcustom.metrics.truth_distance`). Writes the true views (``truth_000.png``...)
        and ``truth_grid.png`` (generated frames above the true views)."""
        from mvcustom.data.generator.truth import SubjectTruth, true_views
        from mvcustom.metrics import truth_distance
        from mvcustom.metrics.fidelity import truth_scores
        from pipelines.evaluation.generate import video_grid_image

        truth, mask = true_views(SubjectTruth(**json.loads(subject_truth)), cams)
        for i, f in enumerate(truth):
            write_png(f"{out}/truth_{i:03d}.png", f)
        write_png(
            f"{out}/truth_grid.png", np.concatenate([video_grid_image(frames), video_grid_image(truth)])
        )
        dist = self.distance or self.encoder
        return {
            **truth_scores(frames, truth, mask),
            "identity_truth": truth_distance(dist.encode_images(frames), dist.encode_images(truth)),
        }

    def __call__(self, batch: dict) -> dict:
        out = []
        for meta in records(batch):
            if meta.get("status") != "generated":
                out.append(meta)
                continue
            try:
                out.append(self.score(meta))
            except Exception as e:
                out.append({**meta, "status": "scoring_failed", "failure_reason": failure_reason(e)})
        return as_batch(out)


def trajectory_plot(requested: Cameras, recovered: Cameras | None, registered: list[int]) -> np.ndarray:
    """Top and side views of the requested camera centres and the recovered ones (aligned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    req = requested.centers.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=80)
    for ax, (a, b) in zip(axes, ((0, 1), (0, 2)), strict=True):
        ax.plot(req[:, a], req[:, b], "o-", color="tab:blue", label="requested", markersize=3)
        if recovered is not None:
            rec = recovered.centers.numpy()
            ax.plot(rec[:, a], rec[:, b], "x--", color="tab:red", label="recovered (aligned)", markersize=4)
        ax.set_xlabel("xyz"[a])
        ax.set_ylabel("xyz"[b])
        ax.set_aspect("equal", adjustable="datalim")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"camera centres ({len(registered)}/{len(requested)} registered)", fontsize=8)
    return figure_image(fig)


# ---------------------------------------------------------------------------- tables
def aggregate(results) -> pd.DataFrame:  # noqa: F821
    """Mean ± std (and count) of every metric per variant and trajectory, over scored samples."""
    import pandas as pd

    scored = results[results["status"] == "scored"].copy()
    if scored.empty:
        return pd.DataFrame()
    scored["trajectory_name"] = [
        json.loads(t).get("name", json.loads(t)["kind"]) for t in scored["trajectory"]
    ]
    extra = ("colmap_points", "covered_fraction", "generate_seconds", "peak_gpu_memory_gib", "score_seconds")
    cols = [c for c in (*METRICS, *TRUTH_METRICS, *extra) if c in scored]
    for c in cols:
        scored[c] = pd.to_numeric(scored[c], errors="coerce")
    groups = {
        "all": scored.groupby("variant"),
        "by_trajectory": scored.groupby(["variant", "trajectory_name"]),
    }
    tables = []
    for level, g in groups.items():
        t = g[cols].agg(["mean", "std", "count"])
        t.columns = [f"{m}_{s}" for m, s in t.columns]
        if "stt_radius" in scored:  # the radius each group's samples were made at (a setting)
            t["stt_radius"] = g["stt_radius"].agg(
                lambda v: ", ".join(str(int(x)) for x in sorted(set(pd.to_numeric(v).dropna())))
            )
        t = t.reset_index()
        for name in ("clip_model", "distance_model"):  # which models the figures come from
            if name in scored:
                t.insert(0, name, ", ".join(sorted(map(str, scored[name].dropna().unique()))))
        t.insert(0, "level", level)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)
