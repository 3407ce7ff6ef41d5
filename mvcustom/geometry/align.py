"""Trajectory alignment and pose errors.

* :func:`umeyama`: least-squares similarity ``dst ≈ s R src + t`` (Umeyama 1991, "Least-squares
  estimation of transformation parameters between two point patterns", eqs. 34-43).
* :func:`relative_pose_errors`: the scale-free errors camera-control papers report (CameraCtrl's
  RotErr/TransErr family): for every pair of frames, the angle between predicted and true
  relative rotations, and between the directions of the relative translations.
* :func:`align_cameras`: express predicted cameras (e.g. an SfM reconstruction, arbitrary gauge)
  in the frame of the reference cameras by aligning camera centres.
"""

from __future__ import annotations

import torch

from mvcustom.geometry.camera import Cameras

Tensor = torch.Tensor


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Similarity ``(s, R, t)`` minimising ``sum ||dst_i - (s R src_i + t)||^2``.

    Args:
        src, dst: ``(P, 3)`` corresponding points, ``P >= 3`` and not all collinear.
        with_scale: estimate ``s`` (else ``s = 1``, a rigid fit).
    Returns:
        scalar ``s``, ``(3, 3)`` rotation ``R`` (det +1), ``(3,)`` translation ``t``.
    """
    src = torch.as_tensor(src, dtype=torch.float64)
    dst = torch.as_tensor(dst, dtype=torch.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(
            f"umeyama needs two (P, 3) arrays of equal shape, got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    if src.shape[0] < 3:
        raise ValueError(f"umeyama needs at least 3 points, got {src.shape[0]}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / src.shape[0]
    cov = xd.T @ xs / src.shape[0]
    U, D, Vt = torch.linalg.svd(cov)
    S = torch.eye(3, dtype=torch.float64)
    if torch.det(U) * torch.det(Vt) < 0:
        S[2, 2] = -1
    if D[1] < 1e-12 * max(float(D[0]), 1e-300):
        raise ValueError("umeyama: points are (nearly) collinear; the rotation is not determined")
    R = U @ S @ Vt
    s = (D * S.diagonal()).sum() / var_s if with_scale else torch.tensor(1.0, dtype=torch.float64)
    t = mu_d - s * R @ mu_s
    return s, R, t


def rotation_angle_deg(R: Tensor) -> Tensor:
    """Geodesic angle (degrees) of rotations ``(..., 3, 3)``.

    ``atan2(sin, cos)`` rather than ``arccos((tr - 1) / 2)``: the latter loses half the digits near
    zero (``acos(1 - e) ~ sqrt(2 e)``), exactly where pose errors live.
    """
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    skew = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
    )
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, (tr - 1) / 2))


def _pairs(n: int) -> tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


def relative_pose_errors(pred: Cameras, true: Cameras) -> dict[str, Tensor]:
    """Per-pair relative rotation / translation-direction errors (degrees), gauge-free.

    For frames ``i < j``: ``R_ij = R_j R_i^T`` and ``t_ij = t_j - R_ij t_i`` (camera ``i`` to ``j``);
    the rotation error is the angle of ``R_ij^pred (R_ij^true)^T``, the translation error the angle
    between ``t_ij^pred`` and ``t_ij^true`` (undefined, NaN, where the true baseline is ~0).
    Returns ``{"rotation_deg": (P,), "translation_deg": (P,)}`` over the ``P = N(N-1)/2`` pairs.
    """
    if len(pred) != len(true):
        raise ValueError(f"pred has {len(pred)} cameras but true has {len(true)}")
    i, j = _pairs(len(pred))
    out = {}
    rel = {}
    for name, cams in (("pred", pred), ("true", true)):
        R, t = cams.R.to(torch.float64), cams.t.to(torch.float64)
        Rij = R[j] @ R[i].transpose(1, 2)
        tij = t[j] - (Rij @ t[i].unsqueeze(-1)).squeeze(-1)
        rel[name] = (Rij, tij)
    out["rotation_deg"] = rotation_angle_deg(rel["pred"][0] @ rel["true"][0].transpose(1, 2))
    tp, tt = rel["pred"][1], rel["true"][1]
    ang = torch.rad2deg(torch.atan2(torch.linalg.cross(tp, tt, dim=-1).norm(dim=-1), (tp * tt).sum(-1)))
    ang[tt.norm(dim=-1) < 1e-9] = float("nan")
    out["translation_deg"] = ang
    return out


def align_cameras(pred: Cameras, true: Cameras) -> tuple[Cameras, dict[str, Tensor]]:
    """Similarity-align ``pred`` to ``true`` through camera centres (Umeyama).

    Returns the aligned cameras and ``{"scale", "R", "t", "center_error"}``, ``center_error``
    ``(N,)`` being each aligned centre's distance to the true one (absolute trajectory error).
    """
    s, R, t = umeyama(pred.centers, true.centers)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = t / s  # X_new = s (R X + t/s) = s R X + t
    aligned = pred.to(dtype=torch.float64).transform_world(T, s)
    err = (aligned.centers - true.centers.to(torch.float64)).norm(dim=-1)
    return aligned, {"scale": s, "R": R, "t": t, "center_error": err}
