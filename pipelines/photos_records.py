"""A folder of a user's own photos of a subject, with no poses -> one posed clip (issue 5 stage 2).

Layout of ``input``: one sub-folder per subject holding its photos (``.jpg``/``.jpeg``/``.png``,
any names, any order), optionally a ``caption.txt``; or the photos directly in ``input`` (one
subject, named after the folder)::

    my_subjects/
      my_mug/     IMG_0001.jpg ... IMG_0024.jpg   caption.txt ("a photo of a mug", optional)
      my_dog/     ...

Each subject becomes one clip sample of the shard schema. Its photos are posed by pycolmap SfM
at their **original** resolution (upright per EXIF; ``photos.max_image_size`` caps it when set,
``sfm.max_image_size`` is the video clips' cap and does not apply), with **exhaustive** matching
(photos have no order, so sequential matching would miss most pairs) and one focal shared by
photos of one size (one per photo when sizes differ); then each is centre-cropped to the clip's
aspect and resized, and its camera is cropped and scaled with it (``Cameras.crop_resize``: the
same pixels, exactly). Posing the originals keeps the features a crop would cut off and the
resolution a resize would lose. Photos the reconstruction does not register are dropped
(interpolating a pose between unordered photos would be meaningless) and listed in
``json["dropped_photos"]``. ``photos.min_photos`` is the one minimum: a subject with fewer
registered photos is an error record, one with at least that many is accepted whatever fraction
of its photos registered (``sfm.min_registered_fraction`` does not apply to photos). It is the
minimum stage 2 needs: ``clip.num_frames + data.num_references`` frames per sample, checked again
when training starts. The scene is normalised as CO3D clips are
(``mvcustom.geometry.conventions.normalize_scene``: first camera's frame, mean distance to the
look-at point 1), so stage 2's FeatureNeRF bounds apply unchanged. Depth comes from ZoeDepth
when ``estimate_depth`` is on; there are no foreground masks, so stage 2 trains without its
mask terms.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps

from mvcustom.configs.preprocess import PreprocessConfig
from mvcustom.data.schema import ClipSample, make_key
from mvcustom.data.storage import read_bytes
from mvcustom.geometry import center_crop_box
from mvcustom.geometry.conventions import normalize_scene
from pipelines.errors import RecordError, TransientError, is_transient
from pipelines.webvid_records import camera_motion, judge_pose_quality

EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class PhotoItem:
    """One subject: its id (folder name), photo URLs (sorted) and caption."""

    id: str
    photos: list[str]
    caption: str


def list_photo_items(
    root: str, min_photos: int, max_photos: int, caption_template: str, subjects: list[str] | None = None
) -> tuple[list[PhotoItem], list[dict]]:
    """Subjects under ``root`` (see the module docstring); folders with too few photos become
    error records."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise ValueError(f"photos input {root} is not a folder")
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""

    def photos_in(folder: str) -> list[str]:
        names = [p for p in fs.ls(folder, detail=False) if p.lower().endswith(EXTENSIONS)]
        return sorted(proto + p if proto and not p.startswith(proto) else p for p in names)

    folders = [base] if photos_in(base) else sorted(p for p in fs.ls(base, detail=False) if fs.isdir(p))
    items, errors = [], []
    if subjects:
        names = {f.rstrip("/").rsplit("/", 1)[-1] for f in folders}
        missing = sorted(set(subjects) - names)
        if missing:
            raise ValueError(
                f"photos.subjects {missing} are not folders under {root!r} (found {sorted(names)})"
            )
        folders = [f for f in folders if f.rstrip("/").rsplit("/", 1)[-1] in subjects]
    for folder in folders:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        photos = photos_in(folder)
        if len(photos) < min_photos:
            errors.append(
                {
                    "id": name,
                    "stage": "list",
                    "reason": f"{len(photos)} photos, fewer than photos.min_photos={min_photos}",
                }
            )
            continue
        caption = caption_template.format(name=name.replace("_", " "))
        if fs.exists(f"{folder}/caption.txt"):
            with fs.open(f"{folder}/caption.txt", "r") as f:
                caption = f.read().strip() or caption
        items.append(PhotoItem(name, photos[:max_photos], caption))
    if not items and not errors:
        raise ValueError(
            f"photos input {root} holds no photos ({', '.join(EXTENSIONS)}) and no sub-folders of them"
        )
    return items, errors


