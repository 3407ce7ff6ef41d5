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
__all__ = sorted(_MODULE_OF)  # the TYPE_CHECKING imports name the same; a test checks it

if TYPE_CHECKING:  # the lazy names, for type checkers (re-exported: __all__ comes from _EXPORTS)
    from mvcustom.geometry.align import align_cameras, relative_pose_errors, rotation_angle_deg, umeyama  # noqa: F401
    from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at, rigid_inverse  # noqa: F401
    from mvcustom.geometry.conventions import (  # noqa: F401
        cameras_from_co3d_viewpoints,
        cameras_from_pycolmap,
        cameras_from_pytorch3d,
        cameras_to_pytorch3d,
        format_realestate10k,
        parse_realestate10k,
    )
    from mvcustom.geometry.crop import center_crop_box  # noqa: F401
    from mvcustom.geometry.plucker import plucker_embedding  # noqa: F401
    from mvcustom.geometry.trajectories import make_trajectory  # noqa: F401


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mvcustom.geometry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mvcustom.geometry.{module}"), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
