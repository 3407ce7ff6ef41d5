"""Ground truth at requested cameras (mvcustom.data.generator.truth) and the fidelity metrics
(mvcustom.metrics.fidelity), each against an answer it did not produce: the true view against
the dataset's own image files (written by the generator, read back through preprocessing's crop,
resize and scene normalisation), PSNR and SSIM against their closed forms."""

from __future__ import annotations

import glob
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def clip_and_truth(tmp_path_factory):
    from mvcustom.configs import PreprocessConfig, SampleDataConfig, from_dict
    from mvcustom.configs.sample_data import Co3dSampleConfig
    from mvcustom.training.data import sample_stream
    from pipelines.preprocess import preprocess_inline

    tmp = tmp_path_factory.mktemp("truth")
    co3d = Co3dSampleConfig(
        categories=["teddybear"],
        sequences_per_category=1,
        frames_per_sequence=10,
        image_sizes=[(120, 160)],
        depth_hole_fraction=0.0,
    )
    from mvcustom.data.generator import generate_sample_data

    generate_sample_data(str(tmp / "raw"), SampleDataConfig(seed=5, co3d=co3d, write_webvid=False))
    prep = {
        "preset": "debug",
        "source": "co3d",
        "input": str(tmp / "raw" / "co3d"),
        "output": str(tmp / "shards"),
        "clip": {"num_frames": 6, "height": 48, "width": 64},
        "co3d": {"depth": "dataset"},
    }
    assert preprocess_inline(from_dict(PreprocessConfig, prep, "test"))["clips_written"] >= 1
    clip = next(sample_stream(str(tmp / "shards" / "*.tar"), 0, 0, 1, 1))
    return tmp, clip


def _clip_cameras(clip, hw):
    from mvcustom.geometry.camera import Cameras

    return Cameras(clip["extrinsics"].double(), clip["intrinsics"].double(), (48, 64)).resize(*hw)


