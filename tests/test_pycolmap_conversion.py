"""pycolmap reconstructions -> Cameras, checked against the renderer's true cameras."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mvcustom.data.generator.scene import Scene, render
from mvcustom.data.generator.subjects import make_room, make_subject
from mvcustom.geometry import align_cameras, cameras_from_pycolmap, make_trajectory, relative_pose_errors


@pytest.mark.slow
def test_sfm_of_rendered_views_matches_ground_truth(tmp_path):
    import pycolmap  # pinned: a broken install must fail here, not skip

    H, W = 240, 320
    true = make_trajectory(
        "arc", 10, span_deg=50, radius=2.0, elevation_deg=20, target=(0, 0, 0.35), image_hw=(H, W), fov_deg=60
    )
    rend = render(Scene(make_subject("chair", 3) + make_room(3)), true)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    names = []
    for i, rgb in enumerate(rend.rgb.numpy()):
        names.append(f"{i:03d}.png")
        Image.fromarray(rgb).save(img_dir / names[-1])
    K = true.K[0]
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    reader.camera_params = ",".join(str(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    db = tmp_path / "db.db"
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = 1
    pycolmap.extract_features(
        db,
        img_dir,
        camera_mode=pycolmap.CameraMode.SINGLE,
        reader_options=reader,
        extraction_options=extraction,
        device=pycolmap.Device.cpu,
    )
    pycolmap.match_exhaustive(db, device=pycolmap.Device.cpu)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.ba_refine_focal_length = False
    opts.ba_refine_principal_point = False
    opts.ba_refine_extra_params = False
    recs = pycolmap.incremental_mapping(db, img_dir, tmp_path / "sparse", options=opts)
    assert recs, "SfM failed on rendered views"
    rec = max(recs.values(), key=lambda r: r.num_reg_images())
    cams, got = cameras_from_pycolmap(rec, names)
    assert len(got) >= 9, f"only {len(got)}/10 views registered"
    idx = [names.index(n) for n in got]
    sub = true[idx[0]] if len(idx) == 1 else type(true)(true.w2c[idx], true.K[idx], true.image_hw[idx])
    assert torch.allclose(cams.K, sub.K, atol=1e-6)
    assert cams.image_hw.tolist() == sub.image_hw.tolist()
    err = relative_pose_errors(cams, sub)
    assert err["rotation_deg"].max() < 0.5, err["rotation_deg"].max()
    assert np.nanmax(err["translation_deg"].numpy()) < 2.0
    _, info = align_cameras(cams, sub)
    baseline = (sub.centers[0] - sub.centers[-1]).norm()
    assert info["center_error"].max() < 0.02 * baseline
