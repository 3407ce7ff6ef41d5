"""The model library at tiny sizes: STT, camera conditioning, FeatureNeRF, textual inversion,
objective, save/load (issue 4)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mvcustom.geometry.camera import Cameras, look_at
from mvcustom.geometry.trajectories import orbit
from mvcustom.models.attention import (
    SpatioTemporalAttnProcessor,
    radius_at,
    reference_spatio_temporal_attention,
    spatio_temporal_attention,
)
from mvcustom.models.featurenerf import FeatureNeRF, gather_reference_features, target_rays, volume_render
from mvcustom.models.mvcustom import ClipCameras, MVCustomConfig, MVCustomModel, References
from mvcustom.models.objective import (
    diffusion_loss,
    prediction_target,
    set_trainable,
    trainable_parameters,
)
from mvcustom.models.schedule import build_scheduler

IMAGE = (64, 64)  # frames; latents 8x8


def clip_cameras(num: int, radius: float = 1.0, start_deg: float = 0.0, span: float = 90.0) -> ClipCameras:
    cams = orbit(num, image_hw=IMAGE, radius=radius, start_azimuth_deg=start_deg, span_deg=span)
    return ClipCameras(cams.w2c[None].float(), cams.K[None].float(), IMAGE)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give zero-initialised layers (merges, fusion halves) random values so paths are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def tiny_model() -> MVCustomModel:
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["teddy"]))
    return model.eval()


# ---------------------------------------------------------------------------- STT
@pytest.mark.parametrize("hw", [(5, 7), (6, 6), (3, 4)])
@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("tile", [None, 2, 4])
def test_windowed_attention_matches_dense_reference(hw, radius, tile):
    g = torch.Generator().manual_seed(radius)
    q, k, v = (torch.randn(2, 3, *hw, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = spatio_temporal_attention(q, k, v, radius, tile=tile)
    ref = reference_spatio_temporal_attention(q, k, v, radius)
    assert torch.allclose(out, ref, atol=1e-12)
    # and it is not trivially the temporal or the full answer
    assert not torch.allclose(out, spatio_temporal_attention(q, k, v, 0), atol=1e-6)


def test_full_radius_is_full_3d_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 5, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    flat = [x.reshape(1, 2, -1, 8) for x in (q, k, v)]
    scores = torch.softmax(flat[0] @ flat[1].transpose(-1, -2) / math.sqrt(8), -1)
    expected = (scores @ flat[2]).reshape(q.shape)
    for r in (-1, 4, 100):
        assert torch.allclose(spatio_temporal_attention(q, k, v, r), expected, atol=1e-12)


def test_radius_schedule():
    sched = [(0, 0), (10, 1), (30, -1)]
    assert [radius_at(sched, s) for s in (0, 9, 10, 29, 30, 10_000)] == [0, 0, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="step 0"):
        radius_at([(5, 1)], 0)


def test_radius_zero_equals_stock_animatediff(tiny_model):
    """Same weights, our processors + hooks at r=0 vs the untouched diffusers motion UNet."""
    from mvcustom.models.components import tiny_components

    stock = tiny_components(seed=0).unet.eval()  # same seed -> same weights as tiny_model's UNet
    ours = tiny_model
    stock.load_state_dict(ours.unet.state_dict())
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        expected = stock(latents.permute(0, 2, 1, 3, 4), torch.tensor([400]), text.repeat(4, 1, 1)).sample
        got = ours(latents, torch.tensor([400]), text, radius=0).sample.permute(0, 2, 1, 3, 4)
        wider = ours(latents, torch.tensor([400]), text, radius=1).sample.permute(0, 2, 1, 3, 4)
    assert (got - expected).abs().max() < 1e-5
    assert (wider - expected).abs().max() > 1e-3  # the radius is live at run time


def test_processor_full_radius_matches_reference(tiny_model):
    module = tiny_model.unet.down_blocks[1].motion_modules[0]
    attn = module.transformer_blocks[0].attn1
    B, H, W, Fr = 2, 3, 4, 5
    x = torch.randn(B * H * W, Fr, attn.to_q.in_features)
    with torch.no_grad():
        full = SpatioTemporalAttnProcessor()(attn, x, spatial_shape=(H, W), radius=-1)

        def split(t):
            return t.reshape(B, H, W, Fr, attn.heads, -1).permute(0, 4, 1, 2, 3, 5)

        o = reference_spatio_temporal_attention(
            split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x)), -1
        )
        expected = attn.to_out[0](o.permute(0, 2, 3, 4, 1, 5).reshape(B * H * W, Fr, -1))
    assert torch.allclose(full, expected, atol=1e-5)


# ---------------------------------------------------------------------------- camera conditioning
def _camera_model() -> MVCustomModel:
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(featurenerf_blocks=[]))
    randomize(model.camera_merges, seed=3)
    return model.eval()


def test_outputs_follow_cameras_and_ignore_global_rigid_motion():
    model = _camera_model()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([300])
    cams = clip_cameras(4)
    # a global rigid motion of the whole trajectory: rotate about an axis, then translate
    angle = torch.tensor(0.7)
    c, s = torch.cos(angle), torch.sin(angle)
    T = torch.eye(4)
    T[:3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ torch.tensor(
        [[1, 0, 0], [0, c, -s], [0, s, c]]
    )
    T[:3, 3] = torch.tensor([0.3, -1.2, 2.0])
    moved = ClipCameras(cams.w2c @ torch.linalg.inv(T), cams.K, IMAGE)
    other = clip_cameras(4, start_deg=0.0, span=20.0)
    with torch.no_grad():
        base = model(latents, t, text, cams, radius=1).sample
        same = model(latents, t, text, moved, radius=1).sample
        diff = model(latents, t, text, other, radius=1).sample
        none = model(latents, t, text, None, radius=1).sample
    assert (base - same).abs().max() < 1e-4
    assert (base - diff).abs().max() > 1e-3
    assert (base - none).abs().max() > 1e-3


def test_untrained_camera_merge_is_pass_through():
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(featurenerf_blocks=[])).eval()
    latents = torch.randn(1, 4, 4, 8, 8)
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        a = model(latents, torch.tensor([10]), text, clip_cameras(4)).sample
        b = model(latents, torch.tensor([10]), text, None).sample
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------- FeatureNeRF
def _scene_cameras(num: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    cams = orbit(num, image_hw=hw, radius=1.0, span_deg=60.0)
    return cams.w2c.float(), cams.K.float()


def test_target_rays_hit_pixel_centres_at_z_depth():
    w2c, K = _scene_cameras(2, (32, 48))
    origins, dirs = target_rays(w2c, K, (32, 48), (8, 12))
    cams = Cameras(w2c, K, (32, 48))
    z = torch.full((2, 96), 0.8)
    uv, depth = cams.project(origins + dirs * z.unsqueeze(-1))
    assert torch.allclose(depth, z, atol=1e-5)
    grid = cams.resize(8, 12).pixel_grid() * 4
    assert torch.allclose(uv, grid.reshape(-1, 2).expand(2, -1, -1).float(), atol=1e-3)


def test_gathered_features_at_known_depth_equal_reference_features():
    """Reference view's own camera as target, an opaque surface at known depth: rendering gathers
    exactly that view's features at those pixels."""
    hw, fhw = (32, 48), (8, 12)
    w2c, K = _scene_cameras(3, hw)
    feats = torch.randn(1, 3, 5, *fhw)
    origins, dirs = target_rays(w2c[:1], K[:1], hw, fhw)
    depths = torch.linspace(0.3, 1.9, 17)
    points = origins[:, :, None] + dirs[:, :, None] * depths[None, None, :, None]  # (1, P, S, 3)
    gathered, visible = gather_reference_features(points.reshape(1, -1, 3), feats, w2c[None], K[None], hw)
    gathered = gathered.reshape(1, 3, -1, 17, 5)
    own = feats[0, 0].permute(1, 2, 0).reshape(-1, 5)  # (P, C) in pixel order
    for s in range(17):  # the view's own rays project onto its pixel centres at every depth
        assert torch.allclose(gathered[0, 0, :, s], own, atol=1e-5)
    assert visible[0, 0].all()
    # opaque at one sample (index 6 <-> depth 0.9): rendering returns the gathered values there
    density = torch.zeros(96, 17)
    density[:, 6] = 1e4
    rendered, depth, opacity = volume_render(density, gathered[0, 0], depths.expand(96, -1))
    assert torch.allclose(rendered, own, atol=1e-4)
    assert torch.allclose(depth, torch.full((96,), float(depths[6])), atol=1e-4)
    assert torch.allclose(opacity, torch.ones(96), atol=1e-4)
    # the other views see the surface points where their own projection says
    surface = points[:, :, 6].reshape(1, -1, 3)
    uv, _ = Cameras(w2c[1:2], K[1:2], hw).project(surface[0])
    grid = torch.stack([uv[..., 0] / hw[1] * 2 - 1, uv[..., 1] / hw[0] * 2 - 1], -1)
    expect = torch.nn.functional.grid_sample(feats[:, 1], grid[:, None], align_corners=False)[0, :, 0].T
    got, vis = gather_reference_features(surface, feats, w2c[None], K[None], hw)
    inside = vis[0, 1]
    assert inside.sum() > 10
    assert torch.allclose(got[0, 1][inside], expect[inside], atol=1e-5)


