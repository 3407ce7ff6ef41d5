"""Per-sample work of the evaluation job, testable without Ray (DESIGN.md §6.9).

**The spec** (``EvaluateConfig.spec``) says what to generate. YAML, a cross product::

    subjects:                       # reference views come from the subject's shards
      - {name: teddy, shards: .demo/shards/co3d, sequence: null, num_references: 2}
    prompts: ["a photo of a <sks> teddybear on a beach"]
    trajectories:                   # placed around the subject (geometry.place_trajectory)
      - {name: arc60, kind: arc, span_deg: 60}
      - {name: dolly, kind: forward}
    seeds: [0, 1]
    variants:                       # optional: inference options per variant (ablations)
      mvcustom: {}
      no_rendering: {feature_rendering: false}

or parquet with one row per sample and the columns of :data:`SPEC_COLUMNS` (``trajectory`` and
``options`` as JSON strings). A sample's id is ``{subject}-{variant}-{trajectory}-p{prompt
index}-s{seed}``, so a rerun of the same spec finds what is already done. Every row is checked
when the spec loads (:func:`check_rows`: trajectory kinds and parameters, variant options), so a
typo is one error naming it before any model loads.

**Per sample** (folder ``<output>/samples/<id>/``): :class:`GenerateSamples` writes the frames
(``frame_000.png``...), an image grid and ``sample.json`` (the row, the requested cameras, the
strategies' figures); :class:`ScoreSamples` reads them back, scores them with
:mod:`mvcustom.metrics` and writes ``result.json`` and a trajectory plot (requested vs
recovered camera centres). A failure in either is caught and recorded with its reason; the
other samples go on.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import traceback
from pathlib import Path

import fsspec
import numpy as np
import torch
import yaml
from PIL import Image

from mvcustom.data.inspector import figure_image
from mvcustom.geometry.camera import Cameras

SPEC_COLUMNS = (
    "subject",
    "shards",
    "sequence",
    "num_references",
    "prompt",
    "prompt_index",
    "trajectory",
    "seed",
    "variant",
    "options",
)
METRICS = ("pose_accuracy", "multiview_consistency", "identity", "text_alignment", "clip_image_similarity")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


# ---------------------------------------------------------------------------- the spec
def sample_id(row: dict) -> str:
    traj = json.loads(row["trajectory"])
    parts = (
        row["subject"],
        row["variant"],
        traj.get("name", traj["kind"]),
        f"p{row['prompt_index']}",
        f"s{row['seed']}",
    )
    return "-".join(_SAFE.sub("_", str(p)) for p in parts)


def expand_spec(spec: dict, default_references: int) -> list[dict]:
    """A YAML spec (mapping) -> one row per sample (see the module docstring)."""
    unknown = set(spec) - {"subjects", "prompts", "trajectories", "seeds", "variants"}
    if unknown:
        raise ValueError(f"evaluation spec: unknown keys {sorted(unknown)}")
    for key in ("subjects", "prompts", "trajectories"):
        if not spec.get(key):
            raise ValueError(f"evaluation spec: {key!r} must be a non-empty list")
    variants = spec.get("variants") or {"mvcustom": {}}
    rows = []
    for subject in spec["subjects"]:
        if "name" not in subject or "shards" not in subject:
            raise ValueError(f"evaluation spec: every subject needs 'name' and 'shards', got {subject}")
        for t in spec["trajectories"]:
            if "kind" not in t:
                raise ValueError(f"evaluation spec: every trajectory needs a 'kind', got {t}")
            for pi, prompt in enumerate(spec["prompts"]):
                for seed in spec.get("seeds") or [0]:
                    for vname, vopts in variants.items():
                        row = {
                            "subject": str(subject["name"]),
                            "shards": str(subject["shards"]),
                            "sequence": subject.get("sequence"),
                            "num_references": int(subject.get("num_references", default_references)),
                            "prompt": str(prompt),
                            "prompt_index": pi,
                            "trajectory": json.dumps(t, sort_keys=True),
                            "seed": int(seed),
                            "variant": str(vname),
                            "options": json.dumps(vopts or {}, sort_keys=True),
                        }
                        row["sample_id"] = sample_id(row)
                        rows.append(row)
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("evaluation spec: two samples share an id (duplicate subject/trajectory names?)")
    return rows


def check_rows(rows: list[dict], source: str) -> list[dict]:
    """Refuse, before any model loads, a row whose trajectory kind or parameters, or whose
    variant options, are not valid (a typo is one config error, not N failed samples)."""
    from mvcustom.geometry.trajectories import check_trajectory
    from mvcustom.inference.pipeline import InferenceOptions

    bad = []
    for r in rows:
        try:
            t = dict(json.loads(r["trajectory"]))
            t.pop("name", None)
            check_trajectory(t.pop("kind"), t)
            unknown = set(json.loads(r["options"])) - set(InferenceOptions.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"variant {r['variant']!r}: options {sorted(unknown)} are not InferenceOptions fields"
                )
        except (ValueError, KeyError, TypeError) as e:
            bad.append(f"{r['sample_id']}: {e}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"spec {source}: " + "; ".join(bad[:3]) + more)
    return rows


def load_spec(path: str, default_references: int) -> list[dict]:
    """Rows of a YAML or parquet spec (any fsspec URL), checked (:func:`check_rows`)."""
    if not path:
        raise ValueError("spec must name the evaluation spec (YAML or parquet)")
    if path.endswith(".parquet"):
        import pandas as pd

        with fsspec.open(path, "rb") as f:
            df = pd.read_parquet(f)
        missing = {"subject", "shards", "prompt", "trajectory", "seed"} - set(df.columns)
        if missing:
            raise ValueError(f"spec {path}: parquet needs columns {sorted(missing)}")
        rows = []
        for i, r in enumerate(df.to_dict("records")):
            row = {
                "subject": str(r["subject"]),
                "shards": str(r["shards"]),
                "sequence": r.get("sequence"),
                "num_references": int(r.get("num_references") or default_references),
                "prompt": str(r["prompt"]),
                "prompt_index": int(r.get("prompt_index", i)),
                "trajectory": r["trajectory"]
                if isinstance(r["trajectory"], str)
                else json.dumps(r["trajectory"]),
                "seed": int(r["seed"]),
                "variant": str(r.get("variant") or "mvcustom"),
                "options": r.get("options") or "{}",
            }
            row["sample_id"] = sample_id(row)
            rows.append(row)
        return check_rows(rows, path)
    try:
        with fsspec.open(path, "r") as f:
            spec = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"spec {path} does not exist") from None
    if not isinstance(spec, dict):
        raise ValueError(f"spec {path}: expected a mapping, got {type(spec).__name__}")
    return check_rows(expand_spec(spec, default_references), path)


# ---------------------------------------------------------------------------- files
def sample_dir(output: str, sid: str) -> str:
    return f"{output.rstrip('/')}/samples/{sid}"


def _write_png(url: str, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def _read_png(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.array(Image.open(io.BytesIO(f.read())).convert("RGB"))


def write_json(url: str, data: dict) -> None:
    """Atomically (temporary name, then rename): a killed writer leaves no half file behind."""
    from pipelines.shards import atomic_write

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write(fs, path, json.dumps(data, indent=1, default=float).encode("utf8"))


def read_json(url: str) -> dict | None:
    """The JSON object at ``url``; ``None`` when it is missing or unreadable (a file truncated
    by a writer older than :func:`write_json`'s atomic rename: its sample is redone)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read().decode("utf8"))
    except FileNotFoundError:
        return None
    except ValueError:
        print(f"[evaluate] {url} is truncated or not JSON: its sample is redone", flush=True)
        return None
    return data if isinstance(data, dict) else None


def _cams_json(cams: Cameras) -> dict:
    return {"w2c": cams.w2c.tolist(), "K": cams.K.tolist(), "image_hw": cams.image_hw[0].tolist()}


def _cams_from_json(d: dict) -> Cameras:
    return Cameras(
        torch.tensor(d["w2c"], dtype=torch.float64), torch.tensor(d["K"], dtype=torch.float64), d["image_hw"]
    )


# ---------------------------------------------------------------------------- references
def load_references(shards: str, sequence: str | None, num: int, image_hw: tuple[int, int]):
    """``num`` views spread over the first clip of ``sequence`` (``None``: the first clip in
    the shards), resized to ``image_hw``, as :class:`ReferenceViews`, with the clip's key and
    category (the class word of the text-alignment prompt). One clip, because
    preprocessing normalises each clip's world frame on its own."""
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
        return (
            ReferenceViews(np.ascontiguousarray(images), cams, masks),
            sample["key"],
            sample["meta"].get("category"),
        )
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


def inference_options(cfg, num_frames: int, overrides: dict):
    """The sampler options of one sample: the config's, then the variant's overrides."""
    from mvcustom.inference.pipeline import InferenceOptions

    s = cfg.sampling
    opts = {
        "feature_rendering": s.feature_rendering,
        "feature_rendering_steps": s.feature_rendering_steps,
        "completion_until_step": s.completion_until_step,
        "anchors": s.anchor_frames(num_frames),
        "anchor_steps": s.anchor_steps,
        "depth_scale_search": s.depth_scale_search,
        "radius": s.stt_radius,
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
        device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.pipe = MVCustomPipeline.from_pretrained(
            self.cfg.model, depth_model=self.cfg.depth_model, dtype=dtype, device=device
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.references: dict[tuple, tuple] = {}

    def _refs(self, row: dict, image_hw):
        """The subject's reference views and the folder they are saved in (for the identity
        metric): loaded and written once per subject and actor."""
        key = (row["shards"], row["sequence"], row["num_references"])
        if key not in self.references:
            refs, clip_key, category = load_references(
                row["shards"], row["sequence"], row["num_references"], image_hw
            )
            ref_dir = (
                f"{self.cfg.output.rstrip('/')}/references/{_SAFE.sub('_', clip_key)}-{len(refs.images)}"
            )
            for i, im in enumerate(refs.images):
                _write_png(f"{ref_dir}/ref_{i:03d}.png", im)
            self.references[key] = (refs, ref_dir, category)
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
        refs, ref_dir, category = self._refs(row, image_hw)
        traj = dict(json.loads(row["trajectory"]))
        kind = traj.pop("kind")
        traj.pop("name", None)
        num_frames = int(traj.pop("num_frames", cfg.clip.num_frames))
        cams = place_trajectory(kind, num_frames, refs.cameras, image_hw, **traj)
        opts = inference_options(cfg, num_frames, json.loads(row["options"]))
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
            _write_png(f"{out}/frame_{i:03d}.png", f)
        _write_png(f"{out}/grid.png", video_grid_image(frames))
        info = result.debug[0] if result.debug else {}
        meta = {
            **row,
            "status": "generated",
            "num_frames": num_frames,
            "cameras": _cams_json(cams),
            "references": ref_dir,
            "subject_category": category,
            "num_reference_views": len(refs.images),
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
                out.append({**row, "status": "generation_failed", "failure_reason": _reason(e)})
        return _columns(out)


def _reason(e: Exception) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


def _columns(rows: list[dict]) -> dict:
    """Rows -> a Ray Data batch of JSON strings (rows of different shapes stay one schema)."""
    return {"record": [json.dumps(r, default=float) for r in rows]}


def records(batch: dict) -> list[dict]:
    return [json.loads(r) for r in batch["record"]]


# ---------------------------------------------------------------------------- scoring
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
        frames = np.stack([_read_png(f"{out}/frame_{i:03d}.png") for i in range(meta["num_frames"])])
        refs = np.stack(
            [_read_png(f"{meta['references']}/ref_{i:03d}.png") for i in range(meta["num_reference_views"])]
        )
        cams = _cams_from_json(meta["cameras"])
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
            "colmap_points": pose.num_points,
            **sims,
            "text_alignment_prompt": text_prompt,
            "score_seconds": time.perf_counter() - t0,
        }
        _write_png(f"{out}/trajectory.png", trajectory_plot(cams, pose.recovered, pose.registered_frames))
        write_json(f"{out}/result.json", result)
        return result

    def __call__(self, batch: dict) -> dict:
        out = []
        for meta in records(batch):
            if meta.get("status") != "generated":
                out.append(meta)
                continue
            try:
                out.append(self.score(meta))
            except Exception as e:
                out.append({**meta, "status": "scoring_failed", "failure_reason": _reason(e)})
        return _columns(out)


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
    cols = [c for c in (*METRICS, *extra) if c in scored]
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
        t = t.reset_index()
        for name in ("clip_model", "distance_model"):  # which models the figures come from
            if name in scored:
                t.insert(0, name, ", ".join(sorted(map(str, scored[name].dropna().unique()))))
        t.insert(0, "level", level)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


#: Table 2's columns: (results column, short name, better direction, format).
REPORT_COLUMNS = (
    ("pose_accuracy", "CPA", "↑", "{:.3f}"),
    ("multiview_consistency", "MV-cons", "↓", "{:.3f}"),
    ("identity", "ID", "↓", "{:.3f}"),
    ("text_alignment", "Text", "↑", "{:.3f}"),
    ("clip_image_similarity", "CLIP-I", "↑", "{:.3f}"),
    ("generate_seconds", "s/sample", "↓", "{:.1f}"),
    ("peak_gpu_memory_gib", "GiB", "↓", "{:.1f}"),
)

#: The paper's published figures (PAPER.md §6, Table 2 and Table A1), for the report's context:
#: mean, or (mean, std). They come from the paper's models and its (partly unstated) metric
#: definitions, never from this code.
PUBLISHED = {
    "MVCustom (paper)": {
        "pose_accuracy": (0.735, 0.10),
        "multiview_consistency": (0.121, 0.10),
        "identity": (0.448, 0.11),
        "text_alignment": 0.744,
        "clip_image_similarity": (0.933, 0.048),
        "generate_seconds": 130.92,
        "peak_gpu_memory_gib": 19.29,
    },
    "CustomDiffusion360 (paper)": {
        "pose_accuracy": (0.0, 0.0),
        "multiview_consistency": 0.190,
        "identity": 0.417,
        "text_alignment": 0.806,
    },
    "Txt-MV gen, CameraCtrl + DB/LoRA (paper)": {
        "pose_accuracy": 0.283,
        "multiview_consistency": 0.116,
        "identity": 0.557,
        "text_alignment": 0.723,
    },
    "Custom Img + Img-MV gen, SEVA (paper)": {
        "pose_accuracy": 0.675,
        "multiview_consistency": (0.214, 0.15),
        "identity": (0.504, 0.12),
        "text_alignment": 0.676,
        "clip_image_similarity": (0.877, 0.067),
    },
}


def _cell(value, fmt: str, std=None) -> str:
    if value is None or value != value:
        return "–"
    out = fmt.format(value)
    if std is not None and std == std:
        out += " ± " + fmt.format(std)
    return out


def summary_rows(table, level: str) -> list[dict]:
    """Rows of Table 2's layout from :func:`aggregate`'s table at ``level`` (``all`` or
    ``by_trajectory``): per row its label, ``n`` and one formatted cell per column."""
    if table is None or not len(table):
        return []
    rows = []
    for r in table[table["level"] == level].to_dict("records"):
        label = r["variant"] + (f" / {r['trajectory_name']}" if level == "by_trajectory" else "")
        counts = [
            r.get(f"{c}_count") for c, *_ in REPORT_COLUMNS if r.get(f"{c}_count") == r.get(f"{c}_count")
        ]
        cells = {
            short: _cell(r.get(f"{c}_mean"), fmt, r.get(f"{c}_std")) for c, short, _, fmt in REPORT_COLUMNS
        }
        rows.append({"label": label, "n": int(max(counts)) if counts else 0, **cells})
    return rows


def _html_table(rows: list[dict], css_class: str = "") -> str:
    import html

    head = "<th>method</th><th>n</th>" + "".join(
        f"<th>{short} {arrow}</th>" for _, short, arrow, _ in REPORT_COLUMNS
    )
    body = "".join(
        f"<tr class='{css_class}'><td>{html.escape(r['label'])}</td><td>{r['n']}</td>"
        + "".join(f"<td>{html.escape(r[short])}</td>" for _, short, _, _ in REPORT_COLUMNS)
        + "</tr>"
        for r in rows
    )
    return f"<table class='summary'><tr>{head}</tr>{body}</table>"


def _published_rows() -> list[dict]:
    rows = []
    for label, figures in PUBLISHED.items():
        cells = {}
        for c, short, _, fmt in REPORT_COLUMNS:
            v = figures.get(c)
            mean, std = (v if isinstance(v, tuple) else (v, None)) if v is not None else (None, None)
            cells[short] = _cell(mean, fmt, std)
        rows.append({"label": label, "n": "–", **cells})
    return rows


def _zero_reason(r: dict) -> str:
    """Why a sample failed or a pose score is 0, in words (empty when nothing needs saying)."""
    if r.get("status") != "scored":
        return f"{r.get('status')}: {r.get('failure_reason') or 'no reason recorded'}"
    if r.get("pose_failed"):
        return f"pose accuracy 0: {r.get('pose_failure_reason') or 'the reconstruction failed'}"
    if r.get("pose_accuracy") == 0:
        return f"pose accuracy 0: no frame pair within the pose threshold ({r.get('pose_method')})"
    return ""


def write_report(output: str, results, table, run_url: str | None = None) -> str:
    """``<output>/report/index.html``, read like a results section: the metric models and what
    the figures can be compared with; a summary per variant in Table 2's layout (mean ± std, n)
    beside the paper's published rows; per-trajectory rows; then per sample its frames, the
    requested vs recovered cameras, the rendered anchor's coverage and why a score is 0. The
    images are copied beside the page, so the ``report/`` folder stands alone (MLflow logs it)."""
    import html

    out = output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(f"{out}/report")
    fs.makedirs(f"{root}/images", exist_ok=True)
    records = results.to_dict("records") if len(results) else []
    scored = [r for r in records if r.get("status") == "scored"]
    models = {k: sorted({str(r[k]) for r in scored if r.get(k)}) for k in ("clip_model", "distance_model")}
    tiny = any("tiny random" in m for m in models["clip_model"])
    dreamsim = bool(models["distance_model"]) and all(
        m.startswith("DreamSim") for m in models["distance_model"]
    )
    subjects = sorted(
        {
            str(r["subject"]) + (f" (sequence {r['sequence']})" if isinstance(r.get("sequence"), str) else "")
            for r in records
            if r.get("subject")
        }
    )
    notes = [
        f"{len(scored)} of {len(records)} sample(s) scored. Subject(s): {html.escape(', '.join(subjects) or '–')}.",
        f"Text alignment and CLIP-I: {html.escape(', '.join(models['clip_model']) or '–')}. "
        f"MV-cons and ID: {html.escape(', '.join(models['distance_model']) or '–')}.",
    ]
    if tiny:
        notes.append(
            "<b>These metric models are tiny and random (the demo, tests): the figures check that the "
            "pipeline runs and mean nothing about the model; they are not comparable with the published rows.</b>"
        )
    elif not dreamsim:
        notes.append(
            "MV-cons and ID are not DreamSim distances here (a labelled fallback): not comparable with the paper's."
        )
    notes.append(
        "Published rows are the paper's figures (Table 2; CLIP-I from Table A1; cost as reported, GPU unstated), "
        "from its models and its metric definitions, which the paper leaves partly open (our CPA is our own "
        "definition): context, not a like-for-like comparison."
    )
    samples = []
    for r in records:
        sid = r["sample_id"]
        imgs = []
        for name in ("grid", "trajectory"):
            src = f"{out}/samples/{sid}/{name}.png"
            sfs, spath = fsspec.core.url_to_fs(src)
            if sfs.exists(spath):
                with (
                    sfs.open(spath, "rb") as f,
                    fs.open(f"{root}/images/{_SAFE.sub('_', sid)}_{name}.png", "wb") as g,
                ):
                    g.write(f.read())
                imgs.append(f"<img alt='{name}' src='images/{_SAFE.sub('_', sid)}_{name}.png'>")
        figures = " · ".join(
            f"{short} {fmt.format(r[c])}"
            for c, short, _, fmt in REPORT_COLUMNS
            if isinstance(r.get(c), int | float) and r.get(c) == r.get(c)
        )
        cov = r.get("covered_fraction")
        extra = [
            f"trajectory {html.escape(str(json.loads(r['trajectory']).get('name', '')))}",
            html.escape(r["variant"]),
        ]
        if isinstance(cov, int | float) and cov == cov:
            extra.append(f"rendered anchor covers {100 * cov:.0f}% of the target latents")
        if r.get("pose_method"):
            extra.append(
                f"pose by {html.escape(str(r['pose_method']))}, {r.get('registered_frames')} of {r.get('num_frames')} frames registered"
            )
        why = _zero_reason(r)
        samples.append(
            f"<div class='sample'><h3>{html.escape(sid)}</h3><p><i>{html.escape(str(r['prompt']))}</i><br>"
            f"{'; '.join(extra)}<br>{html.escape(figures) or '–'}</p>"
            + (f"<p class='why'>{html.escape(why)}</p>" if why else "")
            + "".join(imgs)
            + "</div>"
        )
    css = (
        "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1000px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
        "tr.published td{color:#666;font-style:italic}img{max-width:100%;height:auto}"
        ".sample{border-top:1px solid #aaa;margin-top:1em}.why{color:#a00}.notes li{margin:.2em 0}"
    )
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mvcustom evaluation</title>"
        f"<style>{css}</style></head><body><h1>Evaluation</h1>"
        + (f"<p>MLflow run: {html.escape(run_url)}</p>" if run_url else "")
        + "<ul class='notes'>"
        + "".join(f"<li>{n}</li>" for n in notes)
        + "</ul>"
        + "<h2 id='summary'>Summary (mean ± std over scored samples)</h2>"
        + _html_table(summary_rows(table, "all"))
        + "<p>The paper's published figures, for context:</p>"
        + _html_table(_published_rows(), "published")
        + "<h2>Per trajectory</h2>"
        + _html_table(summary_rows(table, "by_trajectory"))
        + "<h2>Samples</h2>"
        + "\n".join(samples)
        + "</body></html>"
    )
    url = f"{out}/report/index.html"
    with fsspec.open(url, "w") as f:
        f.write(body)
    return url
