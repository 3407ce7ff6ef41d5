"""Inference strategies (issue 6): depth-scale alignment, feature rendering, latent completion
and ``MVCustomPipeline`` end to end with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvcustom.data.generator.scene import render
from mvcustom.data.generator.subjects import make_scene, make_subject, subject_extent
from mvcustom.geometry.trajectories import orbit
from mvcustom.inference.feature_rendering import (
    FeatureRenderer,
    FeatureRenderingHook,
    median_scale,
    search_depth_scale,
)
from mvcustom.inference.latent_completion import complete_latents, predict_x0, renoise

H, W = 48, 64


@pytest.fixture(scope="module")
def scene_views():
    """Six exact views on a 100-degree arc around a chair (frame 0 = anchor)."""
    c, r = subject_extent(make_subject("chair", 5))
    cams = orbit(6, radius=3 * r, elevation_deg=25, span_deg=100, target=tuple(c.tolist()), image_hw=(H, W))
    return cams, render(make_scene("chair", 5, 6), cams)


# ---------------------------------------------------------------------------- depth scale
def test_median_scale_is_exact_for_a_pure_scale_error():
    depth = torch.rand(8, 8, dtype=torch.float64) + 0.5
    assert median_scale(depth, 1.7 * depth) == pytest.approx(1.7)
    with pytest.raises(ValueError, match="no pixel"):
        median_scale(depth, depth, torch.zeros(8, 8, dtype=torch.bool))


def test_scale_search_recovers_a_known_scale_error(scene_views):
    """ZoeDepth-like depth off by 1/1.3; the median guess (against a biased reference depth) is
    off by 15% more; the ±40% search against the other views' masks finds 1.3 again."""
    cams, rd = scene_views
    true_scale = 1.3
    estimate = rd.depth[0] / true_scale
    guess = median_scale(estimate, rd.depth[0] * 1.15, rd.foreground[0])
    assert guess == pytest.approx(true_scale * 1.15)
    best, scales, scores = search_depth_scale(
        estimate, cams[0], rd.foreground[0], cams[2:], rd.foreground[2:], init=guess, search=0.4, steps=41
    )
    step = float(scales[1] - scales[0])
    assert abs(best - true_scale) <= step, (best, scores.max())
    # IoU < 1: the references also see sides the anchor does not; the peak is still sharp
    assert scores.max() > 0.5 and scores[0] < 0.5 * scores.max() and scores[-1] < 0.5 * scores.max()
    with pytest.raises(ValueError, match="search"):
        search_depth_scale(estimate, cams[0], rd.foreground[0], cams[2:], rd.foreground[2:], search=1.5)


