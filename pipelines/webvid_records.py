"""Per-record WebVid work, testable without Ray: CSV listing, decoding, SfM poses, the clip.

CSV reading uses pyarrow with every column read as a string (WebVid ids must not be parsed as
numbers); the columns a config needs are ``videoid`` and ``name`` (the caption) plus whatever
``webvid.video_path_template`` names (``page_dir`` for the downloader layout) or ``contentUrl``
with ``webvid.use_url_column``. A row missing any of them is an error record, not a crash.

Frames are decoded forward once with PyAV (no per-frame seeks: STACK.md measured seeking 3x
slower on long-GOP files) and sampled at ``webvid.target_fps`` from the start of the clip
(:mod:`pipelines.video_sampling`: H.264 pictures no other picture references and the clip does
not keep are never decoded; the kept frames are the same bit for bit); the
stored frames are centre-cropped and resized by libavfilter on the decoded YUV frame (only the
stored size is converted to RGB), and full-size RGB frames are kept only for SfM.

Scene normalisation (documented contract of the WebVid shards): the world frame is the first
frame's camera and the scale makes the median depth of the SfM points seen by that camera equal
to 1 (``json["scene_scale"]`` is the factor applied). ZoeDepth depth, added later by the depth
stage, stays in metres: monocular and SfM scales are not aligned at preprocessing time.
"""

from __future__ import annotations

import csv
import io
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from mvcustom.configs.preprocess import PreprocessConfig, SfmConfig, WebVidInputConfig
from mvcustom.data.schema import ClipSample, make_key
from mvcustom.data.storage import read_bytes
from mvcustom.geometry.crop import center_crop_box
from pipelines.errors import RecordError, TransientError, is_transient
from pipelines.video_sampling import NoVideoStream, SampledVideo

if TYPE_CHECKING:  # torch and pycolmap load only where poses are estimated (decode-only runs skip them)
    from mvcustom.geometry import Cameras
    from mvcustom.geometry.sfm import SfmResult

__all__ = [
    "RecordError",
    "WebVidItem",
    "WebVidSource",
    "build_webvid_clip",
    "DecodedClip",
    "decode_clip",
    "decode_frames",
    "list_webvid_items",
]


@dataclass
class WebVidItem:
    id: str  # videoid
    video: str  # fsspec URL of the video
    caption: str
    duration: str | None
    row: str  # "<csv name>:<line>" for messages


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _read_csv_bytes(raw: bytes) -> pa.Table:
    """Every column as raw bytes: no type inference (ids keep leading zeros) and no UTF-8
    check over the whole file, so one row with bad bytes is that row's error, not the file's."""
    header = raw.split(b"\n", 1)[0].decode("utf8", errors="replace").lstrip("\ufeff").rstrip("\r")
    names = next(csv.reader([header]), [])
    if not names:
        raise ValueError("empty CSV (no header line)")
    return pacsv.read_csv(
        io.BytesIO(raw),
        convert_options=pacsv.ConvertOptions(
            strings_can_be_null=True, column_types={n: pa.binary() for n in names}
        ),
        read_options=pacsv.ReadOptions(autogenerate_column_names=False),
    )


