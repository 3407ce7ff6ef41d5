"""Camera poses of unposed frames by pycolmap structure-from-motion (CPU, one clip per call).

Used by the WebVid and photos preprocessing (``pipelines.webvid_records``,
``pipelines.photos_records``) and by the camera-pose-accuracy metric (:mod:`mvcustom.metrics.pose`,
PAPER.md §6 "CPA": COLMAP on the generated views).

Video frames are ordered, so sequential matching (each frame against its ``overlap`` successors)
is the default: exhaustive matching grows with frames squared (STACK.md: 3.74 s vs 2.41 s at 32
frames). Intrinsics are unknown by default (WebVid ships none) and shared by the clip (one
SIMPLE_PINHOLE camera, focal refined by bundle adjustment); a caller that knows them (the metric
knows the requested cameras) can pass ``intrinsics`` to fix one PINHOLE camera instead. A
reconstruction that registers fewer than ``min_registered_fraction`` of the frames is a failure
with a reason, never an exception that stops the job; frames left unregistered by a successful
reconstruction get poses interpolated (SLERP / linear) between their registered neighbours and
are listed in ``interpolated``.

A caller that knows the cameras the frames should have been seen from (the metric: the requested
ones) can also have the same features and verified matches triangulated against those cameras,
held fixed (COLMAP's point triangulator, ``triangulate_with``): the points that triangulate are
the matches consistent with those poses and intrinsics (``SfmResult.known_pose_points``).

pycolmap is imported inside :func:`run_sfm`, so importing this module stays cheap.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvcustom.configs.preprocess import SfmConfig
from mvcustom.geometry.camera import Cameras
from mvcustom.geometry.conventions import cameras_from_pycolmap


@dataclass
class SfmResult:
    """Outcome of one clip's SfM.

    Attributes:
        cameras: per-frame cameras at the input resolution (``None`` when failed).
        registered: frames registered by the reconstruction. total: frames given.
        num_points: triangulated 3D points. reprojection_error: mean, pixels.
        median_depth: median z-depth of the points seen by the first camera (scene scale).
        interpolated: frame positions whose pose was interpolated.
        reason: why it failed (``None`` on success).
        registered_frames: frame positions (input order) the reconstruction registered; on
            success ``cameras[registered_frames]`` are the reconstruction's own poses.
        rotation_span_deg: largest rotation between two registered cameras. A focal length is
            only observable through rotation: a pure translation (truck, dolly) leaves it free.
        triangulation_angle_deg: median over the 3D points of the widest angle between two rays
            that observe the point (parallax; small angles make depth and focal ill-conditioned).
        focal_rel_std: standard deviation of the estimated focal length relative to itself,
            from bundle adjustment's covariance (the largest over the clip's cameras; ``None``
            with fixed ``intrinsics`` (``focal_fixed``) or when the covariance could not be
            estimated). The
            focal is observable only through rotation: 8 frames over ~9 degrees leave it at
            ~15 %, 32 frames over ~40 degrees at ~1 %, a sideways track at 30 % to 100x.
        forward_motion: median over camera pairs of |cos| of the angle between the baseline and
            the first camera's optical axis: 1 for a dolly (moving along the view), 0 for a
            track or an orbit. SfM of forward motion can converge to wrong rotations with a
            confident covariance (the accuracy benchmark's dollies: 9 degrees off, also with the
            true focal fixed), so the figure is kept beside ``score`` as a second flag. Those
            wrong reconstructions turn part of the forward motion sideways (0.52 where the true
            path has ~1), still well above orbits (0.18), arcs (0.06) and tracks (0.01).
        keyframes: the frame positions the reconstruction was built from
            (``sfm.keyframe_stride``); the others in ``registered_frames`` were placed against
            its map by absolute pose (PnP), the rest are ``interpolated``.
        known_pose_points: with ``triangulate_with``: the 3D points COLMAP's point triangulator
            made of the keyframes' verified matches with those cameras as fixed poses and
            intrinsics (independent of whether the reconstruction above succeeded); ``None``
            when no cameras were given.
    """

    cameras: Cameras | None
    registered: int
    total: int
    num_points: int = 0
    reprojection_error: float | None = None
    median_depth: float | None = None
    interpolated: list[int] = field(default_factory=list)
    reason: str | None = None
    registered_frames: list[int] = field(default_factory=list)
    rotation_span_deg: float | None = None
    triangulation_angle_deg: float | None = None
    focal_rel_std: float | None = None
    focal_fixed: bool = False
    forward_motion: float | None = None
    keyframes: list[int] = field(default_factory=list)
    known_pose_points: int | None = None

    @property
    def ok(self) -> bool:
        return self.cameras is not None

    @property
    def score(self) -> float | None:
        """The pose-quality figure in (0, 1]: ``1 / (1 + focal_rel_std / 0.05)``, so 0.5 means
        the focal is known to +-5 % (one standard deviation), 0.33 to +-10 %, and it tends to
        0 as the focal becomes unobservable (0 when the covariance could not be estimated: a
        rank-deficient problem). A focal error e scales the estimated rotation angles by about
        (1 + e), so the figure also bounds the relative error of the rotations. ``None`` when
        the focal was given (nothing to estimate) or there is no reconstruction."""
        if self.focal_fixed or self.registered == 0:
            return None
        if self.focal_rel_std is None:
            return 0.0
        return 1.0 / (1.0 + self.focal_rel_std / 0.05)

    def quality(self) -> dict:
        return {
            "score": self.score,
            "focal_rel_std": self.focal_rel_std,
            "forward_motion": self.forward_motion,
            "registered_fraction": self.registered / max(self.total, 1),
            "num_points": self.num_points,
            "reprojection_error_px": self.reprojection_error,
            "interpolated_frames": self.interpolated,
            "rotation_span_deg": self.rotation_span_deg,
            "triangulation_angle_deg": self.triangulation_angle_deg,
        }


def _rotation_span_deg(cams: Cameras) -> float:
    R = cams.R.to(torch.float64)
    rel = torch.einsum("aij,bkj->abik", R, R)  # R_a R_b^T for every pair
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return float(torch.rad2deg(torch.arccos(cos)).max())


def _forward_motion(cams: Cameras) -> float | None:
    C = cams.centers.to(torch.float64)
    axes = cams.R.to(torch.float64)[:, 2, :]  # each camera's optical axis in world coordinates
    i, j = torch.triu_indices(len(C), len(C), offset=1)
    baseline = C[j] - C[i]
    length = baseline.norm(dim=-1)
    moved = length > 1e-12
    cos = (baseline * axes[i]).sum(-1).abs()[moved] / length[moved]
    return float(np.median(cos.numpy())) if len(cos) else None


def _triangulation_angle_deg(rec) -> float | None:
    """Median over points of the widest angle between two of its observing rays (degrees)."""
    centres = {}
    for image_id in rec.reg_image_ids():
        pose = rec.images[image_id].cam_from_world()
        pose = pose() if callable(pose) else pose
        R, t = pose.rotation.matrix(), pose.translation
        centres[image_id] = -R.T @ t
    angles = []
    for p in rec.points3D.values():
        rays = np.array([p.xyz - centres[e.image_id] for e in p.track.elements if e.image_id in centres])
        if len(rays) < 2:
            continue
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        angles.append(np.degrees(np.arccos(np.clip((rays @ rays.T).min(), -1.0, 1.0))))
    return float(np.median(angles)) if angles else None


def _focal_rel_std(rec) -> float | None:
    """Relative standard deviation of the focal length (largest over the reconstruction's
    cameras) from the covariance of a bundle adjustment of ``rec`` (COLMAP's Schur-complement
    estimator; gauge fixed by two camera poses). ``None`` when it cannot be estimated."""
    import pycolmap

    config = pycolmap.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_principal_point = False
    options.refine_extra_params = False
    try:
        adjuster = pycolmap.create_default_ceres_bundle_adjuster(options, config, rec)
        cov = pycolmap.estimate_ba_covariance(pycolmap.BACovarianceOptions(), rec, adjuster)
    except Exception:  # a degenerate problem; the figure is then unknown, not a failure
        return None
    if cov is None:
        return None
    worst = None
    for camera in rec.cameras.values():
        c = cov.get_other_params_cov(camera.params)
        if c is None or not np.isfinite(c[0, 0]) or c[0, 0] < 0:
            return None
        rel = float(np.sqrt(c[0, 0]) / abs(camera.params[0]))
        worst = rel if worst is None else max(worst, rel)
    return worst


def _interpolate_missing(cams: Cameras, positions: list[int], total: int) -> tuple[Cameras, list[int]]:
    """Fill poses of unregistered frames from their registered neighbours; each takes the
    intrinsics and size of its nearest registered frame (all equal with one shared camera)."""
    from scipy.spatial.transform import Rotation, Slerp

    have = np.array(positions)
    missing = [i for i in range(total) if i not in set(positions)]
    R = Rotation.from_matrix(cams.R.numpy())
    C = cams.centers.numpy()
    t_all = np.arange(total, dtype=np.float64)
    tq = np.clip(t_all, have.min(), have.max())  # clamp: hold the end poses outside the range
    R_all = Slerp(have.astype(np.float64), R)(tq).as_matrix()
    C_all = np.stack([np.interp(tq, have, C[:, k]) for k in range(3)], -1)
    w2c = np.tile(np.eye(4), (total, 1, 1))
    w2c[:, :3, :3] = R_all
    w2c[:, :3, 3] = -np.einsum("nij,nj->ni", R_all, C_all)
    nearest = torch.as_tensor(np.abs(t_all[:, None] - have[None, :]).argmin(1))
    return Cameras(torch.from_numpy(w2c), cams.K[nearest], cams.image_hw[nearest]), missing


def quiet_colmap() -> None:
    """Silence COLMAP's glog output in this process (fatal messages only). Per-image INFO lines
    would flood worker logs, and its ERROR lines ("Failed to create any sparse model") are
    expected outcomes that the caller reports once, with the reason, in its results
    (:class:`SfmResult.reason`, error records, ``pose_failure_reason``)."""
    import pycolmap

    pycolmap.logging.minloglevel = 3
    pycolmap.logging.stderrthreshold = 3


def _frame_name(position: int) -> str:
    return f"{position:05d}.png"


def _frame_position(name: str) -> int:
    """The clip position of an image named by :func:`_frame_name`."""
    return int(name.split(".")[0])


def _extraction_options(cfg: SfmConfig):
    import pycolmap

    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = cfg.num_threads
    extraction.sift.first_octave = cfg.first_octave
    extraction.sift.max_num_features = cfg.max_num_features
    return extraction


def _extract_and_match(
    frames, positions, img_dir: Path, db: Path, cfg: SfmConfig, K, shared_camera: bool
) -> list[str]:
    """Write the frames (at ``positions`` of the clip) as images, extract SIFT features into a
    COLMAP database and match them (``cfg.matcher``; COLMAP's geometric verification stores
    each pair's two-view geometry). ``shared_camera``: one COLMAP camera for every image (frames
    of one size), else one per image. Returns the image names, in frame order."""
    import pycolmap

    img_dir.mkdir()
    names = [_frame_name(i) for i in positions]
    for name, fr in zip(names, frames, strict=True):
        Image.fromarray(fr).save(img_dir / name, compress_level=1)  # lossless either way; 3x faster to write
    reader = pycolmap.ImageReaderOptions()
    if K is None:
        reader.camera_model = "SIMPLE_PINHOLE"
    else:
        reader.camera_model = "PINHOLE"
        reader.camera_params = ",".join(str(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    extraction = _extraction_options(cfg)
    cpu = pycolmap.Device.cpu
    pycolmap.extract_features(
        db,
        img_dir,
        camera_mode=pycolmap.CameraMode.SINGLE if shared_camera else pycolmap.CameraMode.PER_IMAGE,
        reader_options=reader,
        extraction_options=extraction,
        device=cpu,
    )
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = cfg.num_threads
    if cfg.matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = cfg.overlap
        pycolmap.match_sequential(db, matching_options=matching, pairing_options=pairing, device=cpu)
    else:
        pycolmap.match_exhaustive(db, matching_options=matching, device=cpu)
    return names


def pairwise_homographies(
    frames: np.ndarray, cfg: SfmConfig, workdir: str | None = None, min_inliers: int = 15
) -> dict[tuple[int, int], np.ndarray]:
    """The homography ``x_j ~ H x_i`` of every frame pair ``i < j`` that COLMAP's geometric
    verification found (features and matching as :func:`run_sfm`), with at least
    ``min_inliers`` inlier matches. Views from one camera centre (a zoom, a pan) are related by
    exactly such a homography, ``H = K_j R_ij K_i^{-1}``, where SfM cannot triangulate anything."""
    import pycolmap

    quiet_colmap()
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        img_dir, db = Path(d) / "images", Path(d) / "database.db"
        names = _extract_and_match(frames, range(len(frames)), img_dir, db, cfg, None, True)
        database = pycolmap.Database.open(db)
        try:
            ids = {im.name: im.image_id for im in database.read_all_images()}
            out = {}
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    a, b = ids[names[i]], ids[names[j]]
                    if not database.exists_two_view_geometry(a, b):
                        continue
                    geometry = database.read_two_view_geometry(a, b)
                    H = np.asarray(geometry.H, dtype=np.float64)
                    if len(geometry.inlier_matches) < min_inliers or not np.isfinite(H).all():
                        continue
                    if abs(np.linalg.det(H)) < 1e-12:
                        continue
                    out[(i, j)] = H
        finally:
            database.close()
    return out


def _capped_hw(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``(H, W)`` shrunk so that the longer side is ``max_side`` (unchanged when already that
    small, or ``max_side`` is ``None``)."""
    H, W = hw
    if max_side is None or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(round(H * s), 1), max(round(W * s), 1)


