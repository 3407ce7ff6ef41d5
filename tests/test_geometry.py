"""Camera geometry against the generator's ground truth (numerically, never against itself)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mvcustom.data.co3d import load_category
from mvcustom.geometry import (
    Cameras,
    align_cameras,
    cameras_from_co3d_viewpoints,
    cameras_from_pytorch3d,
    cameras_to_pytorch3d,
    format_realestate10k,
    make_trajectory,
    parse_realestate10k,
    plucker_embedding,
    relative_pose_errors,
    umeyama,
)
from mvcustom.geometry.camera import center_crop_box, look_at


def _co3d_sequences(root):
    """Yield (category, sequence, cameras from annotations, sidecar) for every generated sequence."""
    for cat_dir in sorted((root / "co3d").iterdir()):
        if not cat_dir.is_dir():
            continue
        cat = load_category(str(root / "co3d"), cat_dir.name)
        for seq, frames in cat.frames_by_sequence.items():
            cams = cameras_from_co3d_viewpoints(
                [
                    {
                        "R": f.viewpoint.R,
                        "T": f.viewpoint.T,
                        "focal_length": f.viewpoint.focal_length,
                        "principal_point": f.viewpoint.principal_point,
                        "intrinsics_format": f.viewpoint.intrinsics_format,
                    }
                    for f in frames
                ],
                torch.tensor([f.image.size for f in frames]),
            )
            gt = np.load(root / "ground_truth" / "co3d" / cat_dir.name / f"{seq}.npz")
            yield cat_dir.name, seq, frames, cams, gt


def test_co3d_annotations_reproject_ground_truth_points(sample_data):
    """CO3D (PyTorch3D NDC) -> OpenCV lands the sidecar's 3D points where the renderer drew them."""
    formats, shapes = set(), set()
    for _, seq, frames, cams, gt in _co3d_sequences(sample_data):
        formats.add(frames[0].viewpoint.intrinsics_format)
        H, W = frames[0].image.size
        shapes.add("square" if H == W else "non-square")
        uv, z = cams.project(torch.from_numpy(gt["points_world"]))
        err = (uv - torch.from_numpy(gt["points_uv"])).norm(dim=-1)
        assert (z > 0).all()
        assert err.max() < 0.05, f"{seq}: max reprojection error {err.max():.4f} px"
        # and the annotation cameras equal the true ones
        assert torch.allclose(cams.K, torch.from_numpy(gt["K"]), atol=1e-6)
        assert torch.allclose(cams.w2c, torch.from_numpy(gt["w2c"]), atol=1e-6)
    assert formats == {"ndc_isotropic", "ndc_norm_image_bounds"}
    assert "non-square" in shapes


def test_crop_and_resize_keep_reprojection(sample_data):
    """Cropping/resizing updates K exactly: points land where the image operation moves pixels."""
    for _, seq, _frames, cams, gt in _co3d_sequences(sample_data):
        H, W = (int(v) for v in cams.image_hw[0])
        pts = torch.from_numpy(gt["points_world"])
        uv_gt = torch.from_numpy(gt["points_uv"])
        for th, tw in ((64, 64), (48, 80), (96, 56)):
            x0, y0, cw, ch = center_crop_box(H, W, th, tw)
            new = cams.crop_resize(th, tw)
            assert new.image_hw[0].tolist() == [th, tw]
            # The image operation: corner-origin pixel (u, v) -> ((u - x0) * tw / cw, (v - y0) * th / ch).
            expected = (uv_gt - torch.tensor([x0, y0])) * torch.tensor([tw / cw, th / ch])
            uv, _ = new.project(pts)
            assert (uv - expected).norm(dim=-1).max() < 0.05, seq
        # an off-centre crop too
        sub = cams.crop(7, 5, W - 20, H - 11)
        uv, _ = sub.project(pts)
        assert (uv - (uv_gt - torch.tensor([7.0, 5.0]))).norm(dim=-1).max() < 0.05