def list_webvid_items(root: str, cfg: WebVidInputConfig) -> tuple[list[WebVidItem], list[dict]]:
    """Every usable CSV row (deterministic order: CSV files sorted, rows in file order) and one
    error row per rejected row or file."""
    fs, base = fsspec.core.url_to_fs(root)
    csvs = sorted({p for pattern in cfg.csv for p in fs.glob(f"{base}/{pattern}")})
    if not csvs:
        raise FileNotFoundError(
            f"no CSV matches {cfg.csv} under {root!r} (config keys 'input' and 'webvid.csv')"
        )
    needed = ["videoid", "name"] + (
        ["contentUrl"] if cfg.use_url_column else _template_fields(cfg.video_path_template)
    )
    items, errors, seen = [], [], set()
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    for path in csvs:
        name = path.rsplit("/", 1)[-1]
        try:
            raw = read_bytes(f"{proto}{path}" if proto and not path.startswith(proto) else path)
        except Exception as e:
            if is_transient(e):
                raise TransientError(f"reading {path}: {type(e).__name__}: {e}") from e
            errors.append({"id": name, "stage": "csv", "reason": f"unreadable CSV: {type(e).__name__}: {e}"})
            continue
        try:
            table = _read_csv_bytes(raw)
        except (pa.ArrowInvalid, ValueError) as e:
            errors.append({"id": name, "stage": "csv", "reason": f"unreadable CSV: {e}"})
            continue
        missing_cols = [c for c in needed if c not in table.column_names]
        if missing_cols:
            errors.append(
                {
                    "id": name,
                    "stage": "csv",
                    "reason": f"missing column(s) {missing_cols}; WebVid CSVs have videoid,contentUrl,duration,page_dir,name",
                }
            )
            continue
        for i, raw_row in enumerate(table.to_pylist()):
            rid = f"{name}:{i + 2}"  # line number: header is line 1 (rows with embedded newlines shift it)
            bad = []
            row = {}
            for c, v in raw_row.items():
                try:
                    row[c] = None if v is None else v.decode("utf8")
                except UnicodeDecodeError:
                    bad.append(c)
            if bad:
                errors.append(
                    {
                        "id": rid,
                        "stage": "csv",
                        "reason": f"field(s) {bad} are not valid UTF-8; re-encode the CSV",
                    }
                )
                continue
            absent = [c for c in needed if not (row.get(c) or "").strip()]
            if absent:
                errors.append({"id": rid, "stage": "csv", "reason": f"missing field(s) {absent}"})
                continue
            vid = row["videoid"].strip()
            if vid in seen:
                errors.append({"id": rid, "stage": "csv", "reason": f"duplicate videoid {vid}"})
                continue
            seen.add(vid)
            video = (
                row["contentUrl"]
                if cfg.use_url_column
                else f"{proto}{base}/{cfg.video_path_template.format(**row)}"
            )
            items.append(WebVidItem(vid, video, row["name"], row.get("duration"), rid))
            if cfg.max_rows is not None and len(items) >= cfg.max_rows:
                return items, errors
    return items, errors


@dataclass
class DecodedClip:
    """What :func:`decode_clip` returns.

    ``frames``: ``(M, H, W, 3)`` uint8 RGB at the video's size (``num_frames`` plus up to
    ``extra`` more), or None when not asked for; ``stored``: the first ``num_frames`` centre-cropped
    to the aspect of ``stored_hw`` (``box``, :func:`~mvcustom.geometry.crop.center_crop_box`) and
    resized to it, or None; ``fps``: the source's; ``indices``: the source frame index of each
    decoded frame; ``size_hw``: the video's frame size."""

    frames: np.ndarray | None
    stored: np.ndarray | None
    fps: float
    indices: list[int]
    size_hw: tuple[int, int]
    box: tuple[int, int, int, int] | None


# swscale's bicubic with chroma interpolated to full resolution before the scale: centre-aligned
# like PIL's BICUBIC on the RGB crop (a blob's centroid lands within 0.01 px of it, mean |diff|
# 0.02 levels on a grey image), without converting the whole frame to RGB first.
SWSCALE_FLAGS = "bicubic+accurate_rnd+full_chroma_int"


class _CropResize:
    """A libavfilter graph ``crop -> scale -> rgb24`` for frames of one size: the centre crop and
    the resize run in C on the YUV frame, so only the stored size is converted to RGB
    (0.012 s a clip less than RGB at full size + PIL for 32 frames of 320x180 -> 128x128)."""

    def __init__(self, frame, time_base, height: int, width: int):
        import av.filter

        self.size_hw = (frame.height, frame.width)
        self.box = center_crop_box(frame.height, frame.width, height, width)
        x0, y0, cw, ch = self.box
        g = av.filter.Graph()
        chain = [
            g.add_buffer(
                width=frame.width, height=frame.height, format=frame.format.name, time_base=time_base
            ),
            g.add("crop", f"w={cw}:h={ch}:x={x0}:y={y0}:exact=1"),
            g.add("scale", f"w={width}:h={height}:flags={SWSCALE_FLAGS}"),
            g.add("format", "rgb24"),
            g.add("buffersink"),
        ]
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            a.link_to(b)
        g.configure()
        self.graph = g

    def __call__(self, frame) -> np.ndarray:
        if (frame.height, frame.width) != self.size_hw:
            raise RecordError(
                "decode",
                f"frame size changes mid-stream ({self.size_hw[0]}x{self.size_hw[1]} -> "
                f"{frame.height}x{frame.width}); re-encode the video at one size",
            )
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


