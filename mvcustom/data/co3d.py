"""CO3Dv2 on-disk format: typed annotations, loading with validation, depth/mask decoding.

Field for field from the co3d repository's ``co3d/dataset/data_types.py`` (mirrored in
PyTorch3D's ``implicitron/dataset/types.py``); the decoding rules from PyTorch3D's
``implicitron/dataset/utils.py`` (``load_16big_png_depth``, ``load_depth``, ``load_mask``,
``load_1bit_png_mask``). Layout of a dataset root::

    <root>/category_to_subset_name_list.json        {category: [subset_name, ...]}
    <root>/<category>/frame_annotations.jgz          gzip JSON list of FrameAnnotation
    <root>/<category>/sequence_annotations.jgz       gzip JSON list of SequenceAnnotation
    <root>/<category>/set_lists/set_lists_<subset>.json     {"train"|"val"|"test": [[seq, frame_number, image_path], ...]}
    <root>/<category>/eval_batches/eval_batches_<subset>.json  [[[seq, frame_number, image_path], ...], ...]
    <root>/<category>/<sequence>/images/frameXXXXXX.jpg
    <root>/<category>/<sequence>/masks/frameXXXXXX.png           8-bit, P(fg) * 255
    <root>/<category>/<sequence>/depths/frameXXXXXX.jpg.geometric.png   float16 bits in a 16-bit PNG
    <root>/<category>/<sequence>/depth_masks/frameXXXXXX.png     binary (> 0 = valid)
    <root>/<category>/<sequence>/pointcloud.ply

All ``path`` fields are relative to ``<root>`` and start with the category. ``image.size`` is
``[height, width]``. Loaders here are strict where the upstream loaders are lenient: a missing
required field or a wrongly shaped value raises ``ValueError`` naming the file, the record and
the field, because a silently defaulted camera is worse than a refused record.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from mvcustom.data.storage import read_bytes

SUBSET_NAMES = ("fewview_dev", "fewview_test", "manyview_dev_0", "manyview_dev_1", "manyview_test_0")


@dataclass
class ImageAnnotation:
    path: str  # jpg, relative to the dataset root
    size: tuple[int, int]  # (height, width)


@dataclass
class DepthAnnotation:
    path: str  # png storing depth / scale_adjustment as float16 bits
    scale_adjustment: float  # depth = png * scale_adjustment
    mask_path: str | None  # png storing the binary depth-validity mask


@dataclass
class MaskAnnotation:
    path: str  # png storing P(fg | pixel) * 255
    mass: float | None = None  # sum of P(fg | pixel)


@dataclass
class ViewpointAnnotation:
    R: tuple  # 3x3, right-multiply: X_cam = X_world @ R + T (PyTorch3D axes: +X left, +Y up)
    T: tuple  # 3
    focal_length: tuple  # (fx, fy) in NDC
    principal_point: tuple  # (px, py) in NDC
    intrinsics_format: str = "ndc_norm_image_bounds"  # or "ndc_isotropic" (CO3Dv2)


@dataclass
class FrameAnnotation:
    sequence_name: str
    frame_number: int  # 0-based, continuous within the sequence
    frame_timestamp: float  # seconds from the video start
    image: ImageAnnotation
    depth: DepthAnnotation | None = None
    mask: MaskAnnotation | None = None
    viewpoint: ViewpointAnnotation | None = None
    meta: dict[str, Any] | None = None


@dataclass
class VideoAnnotation:
    path: str
    length: float


@dataclass
class PointCloudAnnotation:
    path: str
    quality_score: float
    n_points: int | None


@dataclass
class SequenceAnnotation:
    sequence_name: str
    category: str
    video: VideoAnnotation | None = None
    point_cloud: PointCloudAnnotation | None = None
    viewpoint_quality_score: float | None = None  # the bigger the better


@dataclass
class Co3dCategory:
    """Everything the annotations of one category say."""

    category: str
    frames: list[FrameAnnotation]
    sequences: dict[str, SequenceAnnotation]
    frames_by_sequence: dict[str, list[FrameAnnotation]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_seq: dict[str, list[FrameAnnotation]] = {}
        for fa in self.frames:
            by_seq.setdefault(fa.sequence_name, []).append(fa)
        for v in by_seq.values():
            v.sort(key=lambda f: f.frame_number)
        self.frames_by_sequence = by_seq


# --------------------------------------------------------------------------- validation helpers
class _Ctx:
    def __init__(self, source: str, record: str):
        self.source, self.record = source, record

    def fail(self, fieldname: str, msg: str):
        raise ValueError(f"{self.source}: {self.record}: field '{fieldname}' {msg}")

    def get(self, d: dict, key: str, prefix: str = "", required: bool = True):
        if not isinstance(d, dict):
            self.fail(prefix.rstrip(".") or "<record>", f"must be a JSON object, got {type(d).__name__}")
        if key not in d or (required and d[key] is None):
            if required:
                self.fail(prefix + key, "is missing")
            return None
        return d[key]

    def num(self, value, name: str, kind=float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"must be a number, got {value!r}")
        if kind is int and float(value) != int(value):
            self.fail(name, f"must be an integer, got {value!r}")
        return kind(value)

    def vec(self, value, name: str, shape: tuple[int, ...]):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            self.fail(name, f"must be numbers of shape {shape}, got {value!r}")
        if arr.shape != shape:
            self.fail(name, f"must have shape {shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            self.fail(name, "contains non-finite values")
        return tuple(map(tuple, arr.tolist())) if arr.ndim == 2 else tuple(arr.tolist())

    def text(self, value, name: str):
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a non-empty string, got {value!r}")
        return value


def parse_frame_annotation(d: dict, source: str, index: int) -> FrameAnnotation:
    """Validate one ``frame_annotations.jgz`` record (``source``: the file, for messages)."""
    rec = f"frame record {index}"
    if isinstance(d, dict) and isinstance(d.get("sequence_name"), str):
        rec += f" (sequence {d['sequence_name']}, frame_number {d.get('frame_number')})"
    c = _Ctx(source, rec)
    seq = c.text(c.get(d, "sequence_name"), "sequence_name")
    fn = c.num(c.get(d, "frame_number"), "frame_number", int)
    ts = c.get(d, "frame_timestamp", required=False)
    ts = -1.0 if ts is None else c.num(ts, "frame_timestamp")
    im = c.get(d, "image")
    size = c.vec(c.get(im, "size", "image."), "image.size", (2,))
    if min(size) <= 0 or any(int(s) != s for s in size):
        c.fail("image.size", f"must be two positive integers [height, width], got {list(size)}")
    image = ImageAnnotation(c.text(c.get(im, "path", "image."), "image.path"), (int(size[0]), int(size[1])))
    depth = None
    if d.get("depth") is not None:
        dd = d["depth"]
        scale = c.num(c.get(dd, "scale_adjustment", "depth."), "depth.scale_adjustment")
        if scale <= 0:
            c.fail("depth.scale_adjustment", f"must be positive, got {scale}")
        mp = c.get(dd, "mask_path", "depth.", required=False)
        depth = DepthAnnotation(
            c.text(c.get(dd, "path", "depth."), "depth.path"),
            scale,
            c.text(mp, "depth.mask_path") if mp else None,
        )
    mask = None
    if d.get("mask") is not None:
        md = d["mask"]
        mass = c.get(md, "mass", "mask.", required=False)
        mask = MaskAnnotation(
            c.text(c.get(md, "path", "mask."), "mask.path"),
            None if mass is None else c.num(mass, "mask.mass"),
        )
    vp = None
    if d.get("viewpoint") is not None:
        v = d["viewpoint"]
        fmt = v.get("intrinsics_format", "ndc_norm_image_bounds") if isinstance(v, dict) else None
        if fmt not in ("ndc_norm_image_bounds", "ndc_isotropic"):
            c.fail(
                "viewpoint.intrinsics_format", f"must be ndc_norm_image_bounds or ndc_isotropic, got {fmt!r}"
            )
        vp = ViewpointAnnotation(
            R=c.vec(c.get(v, "R", "viewpoint."), "viewpoint.R", (3, 3)),
            T=c.vec(c.get(v, "T", "viewpoint."), "viewpoint.T", (3,)),
            focal_length=c.vec(c.get(v, "focal_length", "viewpoint."), "viewpoint.focal_length", (2,)),
            principal_point=c.vec(
                c.get(v, "principal_point", "viewpoint."), "viewpoint.principal_point", (2,)
            ),
            intrinsics_format=fmt,
        )
    meta = d.get("meta")
    if meta is not None and not isinstance(meta, dict):
        c.fail("meta", f"must be an object or null, got {type(meta).__name__}")
    return FrameAnnotation(seq, fn, ts, image, depth, mask, vp, meta)


def parse_sequence_annotation(d: dict, source: str, index: int) -> SequenceAnnotation:
    c = _Ctx(source, f"sequence record {index}")
    name = c.text(c.get(d, "sequence_name"), "sequence_name")
    c.record = f"sequence record {index} ({name})"
    cat = c.text(c.get(d, "category"), "category")
    q = d.get("viewpoint_quality_score")
    video = None
    if d.get("video") is not None:
        video = VideoAnnotation(
            c.text(c.get(d["video"], "path", "video."), "video.path"),
            c.num(c.get(d["video"], "length", "video."), "video.length"),
        )
    pc = None
    if d.get("point_cloud") is not None:
        p = d["point_cloud"]
        n = p.get("n_points") if isinstance(p, dict) else None
        pc = PointCloudAnnotation(
            c.text(c.get(p, "path", "point_cloud."), "point_cloud.path"),
            c.num(c.get(p, "quality_score", "point_cloud."), "point_cloud.quality_score"),
            None if n is None else c.num(n, "point_cloud.n_points", int),
        )
    return SequenceAnnotation(
        name, cat, video, pc, None if q is None else c.num(q, "viewpoint_quality_score")
    )


def read_jgz(path: str) -> Any:
    """Read a gzip-compressed JSON file (``.jgz``) through fsspec, with a clear error on corruption."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation file not found") from None
    try:
        return json.loads(gzip.decompress(data).decode("utf8"))
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, json.JSONDecodeError, zlib.error) as e:
        # only content errors: a storage timeout (an OSError too) propagates as itself
        raise ValueError(f"{path}: not a valid gzip-compressed JSON file ({e})") from None


