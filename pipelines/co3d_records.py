"""Per-record CO3Dv2 work, testable without Ray: which frames form a clip, and building the clip.

The Ray Data wiring (reading, actor pools for depth, writing shards, resume) is issue 3's
``pipelines/preprocess`` builder; these functions are what it maps over.

Scene normalisation: CO3D's world frames are arbitrary COLMAP frames with arbitrary scale, so
each clip is re-expressed by :func:`mvcustom.geometry.conventions.normalize_scene` (the shards'
contract: first camera's frame, unit mean distance to the look-at point) and its depth scaled
by the same factor; ``json["scene_scale"]`` records the factor applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image

from mvcustom.configs.preprocess import Co3dInputConfig, PreprocessConfig
from mvcustom.data import co3d
from mvcustom.data.schema import ClipSample, make_key
from mvcustom.geometry import Cameras, cameras_from_co3d_viewpoints
from mvcustom.geometry.conventions import normalize_scene


@dataclass
class Co3dItem:
    """One clip to build: which frames of which sequence, and its caption."""

    id: str  # "{category}/{sequence}/{clip:04d}": the id in manifest and error records
    category: str
    sequence: str
    clip_index: int
    frames: list[co3d.FrameAnnotation]
    caption: str
    quality: float | None


def _error(id_: str, stage: str, reason: str) -> dict:
    return {"id": id_, "stage": stage, "reason": reason}


def list_categories(root: str) -> list[str]:
    """Category folders under a CO3D root (those holding ``frame_annotations.jgz``)."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"CO3D root {root!r} does not exist (config key 'input')")
    cats = []
    for p in fs.ls(base, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if fs.exists(f"{p}/frame_annotations.jgz"):
            cats.append(name)
    return sorted(cats)


def list_co3d_items(
    root: str, cfg: Co3dInputConfig, num_frames: int, seed: int = 0
) -> tuple[list[Co3dItem], list[dict]]:
    """Every clip the config selects, in a deterministic order, plus one error row per rejected
    input (a category whose annotations cannot be read, a sequence too short, ...)."""
    items: list[Co3dItem] = []
    errors: list[dict] = []
    captions = {}
    if cfg.captions_file:
        try:
            with fsspec.open(cfg.captions_file, "r", encoding="utf8") as f:
                captions = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"co3d.captions_file {cfg.captions_file!r}: cannot read a JSON object ({e})"
            ) from None
        if not isinstance(captions, dict):
            raise ValueError(
                f"co3d.captions_file {cfg.captions_file!r}: expected a JSON object {{sequence_name: caption}}"
            )
    found: set[str] = set()
    for category in cfg.categories or list_categories(root):
        try:
            cat = co3d.load_category(root, category)
            keep = None
            if cfg.subset_name:
                sl = co3d.load_set_list(root, category, cfg.subset_name)
                keep = {(e[0], e[1]) for split in cfg.splits for e in sl.get(split, [])}
        except (FileNotFoundError, ValueError) as e:  # missing or corrupt annotations; a storage
            # timeout propagates and fails the job before any shard is planned (nothing is lost)
            errors.append(_error(category, "annotations", str(e)))
            continue
        for seq in sorted(cat.frames_by_sequence):
            if cfg.sequences and seq not in cfg.sequences:
                continue
            found.add(seq)
            frames = cat.frames_by_sequence[seq]
            if keep is not None:
                frames = [f for f in frames if (seq, f.frame_number) in keep]
                if not frames:
                    continue
            sid = f"{category}/{seq}"
            meta = cat.sequences.get(seq)
            q = meta.viewpoint_quality_score if meta else None
            if cfg.min_viewpoint_quality > 0 and (q is None or q < cfg.min_viewpoint_quality):
                errors.append(
                    _error(
                        sid,
                        "select",
                        f"viewpoint_quality_score {q} below co3d.min_viewpoint_quality {cfg.min_viewpoint_quality}",
                    )
                )
                continue
            if len(frames) < num_frames:
                errors.append(
                    _error(
                        sid,
                        "select",
                        f"sequence has {len(frames)} frames, fewer than clip.num_frames={num_frames}",
                    )
                )
                continue
            caption = captions.get(seq) or cfg.caption_template.format(category=category)
            for c in range(cfg.clips_per_sequence):
                idx = sample_clip_indices(len(frames), num_frames, cfg.clip_sampling, c, seed)
                items.append(
                    Co3dItem(f"{sid}/{c:04d}", category, seq, c, [frames[i] for i in idx], caption, q)
                )
    missing = sorted(set(cfg.sequences) - found)
    if missing:
        raise ValueError(
            f"co3d.sequences {missing} are in none of the categories read ({cfg.categories or 'all'}) under "
            f"{root!r}; check the names (folders under <root>/<category>/) or co3d.categories"
        )
    return items, errors


