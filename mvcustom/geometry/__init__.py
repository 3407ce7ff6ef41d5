"""Camera geometry: the camera type, dataset conventions, rays, trajectories, alignment."""

from mvcustom.geometry.align import align_cameras, relative_pose_errors, rotation_angle_deg, umeyama
from mvcustom.geometry.camera import Cameras, center_crop_box, intrinsics_matrix, look_at, rigid_inverse
from mvcustom.geometry.conventions import (
    cameras_from_co3d_viewpoints,
    cameras_from_pycolmap,
    cameras_from_pytorch3d,
    cameras_to_pytorch3d,
    format_realestate10k,
    parse_realestate10k,
)
from mvcustom.geometry.plucker import plucker_embedding
from mvcustom.geometry.trajectories import make_trajectory

__all__ = [
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