def decode_clip(
    url: str,
    num_frames: int,
    target_fps: float | None,
    extra: int = 0,
    *,
    stored_hw: tuple[int, int] | None = None,
    full: bool = True,
) -> DecodedClip:
    """Decode ``num_frames`` frames sampled at ``target_fps`` from the start of the video, and
    up to ``extra`` more after them where the video has them; keep them at full size (``full``)
    and/or centre-cropped and resized to ``stored_hw`` (the first ``num_frames``)."""
    if not full and stored_hw is None:
        raise ValueError("decode_clip: ask for full frames, stored_hw, or both")
    try:  # whole clip into memory: storage reads retry their transient faults (read_bytes)
        f = io.BytesIO(read_bytes(url))
    except FileNotFoundError:
        raise RecordError("read", f"video not found: {url}") from None
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"opening {url}: {type(e).__name__}: {e}") from e
        raise RecordError("read", f"cannot open {url}: {type(e).__name__}: {e}") from None
    frames, stored, indices = [], [], []
    resize = None
    size_hw = (0, 0)
    try:
        with f, SampledVideo(f) as video:
            for k, frame in video.frames(num_frames + extra if full else num_frames, target_fps):
                if not indices:
                    size_hw = (frame.height, frame.width)
                if full:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if stored_hw is not None and len(indices) < num_frames:
                    if resize is None:
                        resize = _CropResize(frame, video.time_base, *stored_hw)
                    stored.append(resize(frame))
                indices.append(k)
            fps = video.fps
    except RecordError:
        raise
    except NoVideoStream:
        raise RecordError("decode", f"{url} has no video stream") from None
    except Exception as e:  # PyAV raises many error types for corrupt/truncated input
        if is_transient(e):  # a read of the file object timed out: the video may be fine
            raise TransientError(f"reading {url}: {type(e).__name__}: {e}") from e
        raise RecordError("decode", f"corrupt or unsupported video {url}: {type(e).__name__}: {e}") from None
    if len(indices) < num_frames:
        what = f"at {target_fps} fps " if target_fps else ""
        raise RecordError(
            "decode",
            f"video yields {len(indices)} frames {what}from {url}, fewer than clip.num_frames={num_frames}",
        )
    return DecodedClip(
        frames=np.stack(frames) if full else None,
        stored=np.stack(stored) if stored_hw is not None else None,
        fps=fps,
        indices=indices if full else indices[:num_frames],
        size_hw=size_hw,
        box=resize.box if resize is not None else None,
    )


def decode_frames(
    url: str, num_frames: int, target_fps: float | None, extra: int = 0
) -> tuple[np.ndarray, float, list[int]]:
    """Full-size frames of :func:`decode_clip`: ``(frames (N, H, W, 3) uint8, source fps,
    source frame indices)``."""
    d = decode_clip(url, num_frames, target_fps, extra)
    return d.frames, d.fps, d.indices


def camera_motion(cams: Cameras) -> dict:
    """How much the camera moves: max rotation from the first view (deg) and path length
    (scene units, i.e. median first-view depths after normalisation)."""
    from mvcustom.geometry import rotation_angle_deg

    R0 = cams.R[0]
    rot = rotation_angle_deg(cams.R @ R0.T).max()
    path = (cams.centers[1:] - cams.centers[:-1]).norm(dim=-1).sum()
    return {"max_rotation_deg": float(rot), "path_length": float(path)}


def judge_pose_quality(res: SfmResult, cfg: SfmConfig) -> dict:
    """``res.quality()`` with ``low`` set (and ``low_reasons`` listed) when the figure is below
    ``sfm.min_quality`` or the camera moves along its view more than ``sfm.max_forward_motion``;
    a low-quality clip raises an ``sfm`` :class:`RecordError` under ``sfm.low_quality: drop``."""
    q = res.quality()
    reasons = []
    if q["score"] is not None and q["score"] < cfg.min_quality:
        std = q["focal_rel_std"]
        known = "not known at all" if std is None else f"known to +-{100 * std:.0f} %"
        reasons.append(
            f"pose quality {q['score']:.2f} below sfm.min_quality={cfg.min_quality}: the focal is "
            f"{known} (too little camera rotation to observe it)"
        )
    fwd = q["forward_motion"]
    if not res.focal_fixed and fwd is not None and fwd > cfg.max_forward_motion:
        reasons.append(
            f"forward motion {fwd:.2f} above sfm.max_forward_motion={cfg.max_forward_motion}: the "
            "camera moves along its view, where SfM's rotations are unreliable"
        )
    q["low"], q["low_reasons"] = bool(reasons), reasons
    if reasons and cfg.low_quality == "drop":
        raise RecordError("sfm", "; ".join(reasons))
    return q


