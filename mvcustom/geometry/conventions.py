"""Conversions between the cameras of datasets / tools and :class:`~mvcustom.geometry.Cameras`.

* **CO3Dv2 / PyTorch3D** (co3d ``dataset/data_types.py``, ``ViewpointAnnotation``): rotations
  are *right-multiplied*, ``X_cam = X_world @ R + T``; camera axes +X left, +Y up, +Z forward;
  ``focal_length`` and ``principal_point`` live in NDC, in one of two formats:

  - ``ndc_norm_image_bounds`` (CO3Dv1 / legacy): the image spans ``[-1, 1]`` along *both* axes,
    so x and y are scaled by ``W/2`` and ``H/2`` respectively;
  - ``ndc_isotropic`` (CO3Dv2, PyTorch3D >= 0.5): the *shorter* side spans ``[-1, 1]``; both axes
    are scaled by ``min(H, W)/2``.

  Pixels follow from ``p_px = (W/2, H/2) - p_ndc * scale`` and ``f_px = f_ndc * scale`` (the NDC
  axes point left/up, pixels right/down). This is the arithmetic of PyTorch3D's
  ``opencv_from_cameras_projection`` and of implicitron's ``_get_pytorch3d_camera``; with both,
  the image spans ``[0, W] x [0, H]`` (corner-origin pixels, our convention).
* **COLMAP / pycolmap** (``Image.cam_from_world()``, ``Camera.calibration_matrix()``): already
  OpenCV axes, world-to-camera, corner-origin pixels; only pinhole-type models are accepted.
* **RealEstate10K** pose lines (as CameraCtrl / pixelSplat read them):
  ``timestamp fx fy cx cy k1 k2 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2``, intrinsics
  normalised by image width (fx, cx) and height (fy, cy), the 3x4 matrix world-to-camera in
  OpenCV axes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at_point

Tensor = torch.Tensor

NDC_FORMATS = ("ndc_norm_image_bounds", "ndc_isotropic")

# PyTorch3D camera axes (+X left, +Y up) -> OpenCV axes (+x right, +y down): flip x and y.
_FLIP_XY = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))


def _ndc_scale(image_hw: Tensor, intrinsics_format: str) -> Tensor:
    """``(N, 2)`` pixels per NDC unit along (x, y)."""
    hw = image_hw.to(torch.float64)
    half_wh = hw.flip(-1) / 2.0
    if intrinsics_format == "ndc_norm_image_bounds":
        return half_wh
    if intrinsics_format == "ndc_isotropic":
        return half_wh.min(dim=-1, keepdim=True).values.expand_as(half_wh)
    raise ValueError(f"unknown intrinsics_format {intrinsics_format!r}; expected one of {NDC_FORMATS}")


def cameras_from_pytorch3d(
    R: Tensor,
    T: Tensor,
    focal_length: Tensor,
    principal_point: Tensor,
    image_hw: Tensor,
    intrinsics_format: str = "ndc_isotropic",
) -> Cameras:
    """OpenCV cameras from PyTorch3D / CO3D cameras.

    Args:
        R: ``(N, 3, 3)`` right-multiplied rotation (``X_cam = X_world @ R + T``).
        T: ``(N, 3)`` translation.
        focal_length: ``(N, 2)`` NDC focal lengths (fx, fy).
        principal_point: ``(N, 2)`` NDC principal points (px, py).
        image_hw: ``(N, 2)`` or ``(2,)`` size (height, width) of the images the NDC refers to.
        intrinsics_format: ``ndc_isotropic`` or ``ndc_norm_image_bounds``.
    """
    R = torch.as_tensor(R, dtype=torch.float64).reshape(-1, 3, 3)
    T = torch.as_tensor(T, dtype=torch.float64).reshape(-1, 3)
    f = torch.as_tensor(focal_length, dtype=torch.float64).reshape(-1, 2)
    p = torch.as_tensor(principal_point, dtype=torch.float64).reshape(-1, 2)
    hw = torch.as_tensor(image_hw, dtype=torch.int64)
    if hw.ndim == 1:
        hw = hw.expand(R.shape[0], 2)
    scale = _ndc_scale(hw, intrinsics_format)
    f_px = f * scale
    p_px = hw.flip(-1).to(torch.float64) / 2.0 - p * scale
    R_cv = _FLIP_XY @ R.transpose(1, 2)
    t_cv = T @ _FLIP_XY
    K = intrinsics_matrix(f_px[:, 0], f_px[:, 1], p_px[:, 0], p_px[:, 1])
    return Cameras.from_Rt(R_cv, t_cv, K, hw)


def cameras_to_pytorch3d(
    cams: Cameras, intrinsics_format: str = "ndc_isotropic"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of :func:`cameras_from_pytorch3d`: ``(R, T, focal_length, principal_point)``.

    Skew in ``K`` cannot be represented in PyTorch3D's NDC and is rejected.
    """
    K = cams.K.to(torch.float64)
    if K[:, 0, 1].abs().max() > 1e-9:
        raise ValueError("cameras with skew cannot be written as PyTorch3D NDC cameras")
    scale = _ndc_scale(cams.image_hw, intrinsics_format)
    f_px = torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)
    p_px = torch.stack([K[:, 0, 2], K[:, 1, 2]], -1)
    focal = f_px / scale
    pp = (cams.image_hw.flip(-1).to(torch.float64) / 2.0 - p_px) / scale
    R_cv = cams.R.to(torch.float64)
    t_cv = cams.t.to(torch.float64)
    R = (_FLIP_XY @ R_cv).transpose(1, 2)
    T = t_cv @ _FLIP_XY
    return R, T, focal, pp