# ---------------------------------------------------------------------------- feature rendering
def test_renderer_moves_anchor_features_to_where_the_target_sees_them(scene_views):
    cams, rd = scene_views
    renderer = FeatureRenderer(rd.depth[:1], cams, [0])
    frames = rd.rgb.permute(0, 3, 1, 2).double().unsqueeze(0) / 255  # (1, F, 3, H, W)
    out = renderer.replace(frames)
    covered = renderer.render_map(H, W).covered
    assert not covered[0].any() and torch.equal(out[0, 0], frames[0, 0])  # the anchor keeps its own
    assert torch.equal(
        out[0][~covered.unsqueeze(1).expand_as(out[0])], frames[0][~covered.unsqueeze(1).expand_as(out[0])]
    )
    # a feature map linear in the pixel position (bilinear sampling reproduces it exactly): the
    # anchor position rendered at each target pixel is where the target's true 3D point
    # projects into the anchor
    uv = cams[0].pixel_grid(1).permute(2, 0, 1)  # (2, H, W)
    feats = torch.zeros(1, 6, 2, H, W, dtype=torch.float64)
    feats[0, 0] = uv
    seen_at, z = cams[0].project(rd.points[1:].reshape(-1, 3))
    seen_at = seen_at.reshape(5, H, W, 2).permute(0, 3, 1, 2)
    # ... on the pixels whose point the anchor really sees (nothing nearer there in the anchor)
    u = seen_at[:, 0].nan_to_num(-1).clamp(0, W - 1).long()
    v = seen_at[:, 1].nan_to_num(-1).clamp(0, H - 1).long()
    nearest = torch.nn.functional.max_pool2d(rd.depth[:1].unsqueeze(0), 3, 1, 1)[0, 0]
    seen = z.reshape(5, H, W) <= 1.02 * nearest[v, u]
    rendered = renderer.replace(feats)[0, 1:]
    err = (rendered - seen_at).norm(dim=1)[covered[1:] & rd.foreground[1:] & seen]
    assert err.numel() > 500
    # (a convention slip, half a pixel or a scale, would move the median; the rest is thin chair
    # parts seen at grazing angles, whose torn triangles let the background through; the exact
    # geometry is tested in test_rendering.py)
    assert err.median() < 0.1 and (err < 1).float().mean() > 0.75, (
        float(err.median()),
        float((err < 1).float().mean()),
    )
    # coarser feature maps use the same geometry
    small = renderer.render_map(H // 4, W // 4)
    assert small.source.shape == (6, H // 4, W // 4)
    assert abs(small.covered[1].float().mean() - covered[1].float().mean()) < 0.1


def test_two_anchors_cover_more_of_the_path(scene_views):
    cams, rd = scene_views
    one = FeatureRenderer(rd.depth[:1], cams, [0])
    two = FeatureRenderer(rd.depth[[0, 5]], cams, [0, 5])
    f1, f2 = one.covered_fraction(H // 4, W // 4), two.covered_fraction(H // 4, W // 4)
    assert f2 > f1 + 0.05, (f1, f2)
    # the far end of the arc is seen mostly through the second anchor
    src = two.render_map(H // 4, W // 4).source
    assert (src[4] == 1).sum() > (src[4] == 0).sum()


def test_renderer_rejects_bad_input(scene_views):
    cams, rd = scene_views
    with pytest.raises(ValueError, match="anchors"):
        FeatureRenderer(rd.depth[:1], cams, [9])
    with pytest.raises(ValueError, match="depths"):
        FeatureRenderer(rd.depth[:2], cams, [0])
    with pytest.raises(ValueError, match="pixels"):
        FeatureRenderer(rd.depth[:1, :, :32], cams, [0])


def test_hook_replaces_only_covered_tokens_and_only_while_active(scene_views):
    cams, rd = scene_views
    renderer = FeatureRenderer(rd.depth[:1], cams, [0])
    Fr, C, h, w = 6, 5, H // 8, W // 8
    hook = FeatureRenderingHook(renderer, Fr, (h, w))
    tokens = torch.randn(2 * Fr, h * w, C)  # two clips (the CFG halves)
    assert hook(None, None, tokens) is None  # inactive: the block's output stands
    hook.active = True
    out = hook(None, None, tokens)
    covered = renderer.render_map(h, w).covered.reshape(Fr, h * w)
    x, y = tokens.reshape(2, Fr, h * w, C), out.reshape(2, Fr, h * w, C)
    assert torch.equal(x[:, ~covered], y[:, ~covered])
    assert covered.any() and not torch.allclose(x[:, covered], y[:, covered])
    # each clip's rendered tokens come from its own anchor frame
    alt = tokens.clone()
    alt[Fr:] = torch.randn(Fr, h * w, C)
    y2 = hook(None, None, alt).reshape(2, Fr, h * w, C)
    assert torch.equal(y2[0], y[0]) and not torch.equal(y2[1][covered], y[1][covered])


# ---------------------------------------------------------------------------- latent completion
def test_latent_completion_changes_only_uncovered_latents():
    from mvcustom.models.components import SD_SCHEDULER
    from mvcustom.models.schedule import build_scheduler

    sched = build_scheduler(SD_SCHEDULER)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    latents, x0 = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    covered = torch.rand(4, 8, 8, generator=g) > 0.4
    t = sched.timesteps[3]
    out = complete_latents(latents, x0, covered, sched, t, torch.Generator().manual_seed(1))
    keep = covered.unsqueeze(0).unsqueeze(2).expand_as(latents)
    assert torch.equal(out[keep], latents[keep])
    assert not torch.isclose(out[~keep], latents[~keep]).any()
    # the replaced values are x0 at the timestep's noise level: q(x_t | x0)
    a = sched.alphas_cumprod[int(t)]
    again = renoise(sched, x0, t, torch.Generator().manual_seed(1))
    assert torch.equal(out[~keep], again[~keep])
    noise = (again - a.sqrt() * x0) / (1 - a).sqrt()
    assert abs(float(noise.std()) - 1) < 0.1
    # predict_x0 inverts the forward process for every prediction type
    eps = torch.randn_like(x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(predict_x0(sched, xt, eps, t), x0, atol=1e-4)
    with pytest.raises(ValueError, match="mask"):
        complete_latents(latents, x0, covered[:, :4], sched, t)


# ---------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def pipe():
    from mvcustom.inference.pipeline import MVCustomPipeline
    from mvcustom.models import MVCustomModel

    model = MVCustomModel.tiny(seed=0)
    pipe = MVCustomPipeline(model, depth_estimator=lambda x: np.full(x.shape[:3], 2.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _path():
    from mvcustom.inference.pipeline import ReferenceViews

    cams = orbit(4, radius=2.0, span_deg=40, image_hw=(32, 32))
    refcams = orbit(2, radius=2.0, span_deg=90, start_azimuth_deg=100, image_hw=(32, 32))
    rng = np.random.default_rng(0)
    refs = ReferenceViews(
        rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), refcams, np.ones((2, 32, 32), bool)
    )
    return cams, refs


def test_pipeline_generates_with_rendering_and_completion(pipe):
    from mvcustom.inference.pipeline import InferenceOptions

    cams, refs = _path()
    opts = InferenceOptions(feature_rendering_steps=3, completion_until_step=2)

    def run(o, seed=0, **kw):
        g = torch.Generator().manual_seed(seed)
        return pipe("a <sks> toy", cams, refs, num_inference_steps=4, generator=g, options=o, **kw)

    out = run(opts, output_type="np", return_debug=True)
    assert out.frames.shape == (1, 4, 32, 32, 3) and out.frames.dtype == np.uint8
    info = out.debug[0]
    assert info["anchors"] == [0] and info["anchor_depth"].shape == (1, 32, 32)
    assert info["coverage"].shape == (4, 4, 4) and 0 < info["covered_fraction"] <= 1
    assert info["depth_scale_source"].startswith(("featurenerf", "none"))
    again = run(opts, output_type="np")
    assert np.array_equal(again.frames, out.frames)  # seeded: reproducible
    plain = run(InferenceOptions(feature_rendering=False), output_type="np")
    assert not np.array_equal(plain.frames, out.frames)
    # the anchor frame is the anchor pass's frame, replayed at every step: the depth is of it
    diff = np.abs(out.frames[0, 0].astype(int) - info["anchor_images"][0])
    assert diff.max() <= 1  # (decoded in a different batch: float rounding only)
    # a shorter anchor pass, replayed through the forward process: the anchor frame is still
    # the anchor pass's own, the rest of the clip follows it
    short = run(
        InferenceOptions(feature_rendering_steps=3, completion_until_step=2, anchor_steps=2),
        output_type="np",
        return_debug=True,
    )
    diff = np.abs(short.frames[0, 0].astype(int) - short.debug[0]["anchor_images"][0])
    assert diff.max() <= 1 and not np.array_equal(short.frames, out.frames)
    with pytest.raises(ValueError, match="anchor_steps"):
        run(InferenceOptions(anchor_steps=5))
    pil = run(opts)
    assert len(pil.frames) == 1 and pil.frames[0][0].size == (32, 32)
    with pytest.raises(ValueError, match="anchors"):
        run(InferenceOptions(anchors=(7,)))
    for bad in ((30, 32), (64, 96)):  # 64x96: the 1x2 deepest map has non-square cells
        with pytest.raises(ValueError, match="does not tile"):
            pipe("x", orbit(2, image_hw=bad), None, num_inference_steps=2)


def test_pipeline_needs_a_depth_model_for_rendering(pipe):
    from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline

    cams, refs = _path()
    bare = MVCustomPipeline(pipe.model, pipe.scheduler)
    bare.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="depth estimator"):
        bare(
            "x",
            cams,
            refs,
            num_inference_steps=2,
            options=InferenceOptions(feature_rendering_steps=1, completion_until_step=1),
        )


def test_pipeline_from_pretrained_round_trip(pipe, tmp_path):
    from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline
    from mvcustom.models.zoedepth import save_tiny_zoedepth

    pipe.save_pretrained(str(tmp_path / "model"))
    zoe = save_tiny_zoedepth(str(tmp_path / "zoe"))
    loaded = MVCustomPipeline.from_pretrained(str(tmp_path / "model"), depth_model=zoe, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    cams, refs = _path()
    opts = InferenceOptions(feature_rendering=False)
    a = pipe(
        "a toy",
        cams,
        refs,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        options=opts,
        output_type="pt",
    )
    b = loaded(
        "a toy",
        cams,
        refs,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        options=opts,
        output_type="pt",
    )
    assert torch.allclose(a.frames, b.frames, atol=1e-5)
    out = loaded(
        "a toy",
        cams,
        refs,
        num_inference_steps=2,
        options=InferenceOptions(feature_rendering_steps=1, completion_until_step=1),
        output_type="np",
        return_debug=True,
    )
    assert out.debug[0]["anchor_depth"].min() > 0  # the tiny ZoeDepth ran on the anchor


def test_model_cpu_offload_runs_the_same_pipeline(pipe):
    """diffusers' enable_model_cpu_offload over the pipeline's components (text encoder, UNet,
    VAE in turn; the additions kept on the device). On CPU the device is the CPU itself, so this
    checks the wiring (hooks, execution device, tensors following them): the same frames, up to
    float rounding (the hooks' tensor moves may change memory layouts, so kernels: 2.5e-5 here,
    which can flip a uint8 pixel; a wiring fault changes frames by far more)."""
    import copy

    from mvcustom.inference.pipeline import InferenceOptions

    cams, refs = _path()
    opts = InferenceOptions(feature_rendering_steps=2, completion_until_step=1)

    def run(p):
        g = torch.Generator().manual_seed(0)
        return p(
            "a <sks> toy", cams, refs, num_inference_steps=3, generator=g, options=opts, output_type="pt"
        )

    base = run(pipe)
    offloaded = copy.deepcopy(pipe)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert {"text_encoder", "unet", "vae"} <= {
        n for n, m in offloaded.components.items() if hasattr(m, "_hf_hook")
    }
    assert not hasattr(offloaded.components["mvcustom"], "_hf_hook")  # kept on the device
    assert offloaded._execution_device.type == "cpu" and offloaded.model.device.type == "cpu"
    assert torch.allclose(run(offloaded).frames, base.frames, atol=1e-4)


def test_depth_alignment_looks_from_the_anchor_camera(pipe, monkeypatch):
    """The depth-scale search projects the first anchor's depth from *that anchor's* camera.
    It used to index the anchors' cameras by frame index: ``anchors=(1, 2)`` searched from frame
    2's camera and ``anchors=(3,)`` from an empty set of cameras."""
    import mvcustom.inference.pipeline as pipeline_module
    from mvcustom.geometry.camera import Cameras
    from mvcustom.inference.pipeline import InferenceOptions

    cams, refs = _path()
    seen: list[Cameras] = []
    real = pipeline_module.search_depth_scale

    def spy(depth, camera, *args, **kwargs):
        seen.append(camera)
        return real(depth, camera, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "search_depth_scale", spy)
    for anchors in ((1, 2), (3,)):
        # threshold 0: the untrained FeatureNeRF's opacity marks every pixel, so the search runs
        opts = InferenceOptions(
            anchors=anchors, feature_rendering_steps=1, completion_until_step=1, opacity_threshold=0.0
        )
        out = pipe(
            "a toy", cams, refs, num_inference_steps=2, options=opts, output_type="np", return_debug=True
        )
        assert out.debug[0]["depth_scale_source"] == "featurenerf median + mask search"
        assert len(seen[-1]) == 1 and torch.equal(seen[-1].w2c, cams[anchors[0]].w2c), anchors
    with pytest.raises(IndexError, match="camera index 4 out of range for 4 cameras"):
        cams[4]
    assert torch.equal(cams[-1].w2c, cams.w2c[3:])
