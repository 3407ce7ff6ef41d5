"""ZoeDepth monocular depth (transformers ``ZoeDepthForDepthEstimation``) without torchvision.

Used by preprocessing (per-frame depth of WebVid clips, optionally CO3D) and by inference
(depth of the anchor frame for depth-aware feature rendering). Real weights load with
``from_pretrained`` from a folder or hub id (default ``Intel/zoedepth-nyu-kitti``: metric depth
in metres, NYU 0-10 m and KITTI 0-80 m heads); :func:`tiny_zoedepth_config` builds a random
model of the same structure for tests and the demo.

transformers' ``post_process_depth_estimation`` needs torchvision (not installable here, see
STACK.md), so pre- and post-processing are reimplemented with the same steps as
``ZoeDepthImageProcessor`` (checked equal to it for several sizes): rescale to [0, 1], reflect-pad
each side by ``int(sqrt(side / 2) * 3)``, bilinear resize (align_corners) towards ``input_size``
scaling as little as possible, round sides to multiples of 32, normalise with mean = std = 0.5;
after the model, optional flip averaging, bicubic resize to the padded source size, crop the pad.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MODEL = "Intel/zoedepth-nyu-kitti"


def tiny_zoedepth_config(two_heads: bool = True):
    """A ~0.5M-parameter random ZoeDepth with the structure of ``Intel/zoedepth-nyu-kitti``.

    ``initializer_range=0.2``: at transformers' default 0.02 a random ZoeDepth outputs the
    constant softplus(0) = ln 2 everywhere, which would hide resizing bugs in tests.
    """
    from transformers import BeitConfig, ZoeDepthConfig

    backbone = BeitConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        use_relative_position_bias=True,
        use_absolute_position_embeddings=False,
        use_mask_token=False,
        reshape_hidden_states=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    kw = dict(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        num_relative_features=8,
        bottleneck_features=16,
        bin_embedding_dim=8,
        num_attractors=[4, 2, 2, 1],
        bin_centers_type="softplus",
        attractor_kind="mean",
        initializer_range=0.2,
    )
    if two_heads:
        kw.update(_nyu_kitti_heads(n_bins=8, intermediate_size=32, heads=1))
    else:
        kw.update(bin_configurations=[{"n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0}])
    return ZoeDepthConfig(**kw)


def _nyu_kitti_heads(n_bins: int, intermediate_size: int, heads: int) -> dict:
    """The NYU (10 m) and KITTI (80 m) metric heads and the patch transformer that chooses
    between them (transformers hard-codes 4 layers and width 128 for two heads)."""
    return dict(
        bin_configurations=[
            {"name": "nyu", "n_bins": n_bins, "min_depth": 1e-3, "max_depth": 10.0},
            {"name": "kitti", "n_bins": n_bins, "min_depth": 1e-3, "max_depth": 80.0},
        ],
        num_patch_transformer_layers=4,
        patch_transformer_hidden_size=128,
        patch_transformer_intermediate_size=intermediate_size,
        patch_transformer_num_attention_heads=heads,
    )


def nyu_kitti_zoedepth_config():
    """``Intel/zoedepth-nyu-kitti``'s architecture, for random-weight cost measurements where the
    checkpoint cannot be downloaded (the settings of transformers' conversion script for ZoeD_NK):
    transformers' default BEiT-L/16 backbone at 384, the DPT-Large neck [256, 512, 1024, 1024],
    and the two 64-bin heads chosen by a 4-head patch transformer."""
    from transformers import ZoeDepthConfig

    return ZoeDepthConfig(
        neck_hidden_sizes=[256, 512, 1024, 1024],
        **_nyu_kitti_heads(n_bins=64, intermediate_size=1024, heads=4),
    )


def save_tiny_zoedepth(path: str, seed: int = 0) -> str:
    """Save a tiny random ZoeDepth to ``path`` (a ``from_pretrained`` folder); returns ``path``."""
    from transformers import ZoeDepthForDepthEstimation

    torch.manual_seed(seed)
    ZoeDepthForDepthEstimation(tiny_zoedepth_config()).save_pretrained(path)
    return path


def _round_to(v: float, multiple: int) -> int:
    r = int(np.round(v / multiple) * multiple)
    return r if r >= multiple else math.ceil(v / multiple) * multiple


def preprocess(
    frames: torch.Tensor, input_size: tuple[int, int], pad: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``frames (B, H, W, 3)`` uint8 -> ``pixel_values (B, 3, h, w)`` and the ``(pad_h, pad_w)`` used."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    H, W = x.shape[-2:]
    ph, pw = (int(math.sqrt(H / 2) * 3), int(math.sqrt(W / 2) * 3)) if pad else (0, 0)
    if pad:
        x = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    h, w = x.shape[-2:]
    sh, sw = input_size[0] / h, input_size[1] / w
    s = sw if abs(1 - sw) < abs(1 - sh) else sh  # scale as little as possible, keep aspect
    x = F.interpolate(x, (_round_to(s * h, 32), _round_to(s * w, 32)), mode="bilinear", align_corners=True)
    return (x - 0.5) / 0.5, (ph, pw)


def postprocess(
    depth: torch.Tensor,
    src_hw: tuple[int, int],
    pads: tuple[int, int],
    depth_flipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """``predicted_depth (B, h, w)`` -> ``(B, H, W)`` at the source size, padding removed."""
    if depth_flipped is not None:
        depth = (depth + torch.flip(depth_flipped, dims=[-1])) / 2
    (H, W), (ph, pw) = src_hw, pads
    d = F.interpolate(depth[:, None].float(), (H + 2 * ph, W + 2 * pw), mode="bicubic", align_corners=False)
    return d[:, 0, ph : ph + H, pw : pw + W]


PROCESSOR_INPUT_SIZE = (384, 512)


def processor_input_size(model) -> tuple[int, int]:
    """The input size a ZoeDepth folder's ``preprocessor_config.json`` declares (``size``:
    ``{height, width}``); :data:`PROCESSOR_INPUT_SIZE` for a hub id, a built model or a folder
    without one."""
    import json
    import os

    path = os.path.join(model, "preprocessor_config.json") if isinstance(model, str) else None
    if path is None or not os.path.isfile(path):
        return PROCESSOR_INPUT_SIZE
    with open(path) as f:
        size = json.load(f).get("size") or {}
    if not isinstance(size, dict) or not {"height", "width"} <= set(size):
        raise ValueError(f"{path}: 'size' must be {{height, width}}, got {size!r}")
    return int(size["height"]), int(size["width"])


class DepthEstimator:
    """Loads ZoeDepth once and estimates depth for batches of frames.

    Args:
        model: ``from_pretrained`` folder or hub id, or a built ``ZoeDepthForDepthEstimation``.
        device: ``cuda``/``cpu``/``None`` (CUDA when available).
        dtype: the network's dtype (``None``: as loaded, fp32); e.g. ``torch.bfloat16`` on GPUs.
            Pre- and post-processing stay in fp32; depth comes back as float32.
        input_size: target network input size ``(height, width)``. ``None``: the ``size`` of
            the model folder's ``preprocessor_config.json`` when it has one (a checkpoint trained
            at another size says so there), else the processor's 384x512 of the real checkpoints.
        flip_average: average with the prediction of the mirrored image (the processor's default).
        batch_size: frames per forward pass. Two-head checkpoints choose the NYU or KITTI head
            by a vote over the whole batch (transformers sums domain logits over the batch), so
            pass one clip per call with ``batch_size`` >= its frames for one head per clip.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | None = None,
        input_size=None,
        flip_average: bool = True,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ):
        from transformers import ZoeDepthForDepthEstimation

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = (
            model if isinstance(model, torch.nn.Module) else ZoeDepthForDepthEstimation.from_pretrained(model)
        )
        self.model = net.to(self.device, dtype=dtype).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.input_size = tuple(input_size) if input_size is not None else processor_input_size(model)
        self.flip_average = flip_average
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """``frames (N, H, W, 3)`` uint8 RGB -> ``(N, H, W)`` float32 depth (metres for real weights)."""
        out = []
        H, W = frames.shape[1:3]
        for i in range(0, len(frames), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + self.batch_size])).to(self.device)
            pv, pads = preprocess(x, self.input_size)
            pv = pv.to(self.dtype)
            d = self.model(pixel_values=pv).predicted_depth.float()
            dflip = (
                self.model(pixel_values=torch.flip(pv, dims=[-1])).predicted_depth.float()
                if self.flip_average
                else None
            )
            out.append(postprocess(d, (H, W), pads, dflip).clamp_min(0).cpu().numpy())
        return np.concatenate(out).astype(np.float32)