def _db(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def test_the_true_view_at_a_clips_cameras_is_the_datasets_photograph(clip_and_truth):
    """The clip's cameras (normalised world, float32 in the shard) scaled back to the dataset's
    160x120, rendered and JPEG-encoded as the generator's writer does, give the dataset's own
    image files; a mapping that ignores the clip's scene scale does not."""
    from dataclasses import replace

    from mvcustom.data.generator.co3d_writer import _jpg
    from mvcustom.data.generator.truth import SubjectTruth, true_views

    tmp, clip = clip_and_truth
    meta = clip["meta"]
    truth = SubjectTruth.from_clip_meta(str(tmp / "raw" / "ground_truth"), meta)
    files = sorted(glob.glob(str(tmp / "raw" / "co3d" / "teddybear" / meta["sequence"] / "images" / "*.jpg")))
    photos = np.stack([np.asarray(Image.open(files[i])) for i in meta["frame_indices"]])
    cams = _clip_cameras(clip, (120, 160))

    rgb, fg = true_views(truth, cams, supersample=1)
    jpeg = np.stack([np.asarray(Image.open(io.BytesIO(_jpg(x)))) for x in rgb])
    exact = np.mean(jpeg == photos)
    assert exact > 0.99, f"{100 * exact:.2f}% of the pixels equal the dataset's"
    masks = sorted(glob.glob(str(tmp / "raw" / "co3d" / "teddybear" / meta["sequence"] / "masks" / "*.png")))
    true_masks = np.stack([np.asarray(Image.open(masks[i])) > 127 for i in meta["frame_indices"]])
    assert np.mean(fg == true_masks) > 0.995

    wrong = replace(truth, scene_scale=1.0)
    rgb_wrong, _ = true_views(wrong, cams, supersample=1)
    jpeg_wrong = np.stack([np.asarray(Image.open(io.BytesIO(_jpg(x)))) for x in rgb_wrong])
    assert np.mean(jpeg_wrong == photos) < 0.5


def test_the_supersampled_truth_matches_the_shards_frames(clip_and_truth):
    """At the shard's size the antialiased truth is close to the shard's frames (resized from
    JPEGs), much closer than the truth at the next camera along the clip."""
    from mvcustom.data.generator.truth import SubjectTruth, true_views

    tmp, clip = clip_and_truth
    truth = SubjectTruth.from_clip_meta(str(tmp / "raw" / "ground_truth"), clip["meta"])
    rgb, fg = true_views(truth, _clip_cameras(clip, (48, 64)))
    shard = ((clip["frames"].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    same, shifted = _db(rgb, shard), _db(np.roll(rgb, 1, axis=0), shard)
    assert same > 19 and same > shifted + 5, (same, shifted)
    assert np.mean(fg == (clip["mask"].squeeze(1).numpy() > 0.5)) > 0.99


def test_truth_refuses_what_it_cannot_render(clip_and_truth, tmp_path):
    from mvcustom.data.generator.truth import SubjectTruth, true_views

    tmp, clip = clip_and_truth
    with pytest.raises(ValueError, match="CO3D clip from the generator"):
        SubjectTruth.from_clip_meta(str(tmp), {"source": "webvid", "caption": "x"})
    truth = SubjectTruth.from_clip_meta(str(tmp_path), clip["meta"])
    with pytest.raises(FileNotFoundError, match="generator's ground_truth folder"):
        true_views(truth, _clip_cameras(clip, (48, 64)))
    old = tmp_path / "co3d" / "teddybear"
    old.mkdir(parents=True)
    np.savez(old / f"{clip['meta']['sequence']}.npz", w2c=np.eye(4)[None])
    with pytest.raises(ValueError, match="older generator"):
        true_views(truth, _clip_cameras(clip, (48, 64)))


def test_psnr_and_ssim_against_their_closed_forms():
    from mvcustom.metrics.fidelity import psnr, ssim, truth_scores

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 32, generator=g) * 2 - 1
    # a uniform error e: PSNR = 10 log10(range^2 / e^2)
    assert float(psnr(x + 0.1, x)) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)
    mask = torch.zeros(2, 1, 24, 32, dtype=torch.bool)
    mask[:, :, :12] = True
    y = x.clone()
    y[:, :, 12:] += 0.5  # only outside the mask
    assert float(psnr(y, x, mask)) > 100
    # constant images u, v: SSIM's contrast-structure term is c2 / c2, so SSIM is the luminance
    # term (2uv + c1) / (u^2 + v^2 + c1)
    u, v, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    a, b = (torch.full((1, 3, 16, 16), w, dtype=torch.float64) for w in (u, v))
    assert float(ssim(a, b)) == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1), rel=1e-9)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-12)
    noisy = [float(ssim(x + s * torch.randn(x.shape, generator=g), x)) for s in (0.05, 0.2, 0.8)]
    assert noisy[0] > noisy[1] > noisy[2]

    u8 = ((x[:1].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    sub = np.zeros(u8.shape[:3], bool)
    sub[:, 4:10, 4:10] = True
    worse = u8.copy()
    worse[:, 4:10, 4:10] = 255 - worse[:, 4:10, 4:10]
    s = truth_scores(worse, u8, sub)
    assert s["psnr_truth_subject"] < s["psnr_truth"] < 100
    assert s["truth_subject_fraction"] == pytest.approx(36 / (24 * 32))
    assert truth_scores(u8, u8, np.zeros_like(sub))["psnr_truth_subject"] is None


def test_evaluation_scores_a_subject_against_its_true_views(clip_and_truth, tmp_path, monkeypatch):
    """Through the evaluation's own generation and scoring (no Ray): a subject with
    ``ground_truth`` gets the truth columns, its true views and a truth grid. A generator that
    draws the true view at each requested camera (an oracle standing in for a perfect model)
    scores near-perfect fidelity; the same frames in reverse order score far lower, so the
    columns measure the requested cameras, not the subject's look."""
    import json

    import yaml

    from mvcustom.configs import EvaluateConfig, from_dict
    from mvcustom.configs.base import to_dict
    from mvcustom.data.generator.truth import SubjectTruth, true_views
    from mvcustom.inference.pipeline import MVCustomOutput, MVCustomPipeline
    from mvcustom.models import MVCustomModel
    from mvcustom.models.mvcustom import MVCustomConfig
    from pipelines.evaluation.generate import GenerateSamples
    from pipelines.evaluation.report import write_report
    from pipelines.evaluation.score import ScoreSamples, aggregate
    from pipelines.evaluation.spec import load_spec

    data, clip = clip_and_truth
    truth = SubjectTruth.from_clip_meta(str(data / "raw" / "ground_truth"), clip["meta"])
    MVCustomModel.tiny(MVCustomConfig(), seed=0).save_pretrained(str(tmp_path / "model"))
    spec = {
        "subjects": [
            {"name": "teddy", "shards": str(data / "shards"), "ground_truth": truth.ground_truth},
            {"name": "plain", "shards": str(data / "shards")},
        ],
        "prompts": ["a photo of a teddybear"],
        "trajectories": [{"name": "arc", "kind": "arc", "span_deg": 60}],
        "variants": {"oracle": {}, "reversed": {"anchors": [0, 3]}},  # anchors: only a tag here
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = load_spec(str(tmp_path / "spec.yaml"), 2)

    def oracle(self, prompt, cameras, refs, *, options, **kwargs):
        rgb, _ = true_views(truth, cameras)
        return MVCustomOutput((rgb[::-1] if options.anchors == (0, 3) else rgb)[None].copy(), [{}])

    monkeypatch.setattr(MVCustomPipeline, "__call__", oracle)
    raw = {
        **to_dict(EvaluateConfig.debug()),
        "model": str(tmp_path / "model"),
        "output": str(tmp_path / "eval"),
    }
    cfg = to_dict(from_dict(EvaluateConfig, raw, "test"))
    metas = [GenerateSamples(cfg).generate(r) for r in rows]
    assert [json.loads(m["subject_truth"]) if m["subject_truth"] else None for m in metas][:2] == [
        {**truth.__dict__}
    ] * 2
    scorer = ScoreSamples(cfg)
    res = {m["sample_id"]: scorer.score(m) for m in metas}
    good, bad = res["teddy-oracle-arc-p0-s0"], res["teddy-reversed-arc-p0-s0"]
    assert good["psnr_truth"] > 40 and good["ssim_truth"] > 0.99 and good["identity_truth"] < 1e-6
    assert good["psnr_truth_subject"] > 40 and 0 < good["truth_subject_fraction"] < 1
    assert bad["psnr_truth"] < good["psnr_truth"] - 20 and bad["ssim_truth"] < good["ssim_truth"] - 0.2
    assert bad["identity_truth"] > good["identity_truth"]
    assert "psnr_truth" not in res["plain-oracle-arc-p0-s0"]  # no ground truth, no truth columns
    sample = tmp_path / "eval" / "samples" / "teddy-oracle-arc-p0-s0"
    assert (sample / "truth_003.png").is_file() and (sample / "truth_grid.png").is_file()

    import pandas as pd

    results = pd.DataFrame(list(res.values()))
    table = aggregate(results)
    assert {"psnr_truth_mean", "ssim_truth_subject_mean", "identity_truth_mean"} <= set(table.columns)
    page = open(write_report(str(tmp_path / "eval"), results, table)).read()
    assert "<h2 id='truth'>" in page and "PSNR subj. ↑" in page and "truth_grid.png" in page


def test_a_depth_stand_in_learns_the_generators_depth_and_declares_its_input_size(clip_and_truth, tmp_path):
    """The micro-reproduction's depth stand-in: a tiny random ZoeDepth trained on a clip's exact
    depths (scene units) lowers its error there; saved, its folder declares the input size it
    was trained at, which DepthEstimator (and so the inference pipeline) then uses."""
    from transformers import ZoeDepthForDepthEstimation

    from mvcustom.models.zoedepth import PROCESSOR_INPUT_SIZE, DepthEstimator, tiny_zoedepth_config
    from mvcustom.training.standins import save_depth_model, train_depth

    _, clip = clip_and_truth
    torch.manual_seed(0)
    model = ZoeDepthForDepthEstimation(tiny_zoedepth_config())
    figures = train_depth(model, clip["frames"], clip["depth"].float(), steps=60, input_size=(64, 64))
    assert figures["depth_abs_rel"] < 0.75 * figures["depth_abs_rel_before"], figures
    folder = save_depth_model(model, str(tmp_path / "depth"), (64, 64))
    assert DepthEstimator(folder, device="cpu").input_size == (64, 64)
    model.save_pretrained(str(tmp_path / "plain"))  # no preprocessor_config.json: the real default
    assert DepthEstimator(str(tmp_path / "plain"), device="cpu").input_size == PROCESSOR_INPUT_SIZE


def test_the_generator_takes_large_seeds():
    """A sample seed above ~26 overflowed the texture hash (int64) and crashed the generator."""
    from mvcustom.data.generator.scene import render
    from mvcustom.data.generator.subjects import make_scene
    from mvcustom.geometry.trajectories import orbit

    for seed in (101 * 1_000_003, 2**40 + 5):
        rend = render(make_scene("car", seed, seed), orbit(1, image_hw=(16, 16)))
        assert rend.foreground.any() and rend.rgb.float().std() > 0
