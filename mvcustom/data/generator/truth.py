"""The true view of a generated CO3D subject at any camera of a preprocessed clip's world.

Preprocessing re-expresses each clip in its own normalised world
(:func:`mvcustom.geometry.conventions.normalize_scene`: the clip's first view's camera frame,
scaled by the clip's ``scene_scale``), and the generator wrote the dataset in a random similarity
frame of the scene it rendered (``X_ds = world_scale * (R X + t)``, the sidecar's
``world_from_canonical``). Both maps are recorded: the sidecar keeps the dataset cameras, the
similarity and what rebuilds the scene (``category``, ``scene_seed``); the clip's metadata keeps
the first frame's number and ``scene_scale``. So a camera requested in the clip's world, an
evaluation trajectory placed around the subject's reference views, maps back to the renderer's
world exactly, and :func:`true_views` ray-casts what the generator would have photographed there:
the ground truth that the micro-reproduction benchmark scores generated frames against.

Requires a sidecar written by this version of the generator (older ones lack ``scene_seed``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from mvcustom.geometry.camera import Cameras


@dataclass(frozen=True)
class SubjectTruth:
    """Where a preprocessed clip's subject comes from: the generator's ``ground_truth`` folder,
    the clip's ``category`` and ``sequence``, the frame number of the clip's first view (its
    camera frame is the clip's world) and the clip's ``scene_scale``."""

    ground_truth: str
    category: str
    sequence: str
    first_frame: int
    scene_scale: float

    @classmethod
    def from_clip_meta(cls, ground_truth: str, meta: dict) -> SubjectTruth:
        """From a CO3D clip's shard metadata (``category``, ``sequence``, ``frame_indices``,
        ``scene_scale``)."""
        missing = [k for k in ("category", "sequence", "frame_indices", "scene_scale") if meta.get(k) is None]
        if missing or meta.get("source") != "co3d":
            raise ValueError(
                f"ground truth needs a CO3D clip from the generator; this clip's metadata lacks {missing} "
                f"(source {meta.get('source')!r}): drop ground_truth from the subject, or preprocess the "
                "generator's co3d tree"
            )
        return cls(
            ground_truth,
            str(meta["category"]),
            str(meta["sequence"]),
            int(meta["frame_indices"][0]),
            float(meta["scene_scale"]),
        )


def _load_sidecar(truth: SubjectTruth) -> dict:
    url = f"{truth.ground_truth.rstrip('/')}/co3d/{truth.category}/{truth.sequence}.npz"
    try:
        with fsspec.open(url, "rb") as f:
            data = dict(np.load(io.BytesIO(f.read())))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{url}: no ground truth for sequence {truth.sequence!r}; ground_truth must be the "
            "generator's ground_truth folder of the data the subject's shards were made from"
        ) from None
    if "scene_seed" not in data:
        raise ValueError(
            f"{url} was written by an older generator (no scene_seed): regenerate the sample data "
            "(python -m jobs.make_sample_data) to render true views"
        )
    return data


def canonical_cameras(truth: SubjectTruth, cams: Cameras, sidecar: dict | None = None) -> Cameras:
    """``cams`` (in the clip's normalised world) re-expressed in the world the generator rendered.

    The clip's world is ``X_n = s (w2c_0 X_ds)`` with ``w2c_0`` the first view's dataset
    camera and ``s`` the clip's ``scene_scale``; the dataset world is ``X_ds = s_w (R_w X + t_w)``.
    Composed, ``X_n = S (R X + t)`` with ``S = s s_w``, ``R = R_0 R_w`` and
    ``t = R_0 t_w + t_0 / s_w``; a camera ``[R_n | t_n]`` then sees ``X`` at
    ``S (R_n R X + R_n t + t_n / S)``, the same pixels as the camera ``[R_n R | R_n t + t_n / S]``.
    """
    data = sidecar if sidecar is not None else _load_sidecar(truth)
    numbers = [int(n) for n in data["frame_numbers"]]
    if truth.first_frame not in numbers:
        raise ValueError(f"sequence {truth.sequence!r} has no frame {truth.first_frame} in its ground truth")
    w2c0 = torch.as_tensor(data["w2c"][numbers.index(truth.first_frame)], dtype=torch.float64)
    Tw = torch.as_tensor(data["world_from_canonical"], dtype=torch.float64)
    sw = float(data["world_scale"])
    S = truth.scene_scale * sw
    R = w2c0[:3, :3] @ Tw[:3, :3]
    t = w2c0[:3, :3] @ Tw[:3, 3] + w2c0[:3, 3] / sw
    cams = cams.to(dtype=torch.float64)
    Rn, tn = cams.R, cams.t
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(cams), 1, 1)
    w2c[:, :3, :3] = Rn @ R
    w2c[:, :3, 3] = Rn @ t + tn / S
    return Cameras(w2c, cams.K, cams.image_hw)


def true_views(truth: SubjectTruth, cams: Cameras, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """What the generator's camera would have photographed at each of ``cams`` (the clip's
    world): ``rgb (N, H, W, 3)`` uint8 and the subject's mask ``(N, H, W)`` bool.

    Rendered at ``supersample`` times the size and area-averaged (the mask: the majority of its
    sub-pixels), as a camera integrates over a pixel: the ray caster samples one point per pixel,
    and a point-sampled texture is aliased where the frames it is compared with (resized from the
    dataset's larger images) are not.
    """
    from mvcustom.data.generator.scene import render
    from mvcustom.data.generator.subjects import make_scene

    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    data = _load_sidecar(truth)
    seed = int(data["scene_seed"])
    scene = make_scene(str(data["category"]), seed, seed)
    H, W = (int(v) for v in cams.image_hw[0])
    if (cams.image_hw != cams.image_hw[0]).any():
        raise ValueError(
            f"true_views renders one image size; the cameras have {cams.image_hw.unique(dim=0).tolist()}"
        )
    big = canonical_cameras(truth, cams, data).resize(H * supersample, W * supersample)
    rend = render(scene, big)
    k = supersample
    rgb = rend.rgb.double().reshape(len(cams), H, k, W, k, 3).mean((2, 4))
    fg = rend.foreground.double().reshape(len(cams), H, k, W, k).mean((2, 4))
    return rgb.round().clamp(0, 255).to(torch.uint8).numpy(), (fg > 0.5).numpy()
