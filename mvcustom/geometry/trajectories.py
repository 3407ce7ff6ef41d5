"""Camera trajectory generators for evaluation and for the synthetic data generator.

Every generator returns :class:`Cameras` (OpenCV, world-to-camera) that look at ``target``; the
world's up direction is ``up`` (default +z). Angles are in degrees. The shapes are the usual ones
of camera-control evaluation (CameraCtrl, MotionCtrl, the paper's rotation-aware and translation
trajectories, PAPER.md §6):

* ``orbit``: full or partial circle around the target at fixed elevation;
* ``arc``: an orbit segment (alias with a span argument);
* ``forward``: dolly towards the target (translation only; ``zoom`` changes focal instead);
* ``lateral``: truck sideways along the camera's x axis with a fixed orientation (the paper's
  x-translation trajectory, Fig. 5a);
* ``spiral``: orbit whose elevation and radius oscillate (LLFF-style spiral path).
"""

from __future__ import annotations

import math

import torch

from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at, look_at_point


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


def lateral(
    num_frames: int,
    span: float = 1.0,
    radius: float = 3.0,
    azimuth_deg: float = 0.0,
    elevation_deg: float = 10.0,
    target=(0.0, 0.0, 0.0),
    up=(0.0, 0.0, 1.0),
    image_hw: tuple[int, int] = (256, 256),
    fov_deg: float = 50.0,
) -> Cameras:
    """Translate along the camera's x axis (image right) over ``span`` world units, centred on
    the view from ``azimuth_deg``/``elevation_deg`` at ``radius``, which looks at ``target``; the
    orientation never changes (translation only, no panning to follow the target)."""
    middle = forward(1, radius, radius, azimuth_deg, elevation_deg, target, up, image_hw, fov_deg)
    R = middle.R[0]
    right = R[0]  # the camera's x axis in world coordinates (first row of R)
    s = torch.linspace(-span / 2, span / 2, num_frames, dtype=torch.float64)
    centers = middle.centers[0] + s.unsqueeze(-1) * right
    w2c = torch.eye(4, dtype=torch.float64).repeat(num_frames, 1, 1)
    w2c[:, :3, :3] = R
    w2c[:, :3, 3] = -centers @ R.T
    return Cameras(w2c, default_intrinsics(num_frames, image_hw, fov_deg), image_hw)


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


TRAJECTORIES = {
    "orbit": orbit,
    "arc": arc,
    "forward": forward,
    "zoom": zoom,
    "lateral": lateral,
    "spiral": spiral,
}


def make_trajectory(kind: str, num_frames: int, **kwargs) -> Cameras:
    """Build a trajectory by name (``orbit``, ``arc``, ``forward``, ``zoom``, ``lateral``, ``spiral``)."""
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {sorted(TRAJECTORIES)}")
    return TRAJECTORIES[kind](num_frames, **kwargs)


def subject_frame(refs: Cameras) -> dict:
    """Where a subject's reference cameras look: ``target`` (least-squares intersection of their
    optical axes), ``up``, ``radius`` (mean camera-to-target distance), and the first camera's
    ``azimuth_deg``/``elevation_deg`` in the basis the trajectory generators use.

    ``up`` is the normal of the plane through the camera centres (captures circle the subject at
    a roughly constant height, as CO3D's do), oriented like the cameras' image-up (OpenCV -y);
    with fewer than three centres, or centres on a line, it is the mean image-up itself. Needs
    views from at least two directions."""
    if len(refs) < 2:
        raise ValueError(f"subject_frame needs at least 2 reference cameras, got {len(refs)}")
    refs = refs.to(dtype=torch.float64)
    C = refs.centers
    target = look_at_point(refs)
    image_up = -refs.R[:, 1, :].mean(0)
    up = image_up / image_up.norm()
    if len(refs) >= 3:
        _, sv, vh = torch.linalg.svd(C - C.mean(0))
        if sv[1] > 1e-3 * sv[0]:  # the centres span a plane
            normal = vh[2]
            up = normal if float(normal @ image_up) >= 0 else -normal
    offsets = C - target
    radius = float(offsets.norm(dim=-1).mean())
    e1, e2, e3 = _basis(up)
    o = offsets[0] / offsets[0].norm()
    return {
        "target": tuple(target.tolist()),
        "up": tuple(up.tolist()),
        "radius": radius,
        "azimuth_deg": math.degrees(math.atan2(float(o @ e2), float(o @ e1))),
        "elevation_deg": math.degrees(math.asin(max(-1.0, min(1.0, float(o @ e3))))),
    }


def trajectory_parameters(kind: str) -> set[str]:
    """The arguments the generator ``kind`` takes (``arc`` also takes the orbit's)."""
    import inspect

    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {sorted(TRAJECTORIES)}")
    accepted = set(inspect.signature(TRAJECTORIES[kind]).parameters)
    if kind == "arc":  # an orbit with a span: it passes the orbit's arguments through
        accepted = (accepted | set(inspect.signature(orbit).parameters)) - {"kwargs"}
    return accepted - {"num_frames"}


def check_trajectory(kind: str, params: dict) -> None:
    """Refuse an unknown trajectory kind or a parameter its generator does not take, naming the
    choices (before anything is generated)."""
    accepted = trajectory_parameters(kind)
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(
            f"trajectory {kind!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(accepted)}"
        )


def place_trajectory(
    kind: str,
    num_frames: int,
    refs: Cameras,
    image_hw: tuple[int, int],
    fov_deg: float | None = None,
    **kwargs,
) -> Cameras:
    """A trajectory ``kind`` placed around a subject seen by ``refs`` (:func:`subject_frame`):
    it starts at the first reference view's direction, distance and elevation, looks at the
    subject and keeps its up. ``fov_deg`` defaults to the first reference's horizontal field of
    view. ``kwargs`` override any generator argument (e.g. ``span_deg``, ``end_radius``)."""
    check_trajectory(kind, kwargs)
    frame = subject_frame(refs)
    if fov_deg is None:
        W = float(refs.image_hw[0, 1])
        fov_deg = math.degrees(2 * math.atan(0.5 * W / float(refs.K[0, 0, 0])))
    derived = {
        "target": frame["target"],
        "up": frame["up"],
        "radius": frame["radius"],
        "start_radius": frame["radius"],
        "end_radius": 0.7 * frame["radius"],
        "span": 0.5 * frame["radius"],  # lateral: a quarter of the distance either side
        "elevation_deg": frame["elevation_deg"],
        "start_azimuth_deg": frame["azimuth_deg"],
        "azimuth_deg": frame["azimuth_deg"],
        "image_hw": tuple(image_hw),
        "fov_deg": fov_deg,
        "start_fov_deg": fov_deg,
    }
    accepted = trajectory_parameters(kind)
    args = {k: v for k, v in derived.items() if k in accepted}
    args.update(kwargs)
    return TRAJECTORIES[kind](num_frames, **args)