def build_webvid_clip(item: WebVidItem, cfg: PreprocessConfig) -> ClipSample:
    """Decode, pose (SfM; on up to ``sfm.extra_frames`` more frames than are stored) and resize
    one WebVid clip into the shard schema."""
    n = cfg.clip.num_frames
    extra = cfg.sfm.extra_frames if cfg.estimate_poses else 0
    d = decode_clip(
        item.video,
        n,
        cfg.webvid.target_fps,
        extra,
        stored_hw=(cfg.clip.height, cfg.clip.width),
        full=cfg.estimate_poses,  # SfM reads full-size frames; a decode-only job keeps none
    )
    decoded, fps, indices, stored, box = d.frames, d.fps, d.indices[:n], d.stored, d.box
    H, W = d.size_hw
    meta = {
        "source": "webvid",
        "sequence": item.id,
        "category": None,
        "caption": item.caption,
        "frame_indices": indices,
        "fps": fps,
        "original_size_hw": [H, W],
        "stored_size_hw": [cfg.clip.height, cfg.clip.width],
        "depth_source": None,
        "depth_units": None,
        "pose_source": None,
        "pose_quality": None,
        "scene_scale": None,
        "camera_motion": None,
    }
    K = w2c = None
    if cfg.estimate_poses:
        import torch

        from mvcustom.geometry import Cameras
        from mvcustom.geometry.sfm import run_sfm

        try:
            res = run_sfm(decoded, cfg.sfm)
        except Exception as e:  # pycolmap can raise on degenerate input; it is the clip's failure
            if is_transient(e):  # out of memory is the node's failure, not the clip's
                raise TransientError(f"SfM of {item.id}: {type(e).__name__}: {e}") from e
            raise RecordError("sfm", f"pycolmap failed: {type(e).__name__}: {e}") from None
        if not res.ok:
            if not cfg.sfm.keep_failed:
                raise RecordError("sfm", res.reason)
            meta["pose_quality"] = res.quality()
            meta["pose_failure"] = res.reason
        else:
            meta["pose_quality"] = judge_pose_quality(res, cfg.sfm)
            meta["pose_quality"]["sfm_frames"] = len(decoded)
            meta["pose_quality"]["interpolated_frames"] = [i for i in res.interpolated if i < n]
            x0, y0, cw, ch = box
            cams = res.cameras[:n].crop(x0, y0, cw, ch).resize(cfg.clip.height, cfg.clip.width).relative_to(0)
            scale = 1.0 / res.median_depth
            w2c = cams.w2c.clone()
            w2c[:, :3, 3] *= scale
            cams = Cameras(w2c, cams.K, cams.image_hw)
            meta.update(pose_source="pycolmap_sfm", scene_scale=scale, camera_motion=camera_motion(cams))
            K, w2c = cams.K.to(torch.float32).numpy(), cams.w2c.to(torch.float32).numpy()
    return ClipSample(
        key=make_key("webvid", item.id, 0),
        meta=meta,
        caption=item.caption,
        frames=stored,
        intrinsics=K,
        extrinsics=w2c,
    )


class WebVidSource:
    """WebVid (:mod:`pipelines.sources`): CSV rows -> decoded clips posed by SfM; depth is
    always estimated (WebVid has none)."""

    name = "webvid"

    def list(self, cfg: PreprocessConfig) -> tuple[list[WebVidItem], list[dict]]:
        return list_webvid_items(cfg.input, cfg.webvid)

    def build(self, item: WebVidItem, cfg: PreprocessConfig) -> ClipSample:
        return build_webvid_clip(item, cfg)

    def depth_estimate(self, cfg: PreprocessConfig) -> str | None:
        return "replace"