def _cap_size(frames, max_side: int | None, K: torch.Tensor | None):
    """Frames shrunk so that each one's longer side is ``max_side`` (``None``, or frames already
    that small: unchanged, the very same object); frames of one size stay one array, images of
    different sizes (photos) a list, each shrunk by its own factor. ``K`` (frames of one size)
    comes back in pixels of the shrunk frames."""
    sizes = [_capped_hw(tuple(f.shape[:2]), max_side) for f in frames]
    if all(hw == tuple(f.shape[:2]) for hw, f in zip(sizes, frames, strict=True)):
        return frames, K
    small = [
        f if hw == tuple(f.shape[:2]) else np.asarray(Image.fromarray(f).resize(hw[::-1], Image.BILINEAR))
        for f, hw in zip(frames, sizes, strict=True)
    ]
    small = np.stack(small) if isinstance(frames, np.ndarray) else small
    if K is not None:  # Cameras.resize holds the pixel convention of a resize, here as everywhere
        H, W = frames[0].shape[:2]
        K = Cameras(torch.eye(4, dtype=K.dtype)[None], K[None], (H, W)).resize(*sizes[0]).K[0]
    return small, K


def _resize_each(cams: Cameras, sizes: list[tuple[int, int]]) -> Cameras:
    """Each camera resized to its own image size ``sizes[i]`` (a no-op where it already is)."""
    if cams.image_hw.tolist() == [list(hw) for hw in sizes]:
        return cams
    if len(set(sizes)) == 1:
        return cams.resize(*sizes[0])
    return Cameras.cat([cams[i : i + 1].resize(*hw) for i, hw in enumerate(sizes)])