def cameras_from_co3d_viewpoints(viewpoints: Sequence[dict], image_hw: Tensor) -> Cameras:
    """OpenCV cameras from CO3D ``viewpoint`` dicts (keys ``R``, ``T``, ``focal_length``,
    ``principal_point``, ``intrinsics_format``) of images of size ``image_hw`` ``(N, 2)``."""
    if len(viewpoints) == 0:
        raise ValueError("no CO3D viewpoints given")
    formats = {vp.get("intrinsics_format", "ndc_norm_image_bounds") for vp in viewpoints}
    hw = torch.as_tensor(image_hw, dtype=torch.int64).reshape(-1, 2)
    if len(formats) > 1:  # rare, but legal per frame: convert each group on its own
        return Cameras.cat(
            [
                cameras_from_co3d_viewpoints([vp], hw[i if len(hw) > 1 else 0])
                for i, vp in enumerate(viewpoints)
            ]
        )
    (fmt,) = formats
    return cameras_from_pytorch3d(
        torch.tensor([vp["R"] for vp in viewpoints]),
        torch.tensor([vp["T"] for vp in viewpoints]),
        torch.tensor([vp["focal_length"] for vp in viewpoints]),
        torch.tensor([vp["principal_point"] for vp in viewpoints]),
        hw if len(hw) > 1 else hw[0],
        fmt,
    )


_PINHOLE_MODELS = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"}


def cameras_from_pycolmap(
    reconstruction, image_names: Iterable[str] | None = None
) -> tuple[Cameras, list[str]]:
    """OpenCV cameras of the registered images of a ``pycolmap.Reconstruction``.

    Args:
        reconstruction: a ``pycolmap.Reconstruction``.
        image_names: the order wanted; names that are not registered are skipped. Default: all
            registered images sorted by name.
    Returns:
        ``(cameras, names)``: the cameras and the image names they belong to, in order.

    Lens distortion parameters (radial models) are not applied: callers that need undistorted
    geometry must undistort the images (COLMAP's ``undistort_images``) first.
    """
    by_name = {}
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.images[image_id]
        by_name[image.name] = image
    names = sorted(by_name) if image_names is None else [n for n in image_names if n in by_name]
    if not names:
        raise ValueError("the reconstruction has no registered images to convert")
    Ks, w2cs, hws = [], [], []
    for name in names:
        image = by_name[name]
        cam = reconstruction.cameras[image.camera_id]
        model = cam.model.name if hasattr(cam.model, "name") else str(cam.model)
        if model not in _PINHOLE_MODELS:
            raise ValueError(f"camera model {model} of image {name} is not a pinhole-type model")
        pose = image.cam_from_world()
        pose = pose() if callable(pose) else pose
        m = torch.as_tensor(pose.matrix(), dtype=torch.float64)
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :4] = m
        w2cs.append(w2c)
        Ks.append(torch.as_tensor(cam.calibration_matrix(), dtype=torch.float64))
        hws.append([cam.height, cam.width])
    return Cameras(torch.stack(w2cs), torch.stack(Ks), torch.tensor(hws)), names


