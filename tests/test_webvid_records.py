"""WebVid per-record work: CSV listing, decoding and its failure modes, SfM against ground truth."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from mvcustom.configs import PreprocessConfig, from_dict
from mvcustom.configs.preprocess import WebVidInputConfig
from mvcustom.geometry import Cameras, align_cameras, relative_pose_errors
from pipelines.webvid_records import (
    RecordError,
    build_webvid_clip,
    decode_clip,
    decode_frames,
    list_webvid_items,
)


@pytest.fixture()
def webvid_copy(sample_data, tmp_path):
    dst = tmp_path / "webvid"
    shutil.copytree(sample_data / "webvid", dst)
    return dst


def _rows(root):
    with open(root / "results_2M_train.csv", newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def test_listing_keeps_good_rows_and_records_bad_ones(webvid_copy):
    rows = _rows(webvid_copy)
    rows.append(
        {
            "videoid": "123",
            "contentUrl": "x",
            "duration": "PT00H00M01S",
            "page_dir": "",
            "name": "no page dir",
        }
    )
    rows.append(dict(rows[0]))  # duplicate id
    with open(webvid_copy / "results_2M_train.csv", "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (webvid_copy / "results_2M_val.csv").write_text("videoid,caption\n1,a\n")
    items, errors = list_webvid_items(str(webvid_copy), WebVidInputConfig())
    assert [i.id for i in items] == [r["videoid"] for r in rows[:2]]
    assert "Café" in items[0].caption  # verbatim, non-ASCII intact
    reasons = {e["id"]: e["reason"] for e in errors}
    assert "missing field(s) ['page_dir']" in reasons["results_2M_train.csv:4"]
    assert "duplicate videoid" in reasons["results_2M_train.csv:5"]
    assert "missing column(s) ['name', 'page_dir']" in reasons["results_2M_val.csv"]
    with pytest.raises(FileNotFoundError, match="no CSV matches"):
        list_webvid_items(str(webvid_copy), WebVidInputConfig(csv=["nothing_*.csv"]))


def test_decode_samples_at_target_fps(sample_data):
    items, _ = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig())
    frames, fps, idx = decode_frames(items[0].video, 4, 6.0)
    assert frames.shape == (4, 96, 160, 3) and fps == pytest.approx(12.0)
    assert idx == [0, 2, 4, 6]
    frames, _, idx = decode_frames(items[0].video, 12, None)
    assert idx == list(range(12))


def test_stored_frames_are_the_centre_crop_of_the_full_frames(sample_data):
    """The stored frames come from libavfilter on the YUV frame (no full-size RGB): the same
    frames, box and indices with or without full-size frames, and the PIL bicubic crop of the
    full-size RGB frames to within resampling noise."""
    from PIL import Image

    from mvcustom.geometry.crop import center_crop_box

    items, _ = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig())
    both = decode_clip(items[0].video, 4, 6.0, extra=2, stored_hw=(64, 64))
    alone = decode_clip(items[0].video, 4, 6.0, stored_hw=(64, 64), full=False)
    assert both.frames.shape == (6, 96, 160, 3) and both.stored.shape == (4, 64, 64, 3)
    assert alone.frames is None and np.array_equal(alone.stored, both.stored)
    assert alone.indices == both.indices[:4] == [0, 2, 4, 6] and alone.fps == both.fps
    assert both.size_hw == alone.size_hw == (96, 160)
    assert both.box == alone.box == center_crop_box(96, 160, 64, 64) == (32, 0, 96, 96)
    x0, y0, cw, ch = both.box
    pil = np.stack(
        [
            np.asarray(Image.fromarray(f[y0 : y0 + ch, x0 : x0 + cw]).resize((64, 64), Image.BICUBIC))
            for f in both.frames[:4]
        ]
    )
    diff = np.abs(pil.astype(float) - both.stored.astype(float))
    assert diff.mean() < 3.0, diff.mean()  # chroma is interpolated differently; the image is the same
    with pytest.raises(ValueError, match="full frames, stored_hw, or both"):
        decode_clip(items[0].video, 4, 6.0, full=False)


@pytest.mark.parametrize(
    ("hw", "target"), [((180, 320), (128, 128)), ((96, 160), (64, 96)), ((120, 90), (64, 64))]
)
def test_crop_resize_is_pixel_centre_aligned(hw, target):
    """Where a blob lands after the crop and resize is where the intrinsics say (corner-origin
    pixels scale by the resize factor; the camera model of Cameras.crop_resize): a sub-pixel
    shift in the resampler would be a shift of every stored pose's principal point."""
    import fractions

    import av

    from pipelines.webvid_records import _CropResize

    H, W = hw
    h, w = target
    cx, cy = W / 2 + 0.3, H / 2 - 0.3  # pixel-index coordinates (centre of pixel (0, 0) at 0, 0)
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    img = (30 + 200 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 5.0**2))).astype(np.uint8)
    frame = av.VideoFrame.from_ndarray(np.repeat(img[..., None], 3, -1), format="rgb24").reformat(
        format="yuv420p"
    )
    resize = _CropResize(frame, fractions.Fraction(1, 24), h, w)
    x0, y0, cw, ch = resize.box
    out = np.clip(resize(frame)[..., 1].astype(float) - 30, 0, None)
    oy, ox = np.mgrid[0:h, 0:w]
    got = ((out * ox).sum() / out.sum(), (out * oy).sum() / out.sum())
    # corner-origin u = index + 0.5 maps to (u - x0) * w / cw
    want = ((cx + 0.5 - x0) * w / cw - 0.5, (cy + 0.5 - y0) * h / ch - 0.5)
    assert np.allclose(got, want, atol=0.03), (got, want)
    small = av.VideoFrame.from_ndarray(np.zeros((H // 2 * 2 - 2, W, 3), np.uint8), format="rgb24").reformat(
        format="yuv420p"
    )
    with pytest.raises(RecordError, match="frame size changes mid-stream"):
        resize(small)


def test_decode_failures_are_record_errors(webvid_copy):
    items, _ = list_webvid_items(str(webvid_copy), WebVidInputConfig())
    video = items[0].video
    with pytest.raises(RecordError, match="fewer than clip.num_frames=16") as e:
        decode_frames(video, 16, 6.0)  # 1 s at 12 fps sampled at 6 fps -> 6 frames
    assert e.value.stage == "decode"
    data = open(video, "rb").read()
    open(video, "wb").write(data[: len(data) // 3])  # truncated
    with pytest.raises(RecordError) as e:
        decode_frames(video, 8, None)
    assert e.value.stage == "decode"
    open(video, "wb").close()  # zero-length
    with pytest.raises(RecordError, match="corrupt or unsupported video"):
        decode_frames(video, 2, None)
    with pytest.raises(RecordError, match="video not found") as e:
        decode_frames(str(webvid_copy / "videos" / "nope.mp4"), 2, None)
    assert e.value.stage == "read"


@pytest.mark.slow
def test_sfm_poses_match_ground_truth_after_alignment(sample_data):
    """The arc clip of the debug data: SfM (unknown focal) vs the renderer's cameras."""
    cfg = from_dict(
        PreprocessConfig,
        {
            "preset": "debug",
            "source": "webvid",
            "input": str(sample_data / "webvid"),
            "output": "unused",
            "clip": {"num_frames": 12, "height": 96, "width": 160},
            "webvid": {"target_fps": None},
            "sfm": {"overlap": 4},
        },
        "test",
    )
    items, _ = list_webvid_items(cfg.input, cfg.webvid)
    clip = build_webvid_clip(items[0], cfg)  # the arc clip ("Café-style interior — camera arcs ...")
    assert (
        clip.meta["pose_source"] == "pycolmap_sfm" and clip.meta["pose_quality"]["registered_fraction"] == 1.0
    )
    gt = np.load(sample_data / "ground_truth" / "webvid" / f"{items[0].id}.npz")
    true = Cameras(torch.from_numpy(gt["w2c"]), torch.from_numpy(gt["K"]), (96, 160))
    got = Cameras(
        torch.from_numpy(clip.extrinsics).double(), torch.from_numpy(clip.intrinsics).double(), (96, 160)
    )
    assert np.allclose(clip.extrinsics[0], np.eye(4), atol=1e-5)
    err = relative_pose_errors(got, true)
    _, info = align_cameras(got, true)
    baseline = (true.centers[0] - true.centers[-1]).norm()
    assert err["rotation_deg"].median() < 1.0, err["rotation_deg"]
    assert info["center_error"].max() < 0.1 * baseline
    assert abs(float(got.K[0, 0, 0] / true.K[0, 0, 0]) - 1) < 0.1  # focal recovered
    # the pose-quality diagnostics: the rotation span is gauge-free, so it must match the truth's
    from mvcustom.geometry.sfm import _rotation_span_deg

    q = clip.meta["pose_quality"]
    assert q["rotation_span_deg"] == pytest.approx(_rotation_span_deg(true), rel=0.05)
    assert _rotation_span_deg(true) > 5 and 0 < q["triangulation_angle_deg"] < 90


def _arc_clip(sample_data):
    """The debug data's arc clip, 12 frames of 96x160, and its true cameras."""
    item = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig(target_fps=None))[0][0]
    frames, _, idx = decode_frames(item.video, 12, None)
    gt = np.load(sample_data / "ground_truth" / "webvid" / f"{item.id}.npz")
    return frames, Cameras(torch.from_numpy(gt["w2c"][idx]), torch.from_numpy(gt["K"][idx]), (96, 160))


def test_a_clips_sfm_does_not_depend_on_what_ran_before(sample_data):
    """The arc clip's SfM, fresh and after the truck clip's in the same thread: the same
    cameras to the bit (sfm.seed is set per clip; COLMAP's RANSACs share a generator)."""
    from mvcustom.geometry.sfm import run_sfm

    frames, _ = _arc_clip(sample_data)
    truck = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig(target_fps=None))[0][1]
    cfg = from_dict(PreprocessConfig, {"preset": "debug", "sfm": {"overlap": 4}}, "test").sfm
    first = run_sfm(frames, cfg)
    run_sfm(decode_frames(truck.video, 12, None)[0], cfg)
    again = run_sfm(frames, cfg)
    assert first.ok and torch.equal(first.cameras.w2c, again.cameras.w2c)
    assert torch.equal(first.cameras.K, again.cameras.K)


def test_sfm_size_cap_returns_cameras_of_the_frames_as_given(sample_data):
    """sfm.max_image_size 150 shrinks the 96x160 frames to 90x150 for SfM (the true K given,
    shrunk with them); the cameras come back in pixels of the frames given: their size and
    exactly the K given, with rotations that match the renderer's."""
    from mvcustom.geometry.sfm import _cap_size, run_sfm

    frames, true = _arc_clip(sample_data)
    small, K = _cap_size(frames, 150, true.K[0])
    assert small.shape == (12, 90, 150, 3)
    assert torch.allclose(K[:2], true.K[0, :2] * 150 / 160) and K[2].tolist() == [0, 0, 1]
    assert _cap_size(frames, 160, None)[0] is frames  # already that small: untouched
    cfg = from_dict(
        PreprocessConfig, {"preset": "debug", "sfm": {"overlap": 4, "max_image_size": 150}}, "test"
    )
    res = run_sfm(frames, cfg.sfm, intrinsics=true.K[0])
    assert res.ok, res.reason
    assert res.cameras.image_hw.tolist() == [[96, 160]] * 12
    assert torch.allclose(res.cameras.K, true.K, atol=1e-9)
    assert relative_pose_errors(res.cameras, true)["rotation_deg"].median() < 1.0
    with pytest.raises(ValueError, match="sfm.max_image_size"):
        from_dict(PreprocessConfig, {"sfm": {"max_image_size": 8}}, "test")


def test_keyframe_map_places_the_frames_between_by_pnp(sample_data):
    """sfm.keyframe_stride 2 on the arc clip: the reconstruction sees every other frame and the
    last; each frame between is placed against its map by absolute pose (not interpolated),
    and those placed frames match the renderer's cameras as the keyframes do."""
    from mvcustom.geometry.sfm import keyframe_positions, run_sfm

    frames, true = _arc_clip(sample_data)
    cfg = from_dict(PreprocessConfig, {"preset": "debug", "sfm": {"overlap": 4}}, "test").sfm
    assert cfg.keyframe_stride == 2
    res = run_sfm(frames, cfg)
    assert res.ok, res.reason
    assert res.keyframes == keyframe_positions(12, 2) == [0, 2, 4, 6, 8, 10, 11]
    assert res.registered_frames == list(range(12)) and res.interpolated == []
    between = [i for i in range(12) if i not in res.keyframes]
    for subset in (res.keyframes, between):
        err = relative_pose_errors(res.cameras[subset], true[subset])
        assert err["rotation_deg"].median() < 1.0, (subset, err["rotation_deg"])
        assert np.nanmedian(err["translation_deg"].numpy()) < 10, (subset, err["translation_deg"])
    assert abs(float(res.cameras.K[0, 0, 0] / true.K[0, 0, 0]) - 1) < 0.1
    every = run_sfm(frames, dataclasses.replace(cfg, keyframe_stride=1))
    assert every.keyframes == list(range(12)) and every.registered == 12
    # fewer keyframes, fewer images in the map's bundle adjustment
    assert res.num_points < every.num_points


def test_match_descriptors_follows_colmap_rules():
    """Mutual nearest neighbours under the ratio test: a noisy, shuffled copy is matched back;
    a descriptor with two equally close candidates is left unmatched."""
    from mvcustom.geometry.sfm import _unit_rows, match_descriptors

    g = np.random.default_rng(0)
    d1 = _unit_rows(g.random((200, 128)) ** 4)
    perm = g.permutation(200)
    d2 = _unit_rows(d1[perm] + 0.003 * g.standard_normal((200, 128)))
    i, j = match_descriptors(d1, d2)
    assert len(i) > 180 and (perm[j] == i).all()
    twins = np.vstack([d1[:1], d1[:1]])  # two identical candidates: the ratio test rejects
    assert len(match_descriptors(d1[:1].repeat(2, 0), twins)[0]) == 0
    assert len(match_descriptors(d1[:1], d2)[0]) == 0  # fewer than two descriptors: nothing


def test_pose_quality_figure_predicts_the_error_and_flags_ill_posed_clips(sample_data):
    """The figure (1 / (1 + focal std / 5 %), from bundle adjustment's covariance) on the
    generator's clips: an arc seen over more frames (more rotation) scores higher; a sideways
    track (no rotation: the focal is unobservable) scores below every well-posed clip; across
    all of them the figure ranks the clips by their true focal error, which scales every
    rotation angle. sfm.min_quality flags the ill-posed ones, or drops them."""
    import json

    from scipy.stats import spearmanr

    from mvcustom.configs.preprocess import SfmConfig
    from mvcustom.geometry.sfm import run_sfm
    from pipelines.webvid_records import judge_pose_quality

    motion = {
        v["videoid"]: v["motion"]
        for v in json.loads((sample_data / "ground_truth" / "index.json").read_text())["webvid"]["videos"]
    }
    items, _ = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig())
    rows = []
    # partial reconstructions count here (the track registers 2 of its 5 keyframes at 8 frames):
    # what SfM makes of an ill-posed clip is what the figure must mark down
    cfg = SfmConfig(overlap=4, min_registered_fraction=0.25)
    for item in items:  # the arc clip, then the truck clip
        frames = decode_frames(item.video, 12, None)[0]
        gt = np.load(sample_data / "ground_truth" / "webvid" / f"{item.id}.npz")
        for n in (5, 8, 12):
            res = run_sfm(frames[:n], cfg)
            if not res.ok:  # a track may not initialise at all: that is a failure, not a pose
                continue
            true_f = float(gt["K"][0, 0, 0])
            rows.append((motion[item.id], n, res.score, abs(float(res.cameras.K[0, 0, 0]) / true_f - 1), res))
    arc = {n: score for m, n, score, _, _ in rows if m == "arc"}
    track = [score for m, _, score, _, _ in rows if m == "truck"]
    assert set(arc) == {5, 8, 12} and track, rows
    assert arc[5] < arc[8] < arc[12], rows
    assert max(track) < min(arc[8], arc[12]), rows
    rho = spearmanr([r[2] for r in rows], [r[3] for r in rows]).statistic
    assert rho < -0.6, (rho, rows)
    # the threshold flags or drops what scores below it (the best-scoring posed track)
    best_track = max((r for r in rows if r[0] == "truck"), key=lambda r: r[2])[4]
    assert judge_pose_quality(best_track, dataclasses.replace(cfg, min_quality=max(track) + 1e-6))["low"]
    with pytest.raises(RecordError, match="below sfm.min_quality"):
        judge_pose_quality(best_track, dataclasses.replace(cfg, min_quality=1.0, low_quality="drop"))


def test_sfm_failure_is_recorded_or_kept(sample_data, tmp_path):
    """A static shot (no parallax) cannot be reconstructed: an error record, or kept without poses."""
    from mvcustom.data.generator.webvid_writer import encode_h264
    from pipelines.webvid_records import WebVidItem

    items, _ = list_webvid_items(str(sample_data / "webvid"), WebVidInputConfig())
    frame = decode_frames(items[0].video, 1, None)[0][0]
    video = tmp_path / "static.mp4"
    video.write_bytes(encode_h264(np.stack([frame] * 8), 12, 18))
    item = WebVidItem("42", str(video), "static shot", None, "test:2")
    base = {
        "preset": "debug",
        "source": "webvid",
        "input": str(tmp_path),
        "output": "unused",
        "webvid": {"target_fps": None},
    }
    with pytest.raises(RecordError) as e:
        build_webvid_clip(item, from_dict(PreprocessConfig, base, "t"))
    assert e.value.stage == "sfm"
    clip = build_webvid_clip(item, from_dict(PreprocessConfig, base, "t", ["sfm.keep_failed=true"]))
    assert clip.meta["pose_source"] is None and clip.intrinsics is None and clip.meta["pose_failure"]


def test_url_column_locates_videos(webvid_copy):
    rows = _rows(webvid_copy)
    for r in rows:
        r["contentUrl"] = f"file://{webvid_copy}/videos/{r['page_dir']}/{r['videoid']}.mp4"
        r["page_dir"] = ""  # not needed when the URL column is used
    with open(webvid_copy / "results_2M_train.csv", "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    items, errors = list_webvid_items(str(webvid_copy), WebVidInputConfig(use_url_column=True))
    assert not errors and len(items) == 2
    frames, _, _ = decode_frames(items[0].video, 4, None)
    assert frames.shape[0] == 4


@pytest.mark.parametrize(
    ("motion", "low", "high"), [("dolly", 0.9, 1.0), ("orbit", 0.0, 0.3), ("truck", 0.0, 0.1)]
)
def test_forward_motion_figure_on_true_camera_paths(motion, low, high):
    """The forward-motion figure of the generator's exact camera paths: a dolly moves along its
    view, an orbit and a track across it (SfM's wrong dolly reconstructions still show ~0.5,
    above sfm.max_forward_motion = 0.4: benchmarks/sfm_accuracy.py)."""
    from mvcustom.data.generator.webvid_writer import clip_cameras
    from mvcustom.geometry.sfm import _forward_motion

    for seed in range(3):
        cams = clip_cameras(torch.Generator().manual_seed(seed), motion, 16, (192, 320))
        assert low <= _forward_motion(cams) <= high, (motion, seed, _forward_motion(cams))


_DECODE_ONLY_SHARD = """
import sys
from mvcustom.configs import PreprocessConfig, load_config
from pipelines.preprocess import build_samples, commit
from pipelines.sources import get_source

cfg = load_config(PreprocessConfig, "jobs/configs/preprocess_webvid_debug.yaml", sys.argv[1:])
items, _ = get_source(cfg.source).list(cfg)
row = commit(build_samples(0, items[:2], cfg), cfg)
print(row["samples"], "torch" in sys.modules)
"""


def test_a_decode_only_shard_imports_no_torch(sample_data, tmp_path):
    """A WebVid shard without SfM or depth, built and committed as a shard worker does: torch
    is never imported (0.8-2 s in every worker of a job that runs no model)."""
    import subprocess
    import sys
    from pathlib import Path

    sets = [f"input={sample_data / 'webvid'}", f"output={tmp_path / 'out'}", "estimate_poses=false"]
    sets += ["estimate_depth=false", "mlflow.enabled=false"]
    out = subprocess.run(
        [sys.executable, "-c", _DECODE_ONLY_SHARD, *sets],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["2", "False"], out.stdout
