"""Plücker ray embeddings (CameraCtrl, DESIGN.md §4): per pixel ``(o x d, d)``.

``o`` is the camera centre and ``d`` the unit world-space direction of the ray through the pixel
centre, so the 6-vector identifies the ray (as a line) independently of where along it ``o`` is.
"""

from __future__ import annotations

import torch

from mvcustom.geometry.camera import Cameras


def plucker_embedding(cams: Cameras, stride: int = 1) -> torch.Tensor:
    """Per-pixel Plücker coordinates.

    Args:
        cams: ``N`` cameras sharing one image size ``H x W``.
        stride: sample the centres of ``stride x stride`` cells (an embedding for features at
            ``1/stride`` resolution).
    Returns:
        ``(N, 6, H // stride, W // stride)``: channels ``(o x d)`` then ``d``.
    """
    grid = cams.pixel_grid(stride)  # (h, w, 2)
    h, w = grid.shape[:2]
    origins, dirs = cams.rays(grid.reshape(-1, 2))
    moment = torch.linalg.cross(origins, dirs, dim=-1)
    emb = torch.cat([moment, dirs], -1)  # (N, h*w, 6)
    return emb.transpose(1, 2).reshape(len(cams), 6, h, w)