def sample_clip_indices(
    num_available: int, num_frames: int, strategy: str, clip_index: int = 0, seed: int = 0
) -> list[int]:
    """Positions (into a sequence's frames, sorted by frame number) of one clip's views.

    * ``spread``: evenly around the whole capture (a different phase per ``clip_index``);
    * ``contiguous``: consecutive frames, windows tiled along the sequence;
    * ``random``: a sorted random subset, seeded by ``(seed, clip_index)``.
    """
    if num_available < num_frames:
        raise ValueError(f"sequence has {num_available} frames, fewer than the {num_frames} a clip needs")
    if strategy == "spread":
        step = num_available / num_frames
        phase = (clip_index * 0.618034 % 1.0) * step
        return sorted({int(phase + i * step) % num_available for i in range(num_frames)})
    if strategy == "contiguous":
        windows = max(num_available - num_frames + 1, 1)
        start = (clip_index * num_frames) % windows
        return list(range(start, start + num_frames))
    if strategy == "random":
        rng = np.random.default_rng([seed, clip_index])
        return sorted(rng.choice(num_available, size=num_frames, replace=False).tolist())
    raise ValueError(f"unknown clip sampling strategy {strategy!r}; expected spread, random or contiguous")


def _resize(arr: np.ndarray, box: tuple[int, int, int, int], hw: tuple[int, int], resample) -> np.ndarray:
    x0, y0, cw, ch = box
    im = Image.fromarray(arr[y0 : y0 + ch, x0 : x0 + cw])
    return np.asarray(im.resize((hw[1], hw[0]), resample))


def build_co3d_clip(item: Co3dItem, cfg: PreprocessConfig) -> ClipSample:
    """Load, crop/resize and normalise one clip of CO3D frames into the shard schema.

    Images are centre-cropped to the target aspect and resized (bicubic); masks bilinearly; depth
    and its validity mask with nearest-neighbour so unknown (0) depth never blends into valid
    depth. Intrinsics follow the same crop and resize exactly. The dataset's depth is loaded
    when ``co3d.depth`` is ``dataset`` or ``both``.
    """
    root, category, frames, caption = cfg.input, item.category, item.frames, item.caption
    height, width = cfg.clip.height, cfg.clip.width
    with_depth = cfg.co3d.depth in ("dataset", "both")
    if any(f.viewpoint is None for f in frames):
        missing = next(f.frame_number for f in frames if f.viewpoint is None)
        raise ValueError(f"{category}/{frames[0].sequence_name}: frame {missing} has no viewpoint annotation")
    sizes = torch.tensor([f.image.size for f in frames])
    cams = cameras_from_co3d_viewpoints([vars(f.viewpoint) for f in frames], sizes)
    imgs, masks, depths = [], [], []
    new_cams = []
    for i, fa in enumerate(frames):
        cam = cams[i]
        box = cam.center_crop_box(height, width)
        imgs.append(_resize(co3d.load_image(root, fa.image), box, (height, width), Image.BICUBIC))
        if fa.mask is not None:
            m = (co3d.load_mask(root, fa.mask) * 255).round().astype(np.uint8)
            masks.append(_resize(m, box, (height, width), Image.BILINEAR))
        if with_depth and fa.depth is not None:
            d = co3d.load_depth(root, fa.depth)
            valid = co3d.load_depth_mask(root, fa.depth)
            if valid is not None:
                d = d * valid
            depths.append(_resize(d.astype(np.float32), box, (height, width), Image.NEAREST))
        new_cams.append(cam.crop_resize(height, width))
    cams = Cameras.cat(new_cams)
    cams, scale = normalize_scene(cams)
    depth = np.stack(depths) * scale if len(depths) == len(frames) else None
    meta = {
        "source": "co3d",
        "sequence": frames[0].sequence_name,
        "category": category,
        "caption": caption,
        "frame_indices": [f.frame_number for f in frames],
        "fps": None,
        "original_size_hw": [list(map(int, s)) for s in sizes.tolist()],
        "stored_size_hw": [height, width],
        "depth_source": "co3d" if depth is not None else None,
        "depth_units": "scene (normalised with the poses)" if depth is not None else None,
        "pose_source": "co3d",
        "pose_quality": item.quality,
        "scene_scale": scale,
    }
    return ClipSample(
        key=make_key("co3d", frames[0].sequence_name, item.clip_index),
        meta=meta,
        caption=caption,
        frames=np.stack(imgs),
        intrinsics=cams.K.to(torch.float32).numpy(),
        extrinsics=cams.w2c.to(torch.float32).numpy(),
        depth=depth.astype(np.float16) if depth is not None else None,
        mask=np.stack(masks) if len(masks) == len(frames) else None,
    )


class Co3dSource:
    """CO3Dv2 (:mod:`pipelines.sources`): clips of annotated frames; depth from the dataset
    (``co3d.depth: dataset``), from ZoeDepth (``zoedepth``) or both."""

    name = "co3d"

    def list(self, cfg: PreprocessConfig) -> tuple[list[Co3dItem], list[dict]]:
        return list_co3d_items(cfg.input, cfg.co3d, cfg.clip.num_frames)

    def build(self, item: Co3dItem, cfg: PreprocessConfig) -> ClipSample:
        return build_co3d_clip(item, cfg)

    def depth_estimate(self, cfg: PreprocessConfig) -> str | None:
        return {"zoedepth": "replace", "both": "both"}.get(cfg.co3d.depth)
