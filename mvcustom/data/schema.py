"""The shard schema (DESIGN.md §3): one WebDataset sample = one clip of N frames.

Members of a sample with key ``K`` (WebDataset splits a member name at the first dot of its
base name, so the part after ``K.`` is the sample-dict field; decoders pick the codec from the
*last* extension):

==========================  ==========================================================================
``K.json``                  metadata: source, sequence id, category, caption, frame indices, fps,
                            original and stored size, depth source and units, pose source and quality
``K.txt``                   caption (UTF-8)
``K.frame_000.jpg`` ...     the N frames, one JPEG member per frame (``frame_{i:03d}``), in clip order
``K.intrinsics.npy``        float32 (N, 3, 3), pixels of the stored frame (corner-origin)
``K.extrinsics.npy``        float32 (N, 4, 4), world-to-camera, OpenCV axes (both absent only
                            when ``json["pose_source"]`` is null: a clip kept after failed SfM)
``K.depth.npy``             float16 (N, H, W) z-depth in ``json["depth_units"]``; 0 = unknown (optional)
``K.mask.npy``              uint8 (N, H, W) foreground probability x 255 (optional; CO3D)
``K.depth_est.npy``         float16 (N, H, W) estimated (ZoeDepth) depth when ``depth.npy`` holds the
                            dataset's own (CO3D ``depth: both``); units in ``json["depth_est_units"]``
==========================  ==========================================================================

One member per frame (rather than one container) keeps every frame a plain JPEG that any
WebDataset or Ray Data reader decodes without our code. Keys are ``{source}-{sequence}-{clip:04d}``
with characters limited to ``[A-Za-z0-9_-]``: no dots (they would split the member name).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
SOURCES = ("webvid", "co3d", "photos")
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
FRAME_RE = re.compile(r"^frame_(\d{3,})\.jpg$")


def make_key(source: str, sequence: str, clip: int) -> str:
    """``{source}-{sequence}-{clip:04d}``, injective: characters outside ``[A-Za-z0-9_-]`` become
    ``_`` and, when any did, 8 hex digits of the original id's SHA-1 follow (``a.b`` ->
    ``a_b_1f2e...``), so ``a.b`` and ``a_b`` never share a key. Clean ids stay as they are."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if clip < 0:
        raise ValueError(f"clip index must be >= 0, got {clip}")
    if not str(sequence):
        raise ValueError("sequence id must not be empty")
    seq = re.sub(r"[^A-Za-z0-9_-]", "_", str(sequence))
    if seq != str(sequence):
        seq = f"{seq}_{hashlib.sha1(str(sequence).encode('utf8')).hexdigest()[:8]}"
    return f"{source}-{seq}-{clip:04d}"


class UnsafeShardError(ValueError):
    """A shard holding a member with an absolute or ``..`` path: refused, never skipped."""


def check_member_name(name: str) -> bool:
    """Refuse a tar member whose name is absolute or climbs out of its folder (``..``).

    Our readers stream members into memory and never extract them, but a shard is untrusted
    input and a name like ``/etc/cron.d/x`` or ``../../x`` has no business in one (and would be
    a path-traversal if anyone extracted the tar). Used as ``webdataset``'s ``select_files``
    predicate, so it sees every member before it is read; returns ``True`` for a safe name.
    """
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise UnsafeShardError(
            f"tar member {name!r} has an absolute or '..' path; refusing the shard "
            "(shards written by pipelines.shards only hold flat member names: rewrite it with the preprocess job)"
        )
    return True


def frame_field(i: int) -> str:
    return f"frame_{i:03d}.jpg"


def frame_members(raw: dict) -> list[str]:
    """The frame member fields of a raw sample, in clip order."""
    return sorted((k for k in raw if FRAME_RE.match(k)), key=lambda k: int(FRAME_RE.match(k).group(1)))