def test_featurenerf_render_shapes_and_empty_space():
    nerf = FeatureNeRF(16, hidden=8, num_samples=6).eval()
    hw, fhw = (32, 32), (4, 4)
    w2c, K = _scene_cameras(5, hw)
    ref = torch.randn(2, 3, 16, *fhw)
    out = nerf(
        ref,
        w2c[None, :3].expand(2, -1, -1, -1),
        K[None, :3].expand(2, -1, -1, -1),
        w2c[None, 3:].expand(2, -1, -1, -1),
        K[None, 3:].expand(2, -1, -1, -1),
        hw,
        fhw,
    )
    assert out.features.shape == (2, 2, 16, 4, 4)
    assert out.depth.shape == out.opacity.shape == (2, 2, 4, 4)
    assert ((out.opacity >= 0) & (out.opacity <= 1)).all()
    # targets looking away from every reference see nothing: zero opacity
    turn = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0]))  # half turn about each camera's y axis
    away = turn @ w2c[3:]
    empty = nerf(
        ref,
        w2c[None, :3].expand(2, -1, -1, -1),
        K[None, :3].expand(2, -1, -1, -1),
        away[None].expand(2, -1, -1, -1),
        K[None, 3:].expand(2, -1, -1, -1),
        hw,
        fhw,
    )
    assert empty.opacity.abs().max() < 1e-6


