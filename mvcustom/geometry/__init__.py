"""Camera geometry: the camera type, dataset conventions, rays, trajectories, alignment.

The names below load on first use (PEP 562): most of this package is torch, and the
decode-only preprocessing path imports ``mvcustom.geometry.crop`` without paying for torch
(0.8 s per process on one core, in the driver and in every Ray worker).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "align": ["align_cameras", "relative_pose_errors", "rotation_angle_deg", "umeyama"],
    "camera": ["Cameras", "intrinsics_matrix", "look_at", "rigid_inverse"],
    "crop": ["center_crop_box"],
    "conventions": [
        "cameras_from_co3d_viewpoints",
        "cameras_from_pycolmap",
        "cameras_from_pytorch3d",
        "cameras_to_pytorch3d",
        "format_realestate10k",
        "parse_realestate10k",
    ],
    "plucker": ["plucker_embedding"],
    "trajectories": ["make_trajectory"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [  # spelled out for linters and type checkers; a test checks it against _EXPORTS
    "Cameras",
    "align_cameras",
    "cameras_from_co3d_viewpoints",
    "cameras_from_pycolmap",
    "cameras_from_pytorch3d",
    "cameras_to_pytorch3d",
    "center_crop_box",
    "format_realestate10k",
    "intrinsics_matrix",
    "look_at",
    "make_trajectory",
    "parse_realestate10k",
    "plucker_embedding",
    "relative_pose_errors",
    "rigid_inverse",
    "rotation_angle_deg",
    "umeyama",
]

if TYPE_CHECKING:
    from mvcustom.geometry.align import align_cameras, relative_pose_errors, rotation_angle_deg, umeyama
    from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at, rigid_inverse
    from mvcustom.geometry.conventions import (
        cameras_from_co3d_viewpoints,
        cameras_from_pycolmap,
        cameras_from_pytorch3d,
        cameras_to_pytorch3d,
        format_realestate10k,
        parse_realestate10k,
    )
    from mvcustom.geometry.crop import center_crop_box
    from mvcustom.geometry.plucker import plucker_embedding
    from mvcustom.geometry.trajectories import make_trajectory


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mvcustom.geometry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mvcustom.geometry.{module}"), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