def _triangulate_known(
    db: Path, img_dir: Path, names: list[str], cams: Cameras, out: Path, cfg: SfmConfig
) -> int:
    """The 3D points COLMAP's point triangulator makes of the verified matches in ``db`` with
    ``cams`` (one per image of ``names``, in pixels of the images written) as fixed poses and
    intrinsics (bundle adjustment refines the points only). Each database camera is rewritten as
    the PINHOLE camera of ``cams`` first: the triangulator requires the reconstruction's cameras
    to match the database's, and the database is this call's own temporary copy."""
    import pycolmap

    K = cams.K.to(torch.float64).numpy()
    w2c = cams.w2c.to(torch.float64).numpy()
    database = pycolmap.Database.open(db)
    try:
        images = {im.name: im for im in database.read_all_images()}
        cameras = {}
        for name, k in zip(names, K, strict=True):
            old = database.read_camera(images[name].camera_id)
            if old.camera_id in cameras:  # shared by frames of one K (the caller's camera mode)
                continue
            cameras[old.camera_id] = pycolmap.Camera(
                model="PINHOLE",
                width=old.width,
                height=old.height,
                params=[k[0, 0], k[1, 1], k[0, 2], k[1, 2]],
                camera_id=old.camera_id,
            )
            database.update_camera(cameras[old.camera_id])
    finally:
        database.close()
    rec = pycolmap.Reconstruction()
    for camera in cameras.values():
        rec.add_camera_with_trivial_rig(camera)
    for name, m in zip(names, w2c, strict=True):
        image = pycolmap.Image(name=name, camera_id=images[name].camera_id, image_id=images[name].image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(m[:3, :3]), m[:3, 3]))
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = cfg.num_threads
    out.mkdir()
    return int(pycolmap.triangulate_points(rec, db, img_dir, out, options=options).num_points3D())