def test_forward_shapes_with_references(tiny_model):
    B, Fr, Kv = 2, 3, 2
    latents = torch.randn(B, Fr, 4, 8, 8)
    text = tiny_model.encode_prompt(["a <sks> teddy", "a <sks> teddy on a beach"])
    tgt = clip_cameras(Fr)
    tgt = ClipCameras(tgt.w2c.expand(B, -1, -1, -1), tgt.K.expand(B, -1, -1, -1), IMAGE)
    ref = clip_cameras(Kv, start_deg=100.0)
    refs = References(
        torch.randn(B, Kv, 4, 8, 8),
        ClipCameras(ref.w2c.expand(B, -1, -1, -1), ref.K.expand(B, -1, -1, -1), IMAGE),
    )
    with torch.no_grad():
        out = tiny_model(latents, torch.tensor([10, 900]), text, tgt, refs, radius=2)
    assert out.sample.shape == (B, Fr, 4, 8, 8)
    assert sorted(out.renders) == tiny_model.config.featurenerf_blocks
    r = out.renders[4]
    assert r.features.shape[:2] == (B, Fr) and r.depth.shape == r.opacity.shape
    with pytest.raises(ValueError, match="target cameras"):
        tiny_model(latents, torch.tensor([1, 1]), text, None, refs)
    with pytest.raises(ValueError, match=r"\(B, F, C, h, w\)"):
        tiny_model(latents[0], torch.tensor([1]), text)