@dataclass
class ClipSample:
    """One clip in the schema's types, before encoding / after decoding.

    Attributes:
        key: sample key (see :func:`make_key`).
        meta: the ``json`` member (must include ``source``).
        caption: the ``txt`` member.
        frames: ``(N, H, W, 3)`` uint8 RGB.
        intrinsics: ``(N, 3, 3)`` float32. extrinsics: ``(N, 4, 4)`` float32 world-to-camera
            (``None`` only when ``meta["pose_source"]`` is ``None``).
        depth: optional ``(N, H, W)`` float16. mask: optional ``(N, H, W)`` uint8.
        depth_est: optional ``(N, H, W)`` float16, estimated depth beside the dataset's.
    """

    key: str
    meta: dict
    caption: str
    frames: np.ndarray
    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None
    depth: np.ndarray | None = None
    mask: np.ndarray | None = None
    depth_est: np.ndarray | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the sample and the member that breaks the schema."""

        def bad(member: str, msg: str):
            raise ValueError(f"sample {self.key!r}: member '{member}' {msg}")

        if not _KEY_OK.match(self.key or ""):
            bad("__key__", "may only use [A-Za-z0-9_-] (no dots, slashes or spaces)")
        if self.meta.get("source") not in SOURCES:
            bad("json", f"needs 'source' in {SOURCES}, got {self.meta.get('source')!r}")
        if "pose_source" not in self.meta:
            bad("json", "needs 'pose_source' (null for a clip kept without poses)")
        f = np.asarray(self.frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            bad("frames", f"must be uint8 (N, H, W, 3), got {f.dtype} {f.shape}")
        n, h, w = f.shape[:3]
        if n < 1:
            bad("frames", "must hold at least one frame")
        for name, arr, shape, dtype in (
            ("intrinsics.npy", self.intrinsics, (n, 3, 3), np.float32),
            ("extrinsics.npy", self.extrinsics, (n, 4, 4), np.float32),
            ("depth.npy", self.depth, (n, h, w), np.float16),
            ("mask.npy", self.mask, (n, h, w), np.uint8),
            ("depth_est.npy", self.depth_est, (n, h, w), np.float16),
        ):
            if arr is None:
                if name in ("intrinsics.npy", "extrinsics.npy") and self.meta.get("pose_source") is not None:
                    bad(name, "is required unless json 'pose_source' is null (a clip kept without poses)")
                continue
            if arr.shape != shape or arr.dtype != dtype:
                bad(name, f"must be {np.dtype(dtype).name} {shape}, got {arr.dtype} {arr.shape}")
        for name, arr in (("intrinsics.npy", self.intrinsics), ("extrinsics.npy", self.extrinsics)):
            if arr is not None and not np.isfinite(arr).all():
                bad(name, "contains non-finite values")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(sample: ClipSample, jpeg_quality: int = 95) -> dict[str, bytes | str]:
    """The WebDataset sample dict (``__key__`` plus one bytes value per member field)."""
    sample.validate()
    out: dict[str, bytes | str] = {"__key__": sample.key}
    meta = dict(sample.meta, schema_version=SCHEMA_VERSION, num_frames=int(sample.frames.shape[0]))
    out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf8")
    out["txt"] = sample.caption.encode("utf8")
    for i, frame in enumerate(sample.frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality)
        out[frame_field(i)] = buf.getvalue()
    if sample.intrinsics is not None:
        out["intrinsics.npy"] = npy_bytes(sample.intrinsics)
    if sample.extrinsics is not None:
        out["extrinsics.npy"] = npy_bytes(sample.extrinsics)
    if sample.depth is not None:
        out["depth.npy"] = npy_bytes(sample.depth)
    if sample.mask is not None:
        out["mask.npy"] = npy_bytes(sample.mask)
    if sample.depth_est is not None:
        out["depth_est.npy"] = npy_bytes(sample.depth_est)
    return out


def decode_sample(raw: dict) -> ClipSample:
    """Inverse of :func:`encode_sample` from a raw WebDataset sample (member field -> bytes)."""
    key = raw.get("__key__", "<no key>")
    try:
        meta = json.loads(raw["json"])
        caption = raw["txt"].decode("utf8") if isinstance(raw["txt"], bytes) else raw["txt"]
        frame_keys = frame_members(raw)
        frames = np.stack([np.array(Image.open(io.BytesIO(raw[k])).convert("RGB")) for k in frame_keys])
        sample = ClipSample(
            key=key,
            meta=meta,
            caption=caption,
            frames=frames,
            intrinsics=_load_npy(raw["intrinsics.npy"])
            if "intrinsics.npy" in raw or meta.get("pose_source") is not None
            else None,
            extrinsics=_load_npy(raw["extrinsics.npy"])
            if "extrinsics.npy" in raw or meta.get("pose_source") is not None
            else None,
            depth=_load_npy(raw["depth.npy"]) if "depth.npy" in raw else None,
            mask=_load_npy(raw["mask.npy"]) if "mask.npy" in raw else None,
            depth_est=_load_npy(raw["depth_est.npy"]) if "depth_est.npy" in raw else None,
        )
    except KeyError as e:
        raise ValueError(f"sample {key!r}: member {e.args[0]!r} is missing") from None
    if meta.get("num_frames") not in (None, len(frame_keys)):
        raise ValueError(
            f"sample {key!r}: json says {meta['num_frames']} frames but {len(frame_keys)} frame members exist"
        )
    sample.validate()
    return sample
