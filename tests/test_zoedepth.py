"""ZoeDepth without torchvision: tiny model round trip, and our preprocessing equals transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvcustom.models.zoedepth import DepthEstimator, postprocess, preprocess, save_tiny_zoedepth


def test_tiny_model_round_trip_and_estimator(tmp_path):
    from transformers import ZoeDepthForDepthEstimation

    path = save_tiny_zoedepth(str(tmp_path / "zoe"))
    a = ZoeDepthForDepthEstimation.from_pretrained(path).eval()
    b = ZoeDepthForDepthEstimation.from_pretrained(path).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(a(pixel_values=x).predicted_depth, b(pixel_values=x).predicted_depth)
    est = DepthEstimator(path, device="cpu", input_size=(64, 96), batch_size=3)
    frames = np.random.default_rng(0).integers(0, 255, (5, 50, 70, 3), dtype=np.uint8)
    depth = est(frames)
    assert depth.shape == (5, 50, 70) and depth.dtype == np.float32 and (depth > 0).all()
    assert depth.std() > 1e-3  # not the constant a badly initialised random model gives
    # Two-head checkpoints vote NYU vs KITTI over the whole forward batch (transformers sums the
    # domain logits over dim 0), so batch composition can change the head: the estimator batches
    # one clip at a time, and batch_size >= frames per clip gives one head per clip.
    heads_per_frame = DepthEstimator(path, device="cpu", input_size=(64, 96), batch_size=1)(frames)
    assert heads_per_frame.shape == depth.shape


def test_single_head_model_is_batch_invariant(tmp_path):
    from transformers import ZoeDepthForDepthEstimation

    from mvcustom.models.zoedepth import tiny_zoedepth_config

    torch.manual_seed(0)
    path = str(tmp_path / "zoe1")
    ZoeDepthForDepthEstimation(tiny_zoedepth_config(two_heads=False)).save_pretrained(path)
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 96, 3), dtype=np.uint8)
    a = DepthEstimator(path, device="cpu", input_size=(64, 96), batch_size=5)(frames)
    b = DepthEstimator(path, device="cpu", input_size=(64, 96), batch_size=2)(frames)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(480, 640), (64, 96), (100, 70)])
def test_preprocess_matches_transformers_processor(hw):
    from transformers import ZoeDepthImageProcessorPil

    img = np.random.default_rng(1).integers(0, 255, (*hw, 3), dtype=np.uint8)
    ref = ZoeDepthImageProcessorPil(ensure_multiple_of=32)(images=[img], return_tensors="pt").pixel_values
    mine, pads = preprocess(torch.from_numpy(img)[None], (384, 512))
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max() < 1e-5
    # postprocess brings a prediction of the padded, resized input back to the source size
    back = postprocess(torch.ones(1, *mine.shape[-2:]), hw, pads)
    assert back.shape == (1, *hw) and torch.allclose(back, torch.ones_like(back), atol=1e-5)


def test_the_nyu_kitti_architecture_config_has_the_checkpoints_shape():
    """The cost benchmark's stand-in for Intel/zoedepth-nyu-kitti: BEiT-L/16 at 384 and the two
    64-bin metric heads (the checkpoint's config.json, which cannot be downloaded here)."""
    from mvcustom.models.zoedepth import nyu_kitti_zoedepth_config, tiny_zoedepth_config

    cfg = nyu_kitti_zoedepth_config()
    b = cfg.backbone_config
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.image_size) == (1024, 24, 16, 384)
    assert [(c["name"], c["n_bins"], c["max_depth"]) for c in cfg.bin_configurations] == [
        ("nyu", 64, 10.0),
        ("kitti", 64, 80.0),
    ]
    assert list(cfg.neck_hidden_sizes) == [256, 512, 1024, 1024] and cfg.fusion_hidden_size == 256
    assert (cfg.patch_transformer_intermediate_size, cfg.patch_transformer_num_attention_heads) == (1024, 4)
    tiny = tiny_zoedepth_config()
    assert [c["name"] for c in tiny.bin_configurations] == ["nyu", "kitti"]
    assert tiny.num_patch_transformer_layers == cfg.num_patch_transformer_layers == 4