def test_featurenerf_branch_is_rigid_invariant_and_pose_dependent():
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(camera_encoder=False, featurenerf_blocks=[4, 7])).eval()
    for block in model.pose_blocks.values():
        randomize(block.fuse, seed=5)
    latents = torch.randn(1, 2, 4, 8, 8)
    text = torch.randn(1, 77, 32)
    tgt, ref = clip_cameras(2, start_deg=10.0, span=30.0), clip_cameras(3, start_deg=0.0, span=60.0)
    refs = References(torch.randn(1, 3, 4, 8, 8), ref)
    T = torch.eye(4)
    T[:3, :3] = look_at(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.tensor([0.0, -1.0, 0.0]))[
        0, :3, :3
    ].float()
    T[:3, 3] = torch.tensor([2.0, 0.5, -1.0])
    inv = torch.linalg.inv(T)
    moved_tgt = ClipCameras(tgt.w2c @ inv, tgt.K, IMAGE)
    moved_refs = References(refs.latents, ClipCameras(ref.w2c @ inv, ref.K, IMAGE))
    with torch.no_grad():
        a = model(latents, torch.tensor([500]), text, tgt, refs).sample
        b = model(latents, torch.tensor([500]), text, moved_tgt, moved_refs).sample
        c = model(
            latents, torch.tensor([500]), text, clip_cameras(2, start_deg=120.0, span=30.0), refs
        ).sample
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-4


# ---------------------------------------------------------------------------- training presets
@pytest.mark.parametrize("stage", ["backbone", "customize"])
def test_gradients_reach_exactly_the_stage_parameters(tiny_model, stage):
    model = copy.deepcopy(tiny_model).train()
    randomize(model.camera_merges, seed=1)
    for block in model.pose_blocks.values():
        randomize(block.fuse, seed=2)
    trainable = set(set_trainable(model, stage))
    g = torch.Generator().manual_seed(0)
    cams = clip_cameras(3)
    batch = {
        "frames": torch.rand(1, 3, 3, *IMAGE, generator=g) * 2 - 1,
        "caption": ["a <sks> teddy"],
        "extrinsics": cams.w2c,
        "intrinsics": cams.K,
        "mask": (torch.rand(1, 3, *IMAGE, generator=g) > 0.5).float(),
    }
    if stage == "customize":
        ref = clip_cameras(2, start_deg=120.0)
        batch.update(
            reference_frames=torch.rand(1, 2, 3, *IMAGE, generator=g) * 2 - 1,
            reference_extrinsics=ref.w2c,
            reference_intrinsics=ref.K,
        )
    loss, figures = diffusion_loss(
        model, batch, build_scheduler(model.scheduler_config), stage, radius=1, generator=g
    )
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if stage == "backbone":
        assert any(".motion_modules." in n for n in nonzero) and any(
            n.startswith("camera_encoder.") for n in nonzero
        )
        assert not any(n.startswith(("pose_blocks.", "text_encoder.")) for n in trainable)
    else:
        assert any(n.endswith("token_embedding.extra") for n in nonzero)
        assert any(".nerf." in n for n in nonzero) and any(".fuse." in n for n in nonzero)
        assert {"loss_fg_opacity", "loss_bg_alpha"} <= set(figures)
    assert all(math.isfinite(v) for v in figures.values())


def test_stage_without_parameters_is_refused():
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(camera_encoder=False, featurenerf_blocks=[]))
    assert trainable_parameters(model, "backbone")
    with pytest.raises(ValueError, match="nothing to train"):
        trainable_parameters(model, "customize")
    with pytest.raises(ValueError, match="unknown training stage"):
        trainable_parameters(model, "stage3")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_prediction_targets(kind):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        prediction_type=kind, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t = torch.tensor([10, 700])
    target = prediction_target(sched, x0, noise, t)
    a = sched.alphas_cumprod[t].view(2, 1, 1, 1, 1)
    expected = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(target, expected, atol=1e-6)
    # the v/epsilon target makes the noisy sample consistent: x_t = sqrt(a) x0 + sqrt(1-a) eps
    xt = sched.add_noise(x0, noise, t)
    if kind == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1-a) v
        assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * target, x0, atol=1e-5)


