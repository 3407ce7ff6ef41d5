"""Camera pose accuracy ("CPA", PAPER.md §6 / Table 2, higher is better).

The paper runs COLMAP on the generated views and compares the recovered cameras with the
requested ones; a failed reconstruction scores 0 (CustomDiffusion360: 0.000). The formula and
thresholds are NF (PAPER.md §6, §8 item 8), so this is ours:

1. SfM (:func:`mvcustom.geometry.sfm.run_sfm`) on the frames, with **exhaustive** matching: a
   generated clip is short (tens of frames) so the quadratic cost is small, and it does not assume
   that consecutive frames overlap most (a generator that jumps or reorders content is then
   judged by geometry, not by whether the sequential matcher happened to find the pairs). By
   default the requested intrinsics are given to COLMAP and kept fixed (the views were generated
   for those cameras; the paper does not say, NF); ``known_intrinsics=False`` estimates one
   shared focal instead.
2. **Relative poses of every frame pair** ``i < j`` are compared with the requested ones
   (:func:`mvcustom.geometry.align.relative_pose_errors`: angle of ``R_ij^rec (R_ij^req)^T`` and
   angle between the relative translation directions). Relative poses are gauge-free, so SfM's
   arbitrary world frame and scale need no alignment.
3. **Score** = fraction of all ``N (N - 1) / 2`` pairs whose rotation error *and* translation
   direction error are both below ``threshold_deg``. A pair with a frame the reconstruction did
   not register counts as a failure (no pose is interpolated for the metric). Where the requested
   baseline of a pair is ~0 (the same camera centre twice) the translation direction is undefined
   and the pair is judged on rotation alone. A reconstruction that fails scores 0.0, with
   ``failed=True`` and the reason.

**Trajectories from one camera centre** (``zoom``: only the focal changes; a pure pan): no
baseline, so SfM can triangulate nothing and would fail every such clip. These are scored from the
homography COLMAP's geometric verification estimates for each pair
(:func:`mvcustom.geometry.sfm.pairwise_homographies`): views from one centre satisfy
``H = K_j R_ij K_i^{-1}`` exactly, so with the requested intrinsics ``M = K_j^{-1} H K_i`` (scaled
to unit determinant) must be the requested relative rotation. A pair is correct when the
rotation nearest to ``M`` is within ``threshold_deg`` of the requested one *and* ``M`` is a
rotation to within ``zoom_tolerance`` (``sigma_max / sigma_min - 1`` of its singular values: a
clip zoomed by the wrong factor leaves ``M = diag(a, a, 1)``-like, ``a`` the focal ratio's error).
Pairs without a verified homography fail. ``PoseScore.method`` says which path scored a clip.

Relative poses of an orbit depend only on the index difference of a pair, so a reordering that
keeps index differences (a cyclic shift) goes largely unnoticed on a closed orbit; reorderings that
change them score near 0.

**COLMAP points** (``PoseScore.colmap_points``; the paper's appendix Table A3, "# of COLMAP
recon", higher is better): the number of 3D points COLMAP triangulates from the generated views
**with the requested cameras given**: the features and verified matches of step 1 (no second
extraction) are triangulated by COLMAP's point triangulator with the requested poses and
intrinsics (rescaled to the frame size) held fixed, bundle adjustment refining the points only.
A match becomes a point only if it is consistent with the requested cameras (its rays meet
within COLMAP's angle and reprojection thresholds, in front of both cameras, at a triangulation
angle of at least 1.5 degrees), so the figure counts the geometry that agrees with the requested
trajectory. It needs no successful free reconstruction (a clip SfM cannot initialise still gets
its count). It is not the point count of the free-pose reconstruction of step 1
(``PoseScore.num_points``), which does not look at the requested cameras at all: the same frames
give the same free-pose count whatever was requested. Trajectories from one camera centre have
no baseline, so no point reaches the minimum triangulation angle: their count is 0 by definition
and is not computed. Measured on 8 renders (144x192) of a 105-degree arc: 291 points with the
true cameras, 95 with a 60-degree arc requested (views that moved more than asked); the
free-pose count is 290 for both. The count does not see every error, so read it beside the pose
accuracy: cameras still consistent pair by pair with the matches (the orbit reversed: 283, or
permuted: 343; each pair's disparities then fit other depths) only split the long tracks into
short ones, and a request with more motion than the views show (a 150-degree arc: 307) lifts
more matches over the minimum angle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mvcustom.configs.preprocess import SfmConfig
from mvcustom.geometry.align import align_cameras, relative_pose_errors
from mvcustom.geometry.camera import Cameras


def default_sfm_config() -> SfmConfig:
    """SfM settings of the metric: exhaustive matching, every partial reconstruction kept.

    ``min_registered_fraction`` is tiny because the metric scores partial reconstructions itself
    (unregistered frames fail their pairs) instead of discarding them. Features are COLMAP's
    defaults (first octave -1, 8192 per frame), as the paper's "COLMAP on the generated views":
    the metric is an instrument, and generated frames are small (at octave 0 one of eight
    144x192 views went unregistered), so it does not take preprocessing's faster settings
    (nor its size cap: the views are measured at the size generated).
    """
    return SfmConfig(
        matcher="exhaustive",
        mapper="incremental",
        min_registered_fraction=1e-6,
        first_octave=-1,
        max_num_features=8192,
        max_image_size=None,
    )


@dataclass
class PoseScore:
    """Camera pose accuracy of one generated clip.

    Attributes:
        score: fraction of frame pairs within ``threshold_deg`` (0.0 when ``failed``).
        registered: frames the reconstruction registered. total: frames given.
        failed: the reconstruction failed (no model, or too few frames registered for ``cfg``).
        reason: why it failed (``None`` otherwise).
        pairs_correct: pairs within the threshold. pairs_total: ``N (N - 1) / 2``.
        rotation_error_deg, translation_error_deg: medians over the registered pairs (degrees;
            ``None`` when fewer than two frames are registered).
        registered_frames: positions of the registered frames in the input order.
        recovered: the registered frames' cameras, similarity-aligned to the requested ones
            (Umeyama on camera centres); ``None`` when failed or when fewer than 3 centres / a
            collinear path leave the alignment undetermined (the score does not need it).
        center_error: ``(R,)`` distance of each aligned centre to its requested one (world
            units of the requested cameras), with ``recovered``.
        threshold_deg: the threshold used.
        num_points: points of the free-pose reconstruction (step 1; a diagnostic that does not
            depend on the requested cameras).
        colmap_points: Table A3's "# of COLMAP recon": points COLMAP triangulates from the views
            with the requested cameras' poses and intrinsics held fixed (module docstring); 0
            for trajectories from one camera centre.
        method: ``sfm`` (reconstruction), or ``homography`` for trajectories from one camera
            centre (see the module docstring). zoom_error: with ``homography``, the median over
            the verified pairs of ``sigma_max / sigma_min - 1`` of ``K_j^{-1} H K_i``.
    """

    score: float
    registered: int
    total: int
    failed: bool
    reason: str | None = None
    pairs_correct: int = 0
    pairs_total: int = 0
    rotation_error_deg: float | None = None
    translation_error_deg: float | None = None
    registered_frames: list[int] = field(default_factory=list)
    recovered: Cameras | None = None
    center_error: torch.Tensor | None = None
    threshold_deg: float = 10.0
    num_points: int = 0
    colmap_points: int = 0
    method: str = "sfm"
    zoom_error: float | None = None


def _check_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array (N, H, W, 3) uint8, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"pose accuracy needs at least 2 frames, got {frames.shape[0]}")
    return np.ascontiguousarray(frames)


def pose_accuracy(
    frames: np.ndarray,
    requested: Cameras,
    cfg: SfmConfig | None = None,
    threshold_deg: float = 10.0,
    known_intrinsics: bool = True,
    workdir: str | None = None,
    zoom_tolerance: float = 0.05,
) -> PoseScore:
    """Camera pose accuracy of generated ``frames`` against the ``requested`` cameras.

    Args:
        frames: ``(N, H, W, 3)`` uint8 RGB generated views, in the order of ``requested``.
        requested: the ``N`` cameras the views were generated for (any world frame and scale).
        cfg: SfM settings (default :func:`default_sfm_config`).
        threshold_deg: a pair is correct when both its relative rotation error and its relative
            translation-direction error are below this (degrees).
        known_intrinsics: give COLMAP the requested intrinsics (rescaled to the frame size; all
            requested cameras must share one ``K``) and keep them fixed; else estimate a focal.
        workdir: parent folder of SfM's temporary workspace.
        zoom_tolerance: trajectories from one camera centre: how far ``K_j^{-1} H K_i`` may be
            from a rotation (module docstring).
    Returns:
        a :class:`PoseScore`.
    """
    frames = _check_frames(frames)
    n, H, W = frames.shape[:3]
    if not isinstance(requested, Cameras):
        raise ValueError(f"requested must be Cameras, got {type(requested).__name__}")
    if len(requested) != n:
        raise ValueError(f"requested has {len(requested)} cameras but frames has {n} views")
    if not threshold_deg > 0:
        raise ValueError(f"threshold_deg must be positive, got {threshold_deg}")
    requested = requested.to(dtype=torch.float64)
    C = requested.centers
    if float((C - C[0]).norm(dim=-1).max()) <= 1e-6 * max(1.0, float(C.norm(dim=-1).max())):
        # colmap_points stays 0: from one centre no point reaches a triangulation angle
        return _one_centre_accuracy(
            frames,
            requested.resize(H, W),
            cfg or default_sfm_config(),
            threshold_deg,
            zoom_tolerance,
            workdir,
        )
    K = None
    if known_intrinsics:
        scaled = requested.resize(H, W)  # K in pixels of the frames actually scored
        if not torch.allclose(scaled.K, scaled.K[:1].expand_as(scaled.K)):
            raise ValueError(
                "known_intrinsics=True needs one K shared by all requested cameras (zoom-like "
                "trajectory?); pass known_intrinsics=False to let SfM estimate the focal"
            )
        K = scaled.K[0]
    from mvcustom.geometry.sfm import run_sfm

    res = run_sfm(
        frames,
        cfg or default_sfm_config(),
        workdir=workdir,
        intrinsics=K,
        triangulate_with=requested.resize(H, W),
    )
    pairs_total = n * (n - 1) // 2
    out = PoseScore(
        score=0.0,
        registered=res.registered,
        total=n,
        failed=not res.ok,
        reason=res.reason,
        pairs_total=pairs_total,
        registered_frames=list(res.registered_frames),
        threshold_deg=float(threshold_deg),
        num_points=res.num_points,
        colmap_points=res.known_pose_points,
    )
    if not res.ok:
        return out
    reg = list(res.registered_frames)
    rec = res.cameras[reg]  # the reconstruction's own poses (interpolated frames are not used)
    req = requested[reg]
    if len(reg) >= 2:
        err = relative_pose_errors(rec, req)
        rot, trans = err["rotation_deg"], err["translation_deg"]
        # Undefined direction (zero requested baseline): judged on rotation alone.
        ok = (rot < threshold_deg) & (torch.isnan(trans) | (trans < threshold_deg))
        out.pairs_correct = int(ok.sum())
        out.score = out.pairs_correct / pairs_total
        out.rotation_error_deg = float(rot.median())
        finite = trans[~torch.isnan(trans)]
        out.translation_error_deg = float(finite.median()) if len(finite) else None
    if len(reg) >= 3:
        try:
            out.recovered, info = align_cameras(rec, req)
            out.center_error = info["center_error"]
        except ValueError:  # collinear centres (dolly / truck): the similarity is undetermined
            out.recovered = None
    return out


def _one_centre_accuracy(
    frames: np.ndarray,
    requested: Cameras,
    cfg: SfmConfig,
    threshold_deg: float,
    zoom_tolerance: float,
    workdir,
) -> PoseScore:
    """Pose accuracy of a trajectory whose cameras share one centre (module docstring)."""
    from mvcustom.geometry.align import rotation_angle_deg
    from mvcustom.geometry.sfm import pairwise_homographies

    n = len(requested)
    pairs_total = n * (n - 1) // 2
    K = requested.K.numpy()
    R = requested.R.numpy()
    homographies = pairwise_homographies(frames, cfg, workdir=workdir)
    rot_errors, zoom_errors, correct, seen = [], [], 0, set()
    for (i, j), H in sorted(homographies.items()):
        M = np.linalg.inv(K[j]) @ H @ K[i]
        M = M / np.cbrt(np.linalg.det(M))  # unit determinant (also fixes H's arbitrary sign)
        U, sv, Vt = np.linalg.svd(M)
        nearest = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
        requested_ij = R[j] @ R[i].T
        rot = float(rotation_angle_deg(torch.from_numpy(nearest @ requested_ij.T)[None])[0])
        zoom = float(sv[0] / sv[2] - 1.0)
        rot_errors.append(rot)
        zoom_errors.append(zoom)
        correct += int(rot < threshold_deg and zoom < zoom_tolerance)
        seen.update((i, j))
    out = PoseScore(
        score=correct / pairs_total,
        registered=len(seen),
        total=n,
        failed=not homographies,
        reason=None
        if homographies
        else "no frame pair has a verified homography (too little texture or overlap)",
        pairs_correct=correct,
        pairs_total=pairs_total,
        registered_frames=sorted(seen),
        threshold_deg=float(threshold_deg),
        method="homography",
    )
    if rot_errors:
        out.rotation_error_deg = float(np.median(rot_errors))
        out.zoom_error = float(np.median(zoom_errors))
    return out
