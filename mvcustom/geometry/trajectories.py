"""Camera trajectory generators for evaluation and for the synthetic data generator.

Every generator returns :class:`Cameras` (OpenCV, world-to-camera) that look at ``target``; the
world's up direction is ``up`` (default +z). Angles are in degrees. The shapes are the usual ones
of camera-control evaluation (CameraCtrl, MotionCtrl, the paper's rotation-aware and translation
trajectories, PAPER.md §6):

* ``orbit``: full or partial circle around the target at fixed elevation;
* ``arc``: an orbit segment (alias with a span argument);
* ``forward``: dolly towards the target (translation only; ``zoom`` changes focal instead);
* ``spiral``: orbit whose elevation and radius oscillate (LLFF-style spiral path).
"""

from __future__ import annotations

import math

import torch

from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at


def _basis(up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    up = up / up.norm()
    a = torch.tensor([1.0, 0.0, 0.0], dtype=up.dtype)
    if abs(float(up @ a)) > 0.9:
        a = torch.tensor([0.0, 1.0, 0.0], dtype=up.dtype)
    e1 = a - (a @ up) * up
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(up, e1)
    return e1, e2, up


def default_intrinsics(num: int, image_hw: tuple[int, int], fov_deg: float = 50.0) -> torch.Tensor:
    """``(num, 3, 3)`` pinhole intrinsics with horizontal field of view ``fov_deg``, centred."""
    H, W = image_hw
    f = 0.5 * W / math.tan(math.radians(fov_deg) / 2)
    return intrinsics_matrix(f, f, W / 2, H / 2).expand(num, 3, 3).clone()


def _cams_on_sphere(
    azimuth_deg: torch.Tensor,
    elevation_deg: torch.Tensor,
    radius: torch.Tensor,
    target,
    up,
    image_hw,
    fov_deg,
) -> Cameras:
    target = torch.as_tensor(target, dtype=torch.float64)
    up = torch.as_tensor(up, dtype=torch.float64)
    e1, e2, e3 = _basis(up)
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    dirs = (
        (torch.cos(el) * torch.cos(az)).unsqueeze(-1) * e1
        + (torch.cos(el) * torch.sin(az)).unsqueeze(-1) * e2
        + torch.sin(el).unsqueeze(-1) * e3
    )
    eye = target + radius.unsqueeze(-1) * dirs
    w2c = look_at(eye, target.expand_as(eye), up)
    return Cameras(w2c, default_intrinsics(len(eye), image_hw, fov_deg), image_hw)


def orbit(
    num_frames: int,
    radius: float = 3.0,
    elevation_deg: float = 20.0,
    start_azimuth_deg: float = 0.0,
    span_deg: float = 360.0,
    target=(0.0, 0.0, 0.0),
    up=(0.0, 0.0, 1.0),
    image_hw: tuple[int, int] = (256, 256),
    fov_deg: float = 50.0,
) -> Cameras:
    """Cameras on a circle around ``target``. A full 360° orbit does not repeat its first view."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    full = abs(span_deg) >= 360.0
    steps = num_frames if full else max(num_frames - 1, 1)
    az = start_azimuth_deg + span_deg * torch.arange(num_frames, dtype=torch.float64) / steps
    el = torch.full_like(az, float(elevation_deg))
    r = torch.full_like(az, float(radius))
    return _cams_on_sphere(az, el, r, target, up, image_hw, fov_deg)


def arc(num_frames: int, span_deg: float = 60.0, **kwargs) -> Cameras:
    """An orbit segment of ``span_deg`` degrees (the "rotation-aware" evaluation trajectory)."""
    return orbit(num_frames, span_deg=span_deg, **kwargs)


def forward(
    num_frames: int,
    start_radius: float = 3.0,
    end_radius: float = 2.0,
    azimuth_deg: float = 0.0,
    elevation_deg: float = 10.0,
    target=(0.0, 0.0, 0.0),
    up=(0.0, 0.0, 1.0),
    image_hw: tuple[int, int] = (256, 256),
    fov_deg: float = 50.0,
) -> Cameras:
    """Dolly along the viewing axis from ``start_radius`` to ``end_radius`` (translation only)."""
    r = torch.linspace(start_radius, end_radius, num_frames, dtype=torch.float64)
    az = torch.full_like(r, float(azimuth_deg))
    el = torch.full_like(r, float(elevation_deg))
    return _cams_on_sphere(az, el, r, target, up, image_hw, fov_deg)


def zoom(
    num_frames: int,
    start_fov_deg: float = 50.0,
    end_fov_deg: float = 30.0,
    radius: float = 3.0,
    azimuth_deg: float = 0.0,
    elevation_deg: float = 10.0,
    target=(0.0, 0.0, 0.0),
    up=(0.0, 0.0, 1.0),
    image_hw: tuple[int, int] = (256, 256),
) -> Cameras:
    """A fixed camera whose field of view changes (intrinsics-only motion)."""
    fovs = torch.linspace(start_fov_deg, end_fov_deg, num_frames, dtype=torch.float64)
    cams = forward(num_frames, radius, radius, azimuth_deg, elevation_deg, target, up, image_hw)
    H, W = image_hw
    f = 0.5 * W / torch.tan(torch.deg2rad(fovs) / 2)
    return Cameras(cams.w2c, intrinsics_matrix(f, f, W / 2, H / 2), image_hw)


def spiral(
    num_frames: int,
    radius: float = 3.0,
    radius_amplitude: float = 0.3,
    elevation_deg: float = 20.0,
    elevation_amplitude_deg: float = 10.0,
    turns: float = 1.0,
    wobbles: float = 2.0,
    target=(0.0, 0.0, 0.0),
    up=(0.0, 0.0, 1.0),
    image_hw: tuple[int, int] = (256, 256),
    fov_deg: float = 50.0,
) -> Cameras:
    """Orbit ``turns`` times while radius and elevation oscillate ``wobbles`` times."""
    s = torch.arange(num_frames, dtype=torch.float64) / max(num_frames, 1)
    az = 360.0 * turns * s
    el = elevation_deg + elevation_amplitude_deg * torch.sin(2 * math.pi * wobbles * s)
    r = radius + radius_amplitude * torch.cos(2 * math.pi * wobbles * s)
    return _cams_on_sphere(az, el, r, target, up, image_hw, fov_deg)


TRAJECTORIES = {"orbit": orbit, "arc": arc, "forward": forward, "zoom": zoom, "spiral": spiral}


def make_trajectory(kind: str, num_frames: int, **kwargs) -> Cameras:
    """Build a trajectory by name (``orbit``, ``arc``, ``forward``, ``zoom``, ``spiral``)."""
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {sorted(TRAJECTORIES)}")
    return TRAJECTORIES[kind](num_frames, **kwargs)