def test_v_prediction_model_trains(tiny_model):
    torch.manual_seed(0)
    model = MVCustomModel.tiny(MVCustomConfig(featurenerf_blocks=[]), prediction_type="v_prediction")
    sched = build_scheduler(model.scheduler_config)
    assert sched.config.prediction_type == "v_prediction"
    params = set_trainable(model, "backbone")
    batch = {"frames": torch.rand(1, 2, 3, *IMAGE) * 2 - 1, "caption": "a clip"}
    loss, _ = diffusion_loss(model, batch, sched, "backbone")
    loss.backward()
    motion = [p for n, p in params.items() if ".motion_modules." in n]
    assert motion and all(p.grad is not None and p.grad.abs().sum() > 0 for p in motion)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    randomize(model.pose_blocks["4"].fuse, seed=9)
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().extra.add_(0.5)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = MVCustomModel.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert loaded.tokenizer("a <sks>").input_ids == model.tokenizer("a <sks>").input_ids
    latents = torch.randn(1, 2, 4, 8, 8)
    cams, refs = clip_cameras(2), References(torch.randn(1, 2, 4, 8, 8), clip_cameras(2, start_deg=90.0))
    with torch.no_grad():
        text = model.encode_prompt(["a <sks>"])
        assert torch.equal(text, loaded.encode_prompt(["a <sks>"]))
        a = model(latents, torch.tensor([50]), text, cams, refs, radius=1).sample
        b = loaded(latents, torch.tensor([50]), text, cams, refs, radius=1).sample
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no model_index.json with an 'mvcustom' component"):
        MVCustomModel.from_pretrained(str(tmp_path / "m" / "unet"))


def test_a_single_frame_at_32_pixels_passes_the_camera_encoder():
    """The anchor pass denoises one frame; at 32x32 (latents 4x4) the camera encoder's deepest
    maps are 1x1, where one channel per GroupNorm group made torch refuse the call."""
    model = MVCustomModel.tiny(seed=0).eval()
    cams = orbit(1, image_hw=(32, 32))
    with torch.no_grad():
        text = model.encode_prompt(["a"])
        cams = ClipCameras(cams.w2c[None].float(), cams.K[None].float(), (32, 32))
        out = model(torch.randn(1, 1, 4, 4, 4), torch.tensor([10]), text, cams)
    assert torch.isfinite(out.sample).all() and out.sample.shape == (1, 1, 4, 4, 4)


def test_the_subject_token_gets_a_gradient_from_every_prompt():
    """Caption dropout gives stage 2 empty prompts. The token's embedding must still get a
    gradient, zeros, not None: under ZeRO-2 a rank without it reduces one tensor fewer than the
    others and the all-reduce desynchronises (gloo aborted a 2-worker customization run)."""
    model = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"]), seed=0)
    extra = model.text_encoder.get_input_embeddings().extra
    for prompt, used in (("", False), ("a photo of <sks> teddybear", True)):
        extra.grad = None
        model.encode_prompt([prompt]).float().pow(2).sum().backward()
        assert extra.grad is not None, prompt
        assert bool(extra.grad.abs().sum() > 0) == used, prompt


def test_a_model_without_additions_round_trips(tmp_path):
    """No camera encoder, FeatureNeRF or token (the micro-reproduction's baseline): nothing to
    save in the additions folder, and it still loads (it used to look for a weights file)."""
    bare = MVCustomModel.tiny(MVCustomConfig(camera_encoder=False, featurenerf_blocks=[]), seed=1)
    assert not bare._additions.state_dict()
    bare.save_pretrained(str(tmp_path / "bare"))
    loaded = MVCustomModel.from_pretrained(str(tmp_path / "bare"))
    assert loaded.config == bare.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in bare.state_dict().items())