def load_category(root: str, category: str) -> Co3dCategory:
    """Load and validate one category's frame and sequence annotations."""
    root = root.rstrip("/")
    fpath = f"{root}/{category}/frame_annotations.jgz"
    spath = f"{root}/{category}/sequence_annotations.jgz"
    frames_raw, seqs_raw = read_jgz(fpath), read_jgz(spath)
    for path, raw in ((fpath, frames_raw), (spath, seqs_raw)):
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    frames = [parse_frame_annotation(d, fpath, i) for i, d in enumerate(frames_raw)]
    seqs = [parse_sequence_annotation(d, spath, i) for i, d in enumerate(seqs_raw)]
    for i, s in enumerate(seqs):
        if s.category != category:
            raise ValueError(
                f"{spath}: sequence record {i} ({s.sequence_name}): field 'category' is {s.category!r}, expected {category!r}"
            )
    return Co3dCategory(category, frames, {s.sequence_name: s for s in seqs})


def load_set_list(root: str, category: str, subset_name: str) -> dict[str, list[tuple[str, int, str]]]:
    """``{"train"|"val"|"test": [(sequence_name, frame_number, image_path), ...]}``."""
    path = f"{root.rstrip('/')}/{category}/set_lists/set_lists_{subset_name}.json"
    try:
        raw = json.loads(read_bytes(path).decode("utf8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: set list not found (subset {subset_name!r} of category {category!r})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object with keys train/val/test")
    out = {}
    for split, entries in raw.items():
        rows = []
        for i, e in enumerate(entries):
            if not (
                isinstance(e, list) and len(e) in (2, 3) and isinstance(e[0], str) and isinstance(e[1], int)
            ):
                raise ValueError(
                    f"{path}: field '{split}[{i}]' must be [sequence_name, frame_number, image_path], got {e!r}"
                )
            rows.append((e[0], e[1], e[2] if len(e) == 3 else ""))
        out[split] = rows
    return out


def available_subsets(root: str, category: str) -> list[str]:
    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{category}/set_lists")
    if not fs.exists(base):
        return []
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    return sorted(
        n[len("set_lists_") : -len(".json")]
        for n in names
        if n.startswith("set_lists_") and n.endswith(".json")
    )


# --------------------------------------------------------------------------- decoding
def _read_bytes(path: str) -> bytes:
    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None


def decode_depth_png(data: bytes, scale_adjustment: float, source: str = "<bytes>") -> np.ndarray:
    """CO3D depth PNG -> float32 ``(H, W)`` depth (``load_16big_png_depth`` then ``* scale``; 0 = unknown)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im, dtype=np.uint16)
            w, h = im.size
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{source}: not a readable 16-bit depth PNG ({e})") from None
    depth = np.frombuffer(arr.tobytes(), dtype=np.float16).astype(np.float32).reshape(h, w)
    depth = depth * np.float32(scale_adjustment)
    depth[~np.isfinite(depth)] = 0.0
    return depth


def encode_depth_png(depth: np.ndarray, scale_adjustment: float) -> bytes:
    """Inverse of :func:`decode_depth_png`: store ``depth / scale_adjustment`` as float16 bits."""
    bits = (np.asarray(depth, np.float32) / np.float32(scale_adjustment)).astype(np.float16).view(np.uint16)
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(bits))
    assert img.mode == "I;16", img.mode
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_depth(root: str, ann: DepthAnnotation) -> np.ndarray:
    path = f"{root.rstrip('/')}/{ann.path}"
    return decode_depth_png(_read_bytes(path), ann.scale_adjustment, path)


def load_depth_mask(root: str, ann: DepthAnnotation) -> np.ndarray | None:
    """Binary validity mask ``(H, W)`` bool (``load_1bit_png_mask``: any value > 0 is valid)."""
    if not ann.mask_path:
        return None
    path = f"{root.rstrip('/')}/{ann.mask_path}"
    return _decode_png(path, "L") > 0


def load_mask(root: str, ann: MaskAnnotation) -> np.ndarray:
    """Foreground probability ``(H, W)`` float32 in [0, 1]."""
    path = f"{root.rstrip('/')}/{ann.path}"
    return _decode_png(path, "L").astype(np.float32) / 255.0


def load_image(root: str, ann: ImageAnnotation) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``; checked against the annotated size."""
    path = f"{root.rstrip('/')}/{ann.path}"
    img = _decode_png(path, "RGB")
    if img.shape[:2] != tuple(ann.size):
        raise ValueError(
            f"{path}: image is {img.shape[0]}x{img.shape[1]} but annotation 'image.size' says {ann.size[0]}x{ann.size[1]}"
        )
    return img


def _decode_png(path: str, mode: str) -> np.ndarray:
    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert(mode))
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