def test_crop_resize_matches_resampled_image():
    """The K update agrees with actually resampling an image: a one-pixel dot moves where K says."""
    from PIL import Image

    H, W = 60, 90
    K = torch.tensor([[80.0, 0, 44.0], [0, 80.0, 31.0], [0, 0, 1]])
    cams = Cameras(torch.eye(4, dtype=torch.float64).unsqueeze(0), K, (H, W))
    img = np.zeros((H, W), np.float32)
    img[40:42, 60:62] = 1.0  # a 2x2 dot centred at (61, 41) in corner-origin pixels
    x0, y0, cw, ch = center_crop_box(H, W, 40, 40)
    out = np.asarray(Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw]).resize((40, 40), Image.BILINEAR))
    ys, xs = np.nonzero(out > 0)
    w = out[ys, xs]
    centroid = np.array([(xs + 0.5) @ w / w.sum(), (ys + 0.5) @ w / w.sum()])
    X = cams.unproject(torch.tensor([[[61.0, 41.0]]]), torch.tensor([[2.0]]))
    uv, _ = cams.crop_resize(40, 40).project(X)
    assert np.abs(uv[0, 0].numpy() - centroid).max() < 0.05


def test_pytorch3d_round_trip_both_formats():
    gen = torch.Generator().manual_seed(0)
    cams = make_trajectory("spiral", 5, image_hw=(90, 160))
    K = cams.K.clone()
    K[:, 0, 2] += 3.3
    K[:, 1, 1] *= 1.01
    cams = Cameras(cams.w2c, K, cams.image_hw)
    for fmt in ("ndc_isotropic", "ndc_norm_image_bounds"):
        R, T, f, p = cameras_to_pytorch3d(cams, fmt)
        back = cameras_from_pytorch3d(R, T, f, p, cams.image_hw, fmt)
        assert torch.allclose(back.w2c, cams.w2c, atol=1e-12)
        assert torch.allclose(back.K, cams.K, atol=1e-9)
        # PyTorch3D's own projection formula, written out: X_cam = X @ R + T; NDC = f * X/Z + p;
        # screen pixel = (W/2, H/2) - NDC * scale (NDC +x left, +y up).
        X = torch.randn(10, 3, generator=gen, dtype=torch.float64) * 0.3
        Xc = X.unsqueeze(0) @ R + T.unsqueeze(1)
        ndc = f.unsqueeze(1) * Xc[..., :2] / Xc[..., 2:] + p.unsqueeze(1)
        hw = cams.image_hw.double()
        scale = (
            hw.flip(-1) / 2
            if fmt == "ndc_norm_image_bounds"
            else hw.min(-1, keepdim=True).values.expand(-1, 2) / 2
        )
        px = hw.flip(-1).unsqueeze(1) / 2 - ndc * scale.unsqueeze(1)
        uv, _ = cams.project(X)
        assert torch.allclose(uv, px, atol=1e-9)
    with pytest.raises(ValueError, match="intrinsics_format"):
        cameras_from_pytorch3d(R, T, f, p, cams.image_hw, "screen")


def test_plucker_rays_pass_through_back_projected_points(sample_data):
    for _, _, _frames, cams, gt in _co3d_sequences(sample_data):
        emb = plucker_embedding(cams)  # (N, 6, H, W)
        uv = torch.from_numpy(gt["points_uv"])
        X = torch.from_numpy(gt["points_world"])
        cols, rows = (uv[..., 0] - 0.5).long(), (uv[..., 1] - 0.5).long()
        n = torch.arange(len(cams)).unsqueeze(-1).expand_as(cols)
        m = emb[n, :3, rows, cols]
        d = emb[n, 3:, rows, cols]
        assert torch.allclose(d.norm(dim=-1), torch.ones(()).double(), atol=1e-9)
        # X lies on the line (m, d) iff X x d == m
        resid = (torch.linalg.cross(X, d, dim=-1) - m).norm(dim=-1)
        assert resid.max() < 1e-6 * X.norm(dim=-1).max()
        # and d points from the camera towards X
        assert ((X - cams.centers.unsqueeze(1)) * d).sum(-1).min() > 0
        break


def test_plucker_stride_matches_downsampled_grid():
    cams = make_trajectory("orbit", 3, image_hw=(32, 48))
    full = plucker_embedding(cams, stride=1)
    coarse = plucker_embedding(cams, stride=4)
    assert coarse.shape == (3, 6, 8, 12)
    # cell centres of a 4x4 cell lie between full-res centres 1 and 2: the direction is their average's direction
    d = full[:, 3:, 1:3, 1:3].mean(dim=(-1, -2))
    d = d / d.norm(dim=1, keepdim=True)
    assert torch.allclose(coarse[:, 3:, 0, 0], d, atol=1e-4)