def test_export_is_a_diffusers_pipeline_folder(tiny_model, tmp_path):
    """The export loads in stock diffusers: DiffusionPipeline.from_pretrained gives an
    AnimateDiffPipeline with our image + motion layers, load_textual_inversion adds the subject
    token, the pipeline generates; the additions load as their own component."""
    import json

    from diffusers import AnimateDiffPipeline, DiffusionPipeline

    from mvcustom.models import MVCustomAdditions
    from mvcustom.models.text import subject_vectors

    model = copy.deepcopy(tiny_model)
    randomize(model.pose_blocks["4"].fuse, seed=3)
    folder = tmp_path / "export"
    model.save_pretrained(str(folder))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline" and index["mvcustom"][1] == "MVCustomAdditions"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "mvcustom"):
        assert (folder / sub).is_dir(), sub
    assert (folder / "learned_embeds.safetensors").is_file()

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe, AnimateDiffPipeline)
    ours = model.state_dict()
    stock_unet = pipe.unet.state_dict()
    assert stock_unet.keys() == {k[len("unet.") :] for k in ours if k.startswith("unet.")}
    assert all(torch.equal(v, ours[f"unet.{k}"]) for k, v in stock_unet.items())
    base = model.text_encoder.get_input_embeddings().base.weight
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, base)  # no subject rows
    pipe.load_textual_inversion(str(folder))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    vector = subject_vectors(model.tokenizer, model.text_encoder)["<sks>"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)
    out = pipe("a photo of <sks>", num_frames=2, num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.asarray(out.frames).shape == (1, 2, 64, 64, 3)

    additions = MVCustomAdditions.from_pretrained(str(folder), subfolder="mvcustom")
    for k, v in additions.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_from_sd15_and_motion_adapter_folders(tmp_path):
    from diffusers import MotionAdapter, UNet2DConditionModel

    from mvcustom.models.components import save_tiny_pretrained

    sd, adapter = save_tiny_pretrained(str(tmp_path), seed=4)
    model = MVCustomModel.from_sd15(sd, adapter, MVCustomConfig(featurenerf_blocks=[5]))
    unet2d = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    motion = MotionAdapter.from_pretrained(adapter)
    state = model.unet.state_dict()
    assert torch.equal(
        state["down_blocks.0.resnets.0.conv1.weight"],
        unet2d.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
    )
    key = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(state[key], motion.state_dict()[key])
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    with torch.no_grad():
        out = model(
            torch.randn(1, 2, 4, 8, 8), torch.tensor([5]), model.encode_prompt(["x"]), clip_cameras(2)
        )
    assert out.sample.shape == (1, 2, 4, 8, 8)
    with pytest.raises(OSError, match="model.pretrained must be"):
        MVCustomModel.from_sd15(str(tmp_path / "missing"), adapter)


# ---------------------------------------------------------------------------- textual inversion
def test_textual_inversion_loads_in_stock_diffusers_pipeline(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from mvcustom.models.components import save_tiny_pretrained
    from mvcustom.models.text import save_textual_inversion, subject_vectors

    vector = subject_vectors(tiny_model.tokenizer, tiny_model.text_encoder)["<sks>"]
    file = save_textual_inversion(tiny_model.tokenizer, tiny_model.text_encoder, str(tmp_path / "ti"))
    sd, _ = save_tiny_pretrained(str(tmp_path))
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "ti"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    assert token_id != pipe.tokenizer.unk_token_id
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)
    assert file.endswith("learned_embeds.safetensors")
    # and the stock pipeline runs with the token in the prompt
    out = pipe("a photo of <sks>", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_build_model_from_config_and_stage2_start(tmp_path):
    from mvcustom.configs.train import ModelConfig, TrainConfig
    from mvcustom.models import build_model

    cfg = ModelConfig(featurenerf_blocks=[4], prediction_type="v_prediction")
    stage1 = build_model(cfg)
    assert stage1.scheduler_config["prediction_type"] == "v_prediction"
    assert list(stage1.pose_blocks) == ["4"] and stage1.camera_encoder is not None
    assert TrainConfig.paper().model.camera_encoder is False
    # the stage-1 export through an fsspec URL, then stage 2 adds its subject token to it
    stage1.save_pretrained("memory://exports/stage1")
    stage2 = build_model(
        cfg, init_from="memory://exports/stage1", subject_tokens=["<v1>"], subject_init_words=["chair"]
    )
    assert stage2.config.subject_tokens == ["<v1>"]
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    renamed = {k: k.replace(".token_embedding.weight", ".token_embedding.base.weight") for k in s1}
    assert all(torch.equal(s1[k], s2[renamed[k]]) for k in s1)
    extra = [k for k in s2 if k.endswith("token_embedding.extra")]
    assert len(extra) == 1 and s2[extra[0]].shape[0] == 1
    ids = stage2.tokenizer("chair", add_special_tokens=False).input_ids
    base = stage2.text_encoder.get_input_embeddings().base.weight
    assert torch.allclose(s2[extra[0]][0], base[ids].mean(0))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        MVCustomModel.from_pretrained("memory://exports/none")


def test_one_model_config_refuses_conflicts_and_applies_runtime_fields():
    """ModelConfig and MVCustomConfig share ArchitectureConfig's fields; loading a saved model
    under a config refuses a differing shape field (naming it) and applies the runtime ones."""
    from dataclasses import fields

    from mvcustom.configs.model import RUNTIME_FIELDS, SHAPE_FIELDS, ArchitectureConfig
    from mvcustom.configs.train import ModelConfig
    from mvcustom.models import build_model

    arch = {f.name for f in fields(ArchitectureConfig)}
    assert arch == set(SHAPE_FIELDS) | set(RUNTIME_FIELDS)
    assert arch <= {f.name for f in fields(ModelConfig)} and arch <= {f.name for f in fields(MVCustomConfig)}
    saved = ModelConfig(featurenerf_blocks=[4], camera_encoder=False, nerf_samples=8)
    build_model(saved).save_pretrained("memory://exports/arch")
    for key, value in (("camera_encoder", True), ("featurenerf_blocks", [4, 5]), ("nerf_hidden", 32)):
        wanted = ModelConfig(**{**saved.architecture(), key: value})
        with pytest.raises(ValueError, match=rf"model\.{key}=.*conflicts"):
            build_model(wanted, init_from="memory://exports/arch")
    with pytest.raises(ValueError, match="model.prediction_type='v_prediction' conflicts"):
        build_model(
            ModelConfig(**saved.architecture(), prediction_type="v_prediction"),
            init_from="memory://exports/arch",
        )
    runtime = ModelConfig(
        **{**saved.architecture(), "nerf_samples": 5, "near": 0.5, "far": 3.0, "stt_tile": 2}
    )
    model = build_model(runtime, init_from="memory://exports/arch")
    nerf = model.pose_blocks["4"].nerf
    assert (nerf.num_samples, nerf.near, nerf.far, model.config.stt_tile) == (5, 0.5, 3.0, 2)


def test_featurenerf_loss_terms_known_answer():
    """fg opacity, bg alpha and rendered-RGB terms on a case computed by hand."""
    from mvcustom.configs.model import LossConfig
    from mvcustom.models.featurenerf import RenderOutput
    from mvcustom.models.objective import featurenerf_losses

    B, Fr, h, w = 1, 2, 4, 4
    mask = torch.zeros(B, Fr, 8, 8)
    mask[..., :4] = 1.0  # left half is the subject
    frames = torch.full((B, Fr, 3, 8, 8), 0.5)
    render = RenderOutput(
        features=torch.zeros(B, Fr, 2, h, w),
        depth=torch.ones(B, Fr, h, w),
        opacity=torch.full((B, Fr, h, w), 0.75),
        rgb=torch.full((B, Fr, 3, h, w), 0.5),
    )
    terms = featurenerf_losses({4: render, 7: render}, mask, frames)
    assert terms["fg_opacity"].item() == pytest.approx(0.25**2)  # (0.75 - 1)^2 on the subject
    assert terms["bg_alpha"].item() == pytest.approx(0.75)  # |0.75| off it
    assert terms["rgb"].item() == pytest.approx(0.5 * 0.25)  # half the pixels: (0.5 - 0)^2
    w8 = LossConfig()
    assert (w8.fg_opacity, w8.bg_alpha, w8.rgb) == (10.0, 10.0, 5.0)  # CD360's weights


def test_rendered_rgb_follows_the_density_weights():
    """The rendered colour is the volume-rendered per-point colour: at opacity 0 it is 0."""
    from mvcustom.models.featurenerf import volume_render

    density = torch.tensor([[0.0, 0.0, 1e4, 0.0]])
    colours = torch.tensor([[[1.0], [1.0], [-0.5], [1.0]]])
    rendered, depth, opacity = volume_render(density, colours, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert opacity.item() == pytest.approx(1.0) and rendered.item() == pytest.approx(-0.5)
    assert depth.item() == pytest.approx(3.0)
    empty, _, zero = volume_render(torch.zeros(1, 4), colours, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert zero.item() == 0 and empty.item() == 0


def test_bf16_forward_with_every_branch(tiny_model):
    """The dtype path GPUs take: bf16 weights, fp32 geometry inside FeatureNeRF and Plücker maps."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    cams, refs = clip_cameras(2), References(torch.randn(1, 2, 4, 8, 8), clip_cameras(2, start_deg=90.0))
    with torch.no_grad():
        text = model.encode_prompt(["a <sks>"])
        out = model(torch.randn(1, 2, 4, 8, 8), torch.tensor([50]), text, cams, refs, radius=1)
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()
    assert all(torch.isfinite(r.depth).all() for r in out.renders.values())


def test_library_imports_no_launchers():
    import subprocess
    import sys

    code = (
        "import sys, mvcustom.models, mvcustom.models.objective, mvcustom.geometry, mvcustom.data.reader; "
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