def load_photo(url: str) -> np.ndarray:
    """A photo upright (EXIF orientation applied), RGB, at its original resolution."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(read_bytes(url)))).convert("RGB"))


def crop_photo(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to ``width/height`` and resize (the box :func:`center_crop_box` gives)."""
    x0, y0, cw, ch = center_crop_box(photo.shape[0], photo.shape[1], height, width)
    im = Image.fromarray(photo).crop((x0, y0, x0 + cw, y0 + ch))
    return np.asarray(im.resize((width, height), Image.BICUBIC))


def build_photos_clip(item: PhotoItem, cfg: PreprocessConfig) -> ClipSample:
    """Load, pose (exhaustive SfM on the originals), crop and normalise one subject's photos."""
    from mvcustom.geometry.sfm import run_sfm

    H, W = cfg.clip.height, cfg.clip.width
    try:
        originals = [load_photo(p) for p in item.photos]
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"reading the photos of {item.id}: {type(e).__name__}: {e}") from e
        raise RecordError("read", f"{type(e).__name__}: {e}") from None
    sfm = dataclasses.replace(
        cfg.sfm,
        matcher="exhaustive",  # photos have no order
        max_image_size=cfg.photos.max_image_size,  # not the video clips' cap: full size by default
        # Unregistered photos are dropped, so the only minimum is the count left
        # (photos.min_photos, below), not a fraction of the folder.
        min_registered_fraction=1e-6,
    )
    try:
        res = run_sfm(originals, sfm)
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"SfM of {item.id}: {type(e).__name__}: {e}") from e
        raise RecordError("sfm", f"pycolmap failed: {type(e).__name__}: {e}") from None
    if not res.ok:
        raise RecordError("sfm", res.reason)
    keep = sorted(res.registered_frames)
    need = cfg.photos.min_photos
    if len(keep) < need:
        raise RecordError(
            "sfm", f"{len(keep)} of {len(originals)} photos registered, fewer than photos.min_photos={need}"
        )
    boxes = torch.tensor([center_crop_box(*originals[i].shape[:2], H, W) for i in keep])
    cams = res.cameras[keep].crop(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]).resize(H, W)
    frames = np.stack([crop_photo(originals[i], H, W) for i in keep])
    try:
        cams, scale = normalize_scene(cams)
    except ValueError as e:
        raise RecordError("sfm", str(e)) from None
    meta = {
        "source": "photos",
        "sequence": item.id,
        "category": None,
        "caption": item.caption,
        "frame_indices": keep,
        "fps": None,
        "original_size_hw": [list(originals[i].shape[:2]) for i in keep],
        "stored_size_hw": [H, W],
        "depth_source": None,
        "depth_units": None,
        "pose_source": "pycolmap_sfm",
        "pose_quality": judge_pose_quality(res, sfm),
        "scene_scale": scale,
        "camera_motion": camera_motion(cams),
        "photos": [item.photos[i].rsplit("/", 1)[-1] for i in keep],
        "dropped_photos": [p.rsplit("/", 1)[-1] for i, p in enumerate(item.photos) if i not in set(keep)],
    }
    return ClipSample(
        key=make_key("photos", item.id, 0),
        meta=meta,
        caption=item.caption,
        frames=np.ascontiguousarray(frames),
        intrinsics=cams.K.to(torch.float32).numpy(),
        extrinsics=cams.w2c.to(torch.float32).numpy(),
    )


class PhotosSource:
    """A folder of photos per subject (:mod:`pipelines.sources`): posed by exhaustive SfM;
    depth is always estimated."""

    name = "photos"

    def list(self, cfg: PreprocessConfig) -> tuple[list[PhotoItem], list[dict]]:
        p = cfg.photos
        return list_photo_items(cfg.input, p.min_photos, p.max_photos, p.caption_template, p.subjects)

    def build(self, item: PhotoItem, cfg: PreprocessConfig) -> ClipSample:
        return build_photos_clip(item, cfg)

    def depth_estimate(self, cfg: PreprocessConfig) -> str | None:
        return "replace"