def test_umeyama_recovers_similarity_exactly():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    R = q * torch.sign(torch.det(q))
    s, t = 2.7, torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    dst = s * src @ R.T + t
    s2, R2, t2 = umeyama(src, dst)
    assert abs(float(s2) - s) < 1e-10
    assert torch.allclose(R2, R, atol=1e-10) and torch.allclose(t2, t, atol=1e-10)
    s3, _, _ = umeyama(src, dst, with_scale=False)
    assert float(s3) == 1.0
    with pytest.raises(ValueError, match="collinear"):
        line = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1) * torch.tensor(
            [[1.0, 2.0, 3.0]], dtype=torch.float64
        )
        umeyama(line, line)


def test_align_cameras_and_relative_errors():
    true = make_trajectory("arc", 8, span_deg=90, image_hw=(64, 64))
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = q * torch.sign(torch.det(q))
    T[:3, 3] = torch.tensor([0.3, 2.0, -1.0])
    pred = true.transform_world(T, 0.37)  # an SfM-like arbitrary gauge
    err = relative_pose_errors(pred, true)
    # relative rotations are gauge-invariant; translation directions too (scale-free)
    assert err["rotation_deg"].max() < 1e-6 and torch.nan_to_num(err["translation_deg"]).max() < 1e-5
    aligned, info = align_cameras(pred, true)
    assert info["center_error"].max() < 1e-9
    assert torch.allclose(aligned.w2c, true.w2c, atol=1e-9)
    # a known perturbation: rotate camera 3 by 5 degrees about its optical axis
    a = math.radians(5)
    Rz = torch.tensor(
        [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=torch.float64
    )
    w2c = true.w2c.clone()
    w2c[3, :3, :3] = Rz @ w2c[3, :3, :3]
    w2c[3, :3, 3] = Rz @ w2c[3, :3, 3]  # keep the centre
    err = relative_pose_errors(Cameras(w2c, true.K, true.image_hw), true)
    i, j = torch.triu_indices(8, 8, 1)
    touched = (i == 3) | (j == 3)
    assert torch.allclose(
        err["rotation_deg"][touched], torch.full((int(touched.sum()),), 5.0, dtype=torch.float64), atol=1e-6
    )
    assert err["rotation_deg"][~touched].max() < 1e-6


@pytest.mark.parametrize("kind", ["orbit", "arc", "forward", "zoom", "spiral"])
def test_trajectories_look_at_target_with_up_up(kind):
    target = torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)
    cams = make_trajectory(kind, 12, target=tuple(target.tolist()), image_hw=(48, 64))
    uv, z = cams.project(target.unsqueeze(0))
    assert (z > 0).all()
    assert torch.allclose(uv[:, 0], torch.tensor([32.0, 24.0], dtype=torch.float64).expand(12, 2), atol=1e-9)
    # world +z points up in the image (camera -y)
    up_cam = cams.R @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert (up_cam[:, 1] < 0).all()
    assert torch.allclose(
        cams.R @ cams.R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(12, 3, 3), atol=1e-12
    )
    assert torch.allclose(torch.det(cams.R), torch.ones(12, dtype=torch.float64))