def keyframe_positions(n: int, stride: int) -> list[int]:
    """The frames a clip's reconstruction is built from: every ``stride``-th one and the last,
    so that no frame lies beyond the map (``stride`` 1: all of them)."""
    return sorted(set(range(0, n, max(stride, 1))) | {n - 1})


def _unit_rows(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def match_descriptors(
    d1: np.ndarray, d2: np.ndarray, max_ratio: float = 0.8, max_distance: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two sets of unit SIFT descriptors under COLMAP's matching
    rules (its ``SiftMatchingOptions`` defaults): the angle to the best match below
    ``max_distance`` radians and below ``max_ratio`` times the angle to the second best, and
    each the other's best (cross check). Returns the indices into ``d1`` and ``d2``."""
    if len(d1) < 2 or len(d2) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    angle = np.arccos(np.clip(d1 @ d2.T, -1.0, 1.0))
    two = np.argpartition(angle, 1, axis=1)[:, :2]
    rows = np.arange(len(d1))
    a, b = angle[rows, two[:, 0]], angle[rows, two[:, 1]]
    best = np.where(a <= b, two[:, 0], two[:, 1])
    first, second = np.minimum(a, b), np.maximum(a, b)
    i = np.nonzero((first < max_distance) & (first < max_ratio * second))[0]
    j = best[i]
    mutual = angle[:, j].argmin(0) == i
    return i[mutual], j[mutual]


def _register_by_pnp(rec, db: Path, frames, todo: list[int], cfg: SfmConfig) -> dict[int, np.ndarray]:
    """Poses of the frames at ``todo`` from the keyframe map ``rec``: SIFT features (as the
    keyframes', from the frames in memory), matched against the 3D-point features of the
    nearest registered keyframe on each side, then COLMAP's LO-RANSAC absolute pose with non-linear refinement (camera and
    thresholds as its mapper's: the map's shared camera held fixed, >= 30 inliers, >= 25 % of
    the correspondences). Returns ``{position: 3x4 cam_from_world}`` for the frames placed."""
    import pycolmap

    database = pycolmap.Database.open(db)
    try:
        by_name = {im.name: im.image_id for im in database.read_all_images()}
        keyframes = {}
        for name, image_id in by_name.items():
            if image_id not in rec.images or not rec.images[image_id].has_pose:
                continue
            points = rec.images[image_id].points2D
            ids = np.array([p.point3D_id if p.has_point3D() else -1 for p in points], dtype=np.int64)
            desc = database.read_descriptors(image_id)
            desc = _unit_rows(desc.data)
            keyframes[_frame_position(name)] = (desc[ids >= 0], ids[ids >= 0])
    finally:
        database.close()
    if not keyframes:
        return {}
    camera = rec.cameras[next(iter(rec.images.values())).camera_id]
    # COLMAP's own extractor and grey conversion: the same features as pycolmap.extract_features
    # gives the keyframes from their images (identical descriptors), without the image files
    extractor = pycolmap.FeatureExtractor.create(_extraction_options(cfg), pycolmap.Device.cpu)
    mapper = pycolmap.IncrementalMapperOptions()
    estimation = pycolmap.AbsolutePoseEstimationOptions()
    estimation.ransac.max_error = mapper.abs_pose_max_error
    placed = {}
    for i in todo:
        features, desc = extractor.extract(
            pycolmap.Bitmap.from_array(np.ascontiguousarray(frames[i])).clone_as_grey()
        )
        keypoints = np.array([(p.x, p.y) for p in features], dtype=np.float64).reshape(-1, 2)
        desc = _unit_rows(desc.data)
        sides = (
            max((k for k in keyframes if k < i), default=None),
            min((k for k in keyframes if k > i), default=None),
        )
        xy, xyz, seen = [], [], set()
        for k in sides:
            if k is None:
                continue
            kdesc, kids = keyframes[k]
            for a, b in zip(*match_descriptors(desc, kdesc), strict=True):
                point_id = int(kids[b])
                if point_id not in seen:
                    seen.add(point_id)
                    xy.append(keypoints[a])
                    xyz.append(rec.points3D[point_id].xyz)
        if len(xy) < mapper.abs_pose_min_num_inliers:
            continue
        pose = pycolmap.estimate_and_refine_absolute_pose(
            np.asarray(xy, dtype=np.float64), np.asarray(xyz, dtype=np.float64), camera, estimation
        )
        if pose is None:
            continue
        inliers = int(pose["num_inliers"])
        if inliers < mapper.abs_pose_min_num_inliers or inliers < mapper.abs_pose_min_inlier_ratio * len(xy):
            continue
        placed[i] = np.asarray(pose["cam_from_world"].matrix(), dtype=np.float64)
    return placed


def run_sfm(
    frames: np.ndarray | list[np.ndarray],
    cfg: SfmConfig,
    workdir: str | None = None,
    intrinsics: torch.Tensor | np.ndarray | None = None,
    triangulate_with: Cameras | None = None,
) -> SfmResult:
    """Run SfM on ``frames``: ``(N, H, W, 3)`` uint8 RGB, or a list of ``(H_i, W_i, 3)`` images
    of different sizes (photos at their original resolution).

    Args:
        frames: the clip, in order.
        cfg: matcher, mapper, registration threshold, threads, keyframes and
            ``max_image_size`` (images larger than that are shrunk for SfM, each by its own
            factor; the cameras returned are in pixels of ``frames`` as given).
        workdir: parent folder of the temporary COLMAP workspace (default: the system's).
        intrinsics: optional ``(3, 3)`` pinhole ``K`` in pixels of ``frames``, shared by every
            frame. Given, COLMAP uses a fixed PINHOLE camera (focal not refined by bundle
            adjustment); ``None`` (default) estimates one shared SIMPLE_PINHOLE focal, or one
            focal per image when the images differ in size (COLMAP's per-image cameras).
        triangulate_with: optional ``N`` cameras, one per frame, in pixels of ``frames`` (their
            ``image_hw`` the frames' sizes): the keyframes' features and verified matches are
            also triangulated with these poses and intrinsics held fixed, giving
            ``SfmResult.known_pose_points`` (one extraction and matching serves both). When
            their ``K`` differ between frames of one size, COLMAP gets one camera per image
            (the free reconstruction then estimates a focal per image too, ``intrinsics``
            unset), and every frame is a keyframe.
    """
    import pycolmap

    quiet_colmap()
    pycolmap.set_random_seed(cfg.seed)  # this clip's poses, whatever ran in this thread before
    n = len(frames)
    full_hw = [tuple(fr.shape[:2]) for fr in frames]
    one_size = len(set(full_hw)) == 1
    K = None
    if intrinsics is not None:
        K = torch.as_tensor(intrinsics, dtype=torch.float64)
        if K.shape != (3, 3):
            raise ValueError(f"intrinsics must be one (3, 3) K shared by the frames, got {tuple(K.shape)}")
        if not one_size:
            raise ValueError("shared intrinsics need frames of one size; these differ in size")
    shared_camera = one_size
    if triangulate_with is not None:
        if not isinstance(triangulate_with, Cameras) or len(triangulate_with) != n:
            raise ValueError(
                f"triangulate_with must be Cameras, one per frame ({n}), got "
                f"{len(triangulate_with) if isinstance(triangulate_with, Cameras) else type(triangulate_with).__name__}"
            )
        given_hw = [tuple(hw) for hw in triangulate_with.image_hw.tolist()]
        if given_hw != [tuple(hw) for hw in full_hw]:
            raise ValueError(
                f"triangulate_with must be in pixels of the frames (image_hw {sorted(set(full_hw))}), "
                f"got image_hw {sorted(set(given_hw))}: resize them first (Cameras.resize)"
            )
        triangulate_with = triangulate_with.to(dtype=torch.float64)
        Kt = triangulate_with.K
        shared_camera = one_size and torch.allclose(Kt, Kt[:1].expand_as(Kt))
    frames, K = _cap_size(frames, cfg.max_image_size, K)
    sfm_hw = [tuple(fr.shape[:2]) for fr in frames]
    keys = (
        keyframe_positions(n, cfg.keyframe_stride)
        if cfg.matcher == "sequential" and shared_camera
        else list(range(n))
    )
    known_points = None
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        img_dir, db = Path(d) / "images", Path(d) / "database.db"
        names = _extract_and_match([frames[i] for i in keys], keys, img_dir, db, cfg, K, shared_camera)
        out = Path(d) / "sparse"
        out.mkdir()
        if cfg.mapper == "incremental":
            opts = pycolmap.IncrementalPipelineOptions()
            opts.num_threads = cfg.num_threads
            opts.ba_refine_principal_point = False
            opts.ba_refine_extra_params = False
            opts.extract_colors = False  # nothing reads the points' colours
            if K is not None:
                opts.ba_refine_focal_length = False
            recs = pycolmap.incremental_mapping(db, img_dir, out, options=opts)
        else:
            recs = pycolmap.global_mapping(db, img_dir, out)
        rec = max(recs.values(), key=lambda r: r.num_reg_images()) if recs else None
        placed = {}
        if rec is not None and len(keys) < n:  # the frames between keyframes, against the map
            placed = _register_by_pnp(rec, db, frames, sorted(set(range(n)) - set(keys)), cfg)
        if triangulate_with is not None:  # last: it rewrites the database's cameras
            given = _resize_each(triangulate_with, sfm_hw)[keys]
            known_points = _triangulate_known(db, img_dir, names, given, Path(d) / "known", cfg)
    if rec is None:
        return SfmResult(
            None,
            0,
            n,
            reason="no reconstruction (too little parallax or texture to initialise)",
            keyframes=keys,
            known_pose_points=known_points,
        )
    key_cams, got = cameras_from_pycolmap(rec, names)
    on_map = {_frame_position(g): key_cams.w2c[k] for k, g in enumerate(got)}
    for i, m in placed.items():
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :4] = torch.from_numpy(m)
        on_map[i] = w2c
    positions = sorted(on_map)
    registered = len(positions)
    if placed:  # one shared camera (frames of one size): the map's K for every frame
        cams = Cameras(
            torch.stack([on_map[i] for i in positions]),
            key_cams.K[:1].repeat(registered, 1, 1),
            key_cams.image_hw[:1].repeat(registered, 1),
        )
    else:  # the reconstruction's own cameras (per image for photos), already in frame order
        cams = key_cams
    result = SfmResult(
        None,
        registered,
        n,
        num_points=int(rec.num_points3D()),
        reprojection_error=float(rec.compute_mean_reprojection_error()),
        registered_frames=positions,
        rotation_span_deg=_rotation_span_deg(cams),
        triangulation_angle_deg=_triangulation_angle_deg(rec),
        focal_rel_std=None if K is not None else _focal_rel_std(rec),
        focal_fixed=K is not None,
        forward_motion=_forward_motion(cams),
        keyframes=keys,
        known_pose_points=known_points,
    )
    if len(got) / len(keys) < cfg.min_registered_fraction:
        result.reason = (
            f"registered {len(got)}/{len(keys)} keyframes, below sfm.min_registered_fraction="
            f"{cfg.min_registered_fraction}"
        )
        return result
    if registered / n < cfg.min_registered_fraction:
        result.reason = f"registered {registered}/{n} frames, below sfm.min_registered_fraction={cfg.min_registered_fraction}"
        return result
    if registered < n:
        cams, result.interpolated = _interpolate_missing(cams, positions, n)
    pts = torch.tensor(np.array([p.xyz for p in rec.points3D.values()]), dtype=torch.float64)
    first = cams[0]
    if len(pts):
        _, z = first.project(pts)
        z = z[z > 0]
        result.median_depth = float(z.median()) if len(z) else None
    if result.median_depth is None:
        result.reason = "no reconstructed point lies in front of the first camera"
        return result
    # back to the frames as given (a no-op unless sfm.max_image_size shrank them)
    result.cameras = cams if sfm_hw == full_hw else _resize_each(cams, full_hw)
    return result