def parse_realestate10k(
    lines: Iterable[str], image_hw: tuple[int, int], source: str = "<lines>"
) -> tuple[Tensor, Cameras]:
    """Parse a RealEstate10K camera file's pose lines.

    Args:
        lines: the file's lines; a first line that is a URL (the file's header) is skipped.
        image_hw: ``(height, width)`` of the frames the cameras should describe (the normalised
            intrinsics are scaled to it).
        source: a name for error messages (the file path).
    Returns:
        ``(timestamps (N,) int64 microseconds, cameras)``.
    """
    H, W = int(image_hw[0]), int(image_hw[1])
    stamps, Ks, w2cs = [], [], []
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or (lineno == 1 and ("://" in line or not line[0].isdigit())):
            continue
        fields = line.split()
        if len(fields) != 19:
            raise ValueError(
                f"{source}:{lineno}: expected 19 numbers (timestamp fx fy cx cy k1 k2 + 3x4 w2c), got {len(fields)}"
            )
        try:
            stamp = int(fields[0])
            vals = [float(x) for x in fields[1:]]
        except ValueError as e:
            raise ValueError(f"{source}:{lineno}: not a number: {e}") from None
        fx, fy, cx, cy = vals[0:4]
        Ks.append(intrinsics_matrix(fx * W, fy * H, cx * W, cy * H)[0])
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :4] = torch.tensor(vals[6:18], dtype=torch.float64).reshape(3, 4)
        w2cs.append(w2c)
        stamps.append(stamp)
    if not stamps:
        raise ValueError(f"{source}: no pose lines found")
    return torch.tensor(stamps), Cameras(torch.stack(w2cs), torch.stack(Ks), (H, W))


def format_realestate10k(timestamps: Sequence[int], cams: Cameras, url: str) -> list[str]:
    """Write cameras as RealEstate10K lines (inverse of :func:`parse_realestate10k`)."""
    lines = [url]
    for i, ts in enumerate(timestamps):
        H, W = (int(v) for v in cams.image_hw[i])
        K = cams.K[i]
        vals = [K[0, 0] / W, K[1, 1] / H, K[0, 2] / W, K[1, 2] / H, 0.0, 0.0]
        vals += cams.w2c[i, :3, :4].reshape(-1).tolist()
        lines.append(" ".join([str(int(ts))] + [repr(float(v)) for v in vals]))
    return lines


def normalize_scene(cams: Cameras) -> tuple[Cameras, float]:
    """The shards' scene normalisation (DESIGN.md §3), for sources whose world frame and scale are
    arbitrary (CO3D's COLMAP frames, SfM of photos). The clip is re-expressed so that

    * the world frame is the camera frame of the clip's first view (its extrinsics are identity),
      and
    * the scale makes the mean distance from the camera centres to the clip's *look-at point*
      equal to 1, the look-at point being the least-squares intersection of the views' optical
      axes (for an object-centric capture: the subject).

    Returns the normalised cameras and the scale factor (multiply depths by it, so depth and
    poses stay consistent).
    """
    p = look_at_point(cams)
    scale = 1.0 / float((cams.centers.to(torch.float64) - p).norm(dim=-1).mean())
    rel = cams.to(dtype=torch.float64).relative_to(0)
    w2c = rel.w2c.clone()
    w2c[:, :3, 3] *= scale
    return Cameras(w2c, rel.K, rel.image_hw), scale