def test_orbit_geometry_and_relative_to():
    cams = make_trajectory("orbit", 8, radius=2.5, elevation_deg=30)
    d = cams.centers.norm(dim=-1)
    assert torch.allclose(d, torch.full_like(d, 2.5))
    assert torch.allclose(
        cams.centers[:, 2], torch.full((8,), 2.5 * math.sin(math.radians(30)), dtype=torch.float64)
    )
    rel = cams.relative_to(0)
    assert torch.allclose(rel.w2c[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    # relative poses are invariant to a global rigid transform of all cameras
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = look_at(
        torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.float64),
        torch.tensor([0.0, 0, 1]),
    )[0, :3, :3]
    T[:3, 3] = torch.tensor([5.0, -1.0, 2.0])
    assert torch.allclose(cams.transform_world(T).relative_to(0).w2c, rel.w2c, atol=1e-10)
    with pytest.raises(ValueError, match="unknown trajectory"):
        make_trajectory("loop", 4)


def test_unproject_inverts_project():
    cams = make_trajectory("spiral", 4, image_hw=(40, 50))
    X = torch.randn(4, 30, 3, dtype=torch.float64) * 0.4
    uv, z = cams.project(X)
    assert torch.allclose(cams.unproject(uv, z), X, atol=1e-10)


# RealEstate10K line from CameraCtrl's assets/pose_files/0bf152ef84195293.txt
_RE10K = """https://www.youtube.com/watch?v=QShWPZxTDoE
158692025 0.474812461 0.844111024 0.500000000 0.500000000 0.000000000 0.000000000 0.780003667 0.059620168 -0.622928321 0.726968666 -0.062449891 0.997897983 0.017311305 0.217967188 0.622651041 0.025398925 0.782087326 -1.002211444
"""


def test_realestate10k_parse_and_round_trip():
    stamps, cams = parse_realestate10k(_RE10K.splitlines(), (256, 384), "0bf152ef84195293.txt")
    assert stamps.tolist() == [158692025]
    assert cams.K[0, 0, 0].item() == pytest.approx(0.474812461 * 384)
    assert cams.K[0, 1, 1].item() == pytest.approx(0.844111024 * 256)
    assert cams.K[0, 0, 2].item() == pytest.approx(192.0) and cams.K[0, 1, 2].item() == pytest.approx(128.0)
    assert cams.w2c[0, 0, 3].item() == pytest.approx(0.726968666) and cams.w2c[
        0, 2, 3
    ].item() == pytest.approx(-1.002211444)
    # fx/fy = 9/16 in normalised units is one focal length in pixels for a 16:9 frame
    _, wide = parse_realestate10k(_RE10K.splitlines(), (360, 640))
    assert wide.K[0, 0, 0].item() == pytest.approx(wide.K[0, 1, 1].item(), rel=1e-4)
    traj = make_trajectory("arc", 5, image_hw=(256, 384))
    lines = format_realestate10k([0, 33366, 66733, 100100, 133466], traj, "https://www.youtube.com/watch?v=x")
    _, back = parse_realestate10k(lines, (256, 384))
    assert torch.allclose(back.w2c, traj.w2c, atol=1e-12) and torch.allclose(back.K, traj.K, atol=1e-9)


def test_realestate10k_bad_line_names_file_and_line():
    with pytest.raises(ValueError, match=r"poses\.txt:2: expected 19 numbers"):
        parse_realestate10k(["https://youtu.be/x", "1 2 3"], (10, 10), "poses.txt")
    with pytest.raises(ValueError, match=r"poses\.txt:2: not a number"):
        parse_realestate10k(["https://youtu.be/x", "1 " + " ".join(["a"] * 18)], (10, 10), "poses.txt")


def test_camera_input_validation():
    with pytest.raises(ValueError, match="w2c must have shape"):
        Cameras(torch.eye(3), torch.eye(3), (4, 4))
    with pytest.raises(ValueError, match="image_hw must be positive"):
        Cameras(torch.eye(4), torch.eye(3), (0, 4))


def test_lateral_trajectory_translates_along_camera_x_only():
    """The paper's x-translation: one orientation, centres on the camera's x axis, centred on
    the view that looks at the target (which projects to the image centre there)."""
    target = torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)
    cams = make_trajectory(
        "lateral", 9, span=2.0, radius=3.0, target=tuple(target.tolist()), image_hw=(48, 64)
    )
    assert torch.allclose(cams.R, cams.R[:1].expand_as(cams.R), atol=1e-12)
    steps = cams.centers[1:] - cams.centers[:-1]
    right = cams.R[0, 0]  # camera x axis in world coordinates
    assert torch.allclose(steps, (2.0 / 8) * right.expand_as(steps), atol=1e-12)
    uv, z = cams[4:5].project(target.unsqueeze(0))
    assert (
        torch.allclose(uv[0, 0], torch.tensor([32.0, 24.0], dtype=torch.float64), atol=1e-9) and z[0, 0] > 0
    )
    # camera-frame motion is pure +x: relative translations have no y or z component
    rel = cams.relative_to(0)
    assert torch.allclose(rel.t[:, 1:], torch.zeros(9, 2, dtype=torch.float64), atol=1e-12)
    assert (rel.t[1:, 0] < 0).all()  # the world moves left as the camera trucks right


def test_geometry_exports_load_lazily_and_the_crop_needs_no_torch():
    """Every exported name resolves; the decode-only path's crop box does not import torch."""
    import ast
    import inspect
    import subprocess
    import sys

    import mvcustom.geometry as g

    # the static imports (for type checkers) name exactly the lazy exports, module by module
    static: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(inspect.getsource(g))):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("mvcustom.geometry."):
            static[node.module.rsplit(".", 1)[1]] = sorted(a.name for a in node.names)
    assert static == {m: sorted(names) for m, names in g._EXPORTS.items()}
    assert g.__all__ == sorted(g._MODULE_OF)
    assert all(callable(getattr(g, name)) for name in g.__all__)
    code = (
        "import sys; from mvcustom.geometry.crop import center_crop_box; import pipelines.webvid_records; "
        "assert center_crop_box(180, 320, 128, 128) == (70, 0, 180, 180); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
