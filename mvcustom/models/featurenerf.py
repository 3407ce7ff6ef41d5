"""FeatureNeRF: render the subject's reference features at a target camera (DESIGN.md §1).

CustomDiffusion360's pose-conditioned transformer block, which MVCustom adopts (PAPER.md §3):
for each pixel of a target feature map, cast the ray of the target camera, sample points along
it, project every point into the K reference views, gather the reference features there
(epipolar sampling), aggregate them over the views, predict a density and a feature per point
and volume-render them into a pose-aligned feature map (plus a z-depth and an opacity map).

Choices the paper leaves open (PAPER.md §8), ours, configurable here:

* samples are uniform in z-depth between ``near`` and ``far`` (stratified while training), so the
  rendered depth is a z-depth comparable with ZoeDepth's (used to align its scale at inference);
* the aggregation is IBRNet's: mean and variance over the views that see the point, through a
  small MLP; the point feature is not text-conditioned (CD360 also cross-attends the points to
  the prompt; not done here);
* reference features are reduced to ``hidden`` channels before gathering (memory scales with
  ``rays x samples x K x hidden``) and the rendered map is projected back to the block's width.

Units: cameras in the clip's world frame (CO3D clips are normalised so the mean camera-to-subject
distance is 1, so the defaults ``near=0.2, far=2.0`` bracket the subject).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class RenderOutput:
    """What a FeatureNeRF renders per target view.

    features ``(B, F, C, h, w)``; depth ``(B, F, h, w)`` z-depth in world units (expected depth
    given the ray terminates); opacity ``(B, F, h, w)`` in ``[0, 1]``; rgb ``(B, F, 3, h, w)``
    the rendered colour in ``[-1, 1]`` premultiplied by opacity (CD360's RGB loss supervises it).
    """

    features: Tensor
    depth: Tensor
    opacity: Tensor
    rgb: Tensor


def target_rays(
    w2c: Tensor, K: Tensor, image_hw: tuple[int, int], feature_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Rays through the pixel centres of a feature map, parameterised by z-depth.

    Args:
        w2c: ``(N, 4, 4)``; K: ``(N, 3, 3)`` in pixels of ``image_hw``.
        feature_hw: the feature map's size (``image_hw`` divided by an integer stride).
    Returns:
        ``origins (N, h*w, 3)`` camera centres and ``directions (N, h*w, 3)`` scaled so that
        ``origin + z * direction`` is the world point at z-depth ``z``.
    """
    H, W = image_hw
    h, w = feature_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"feature map {h}x{w} is not an integer downscale of the image {H}x{W}")
    stride = H // h
    ys = (torch.arange(h, device=w2c.device, dtype=w2c.dtype) + 0.5) * stride
    xs = (torch.arange(w, device=w2c.device, dtype=w2c.dtype) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    uv1 = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # (P, 3)
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    dirs_cam = uv1 @ torch.linalg.inv(K).transpose(1, 2)  # (N, P, 3), z = 1
    dirs = dirs_cam @ R  # R^T d, row-vector form
    origins = -(R.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)
    return origins.unsqueeze(1).expand_as(dirs), dirs


def sample_depths(near: Tensor, far: Tensor, num_samples: int, stratified: bool) -> Tensor:
    """``near, far (N,)`` -> ``(N, num_samples)`` z-depths: bin centres, or jittered in bins."""
    steps = torch.arange(num_samples, device=near.device, dtype=near.dtype)
    offset = (
        torch.rand(near.shape[0], num_samples, device=near.device, dtype=near.dtype) if stratified else 0.5
    )
    u = (steps + offset) / num_samples
    return near[:, None] + (far - near)[:, None] * u


def gather_reference_features(
    points: Tensor, features: Tensor, w2c: Tensor, K: Tensor, image_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Bilinearly sample each reference view's features where world points project.

    Args:
        points: ``(B, P, 3)`` world points.
        features: ``(B, K, C, h, w)`` reference feature maps covering the whole image.
        w2c: ``(B, K, 4, 4)``; K: ``(B, K, 3, 3)`` in pixels of ``image_hw``.
    Returns:
        ``gathered (B, K, P, C)`` and ``visible (B, K, P)`` (in front of the camera and inside
        the image; gathered values are 0 where not visible).
    """
    B, Kv, C, h, w = features.shape
    cam = points.unsqueeze(1) @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]  # (B,K,P,3)
    z = cam[..., 2]
    pix = cam @ K.transpose(-1, -2)
    uv = pix[..., :2] / pix[..., 2:3].clamp_min(1e-6)
    H, W = image_hw
    # corner-origin pixels -> grid_sample's [-1, 1] with align_corners=False (exact pixel centres)
    grid = torch.stack([uv[..., 0] / W * 2 - 1, uv[..., 1] / H * 2 - 1], -1)
    visible = (z > 1e-6) & (grid.abs() <= 1).all(-1)
    sampled = F.grid_sample(
        features.reshape(B * Kv, C, h, w),
        grid.reshape(B * Kv, 1, -1, 2).to(features.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B*K, C, 1, P)
    gathered = sampled.reshape(B, Kv, C, -1).transpose(2, 3)
    return gathered * visible.unsqueeze(-1).to(gathered.dtype), visible


def volume_render(density: Tensor, values: Tensor, depths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Emission-absorption rendering along rays (NeRF eq. 3).

    Args:
        density: ``(..., S)`` non-negative; values: ``(..., S, C)``; depths: ``(..., S)`` sorted.
    Returns:
        ``rendered (..., C)``, ``depth (..., )`` expected z-depth normalised by opacity, and
        ``opacity (...)``.
    """
    deltas = torch.cat([depths[..., 1:] - depths[..., :-1], depths[..., -1:] - depths[..., -2:-1]], -1)
    alpha = 1 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1] + 1e-10], -1), -1
    )
    weights = alpha * transmittance
    opacity = weights.sum(-1)
    rendered = (weights.unsqueeze(-1) * values).sum(-2)
    depth = (weights * depths).sum(-1) / opacity.clamp_min(1e-6)
    return rendered, depth, opacity


class FeatureNeRF(nn.Module):
    """One FeatureNeRF for one pose-conditioned transformer block of width ``channels``."""

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        num_samples: int = 24,
        near: float = 0.2,
        far: float = 2.0,
    ):
        super().__init__()
        if not 0 < near < far:
            raise ValueError(f"FeatureNeRF needs 0 < near < far, got near={near}, far={far}")
        self.num_samples = num_samples
        self.near, self.far = near, far
        self.ref_proj = nn.Linear(channels, hidden)
        self.point_mlp = nn.Sequential(
            nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden + 1)
        )
        self.out_proj = nn.Linear(hidden, channels)
        # per-point colour (CD360's RGB head): rendered with the density's weights, it gives the
        # geometry a photometric signal at stage 2 (the rgb loss term)
        self.rgb_head = nn.Linear(hidden, 3)

    def point_field(self, gathered: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        """``gathered (B, K, P, hidden)``, ``visible (B, K, P)`` -> density ``(B, P)``, feature ``(B, P, hidden)``."""
        w = visible.unsqueeze(-1).to(gathered.dtype)
        count = w.sum(1)
        mean = (gathered * w).sum(1) / count.clamp_min(1)
        var = ((gathered - mean.unsqueeze(1)) ** 2 * w).sum(1) / count.clamp_min(1)
        seen = (count > 0).to(gathered.dtype)
        out = self.point_mlp(torch.cat([mean, var, seen], -1))
        density = F.softplus(out[..., 0]) * seen.squeeze(-1)  # nothing sees it -> empty space
        return density, out[..., 1:]

    def forward(
        self,
        ref_features: Tensor,
        ref_w2c: Tensor,
        ref_K: Tensor,
        target_w2c: Tensor,
        target_K: Tensor,
        image_hw: tuple[int, int],
        feature_hw: tuple[int, int],
        near: Tensor | None = None,
        far: Tensor | None = None,
    ) -> RenderOutput:
        """Render the reference features at every target camera.

        Args:
            ref_features: ``(B, K, C, h_r, w_r)`` the block's features of the reference views.
            ref_w2c, ref_K: ``(B, K, 4, 4)``, ``(B, K, 3, 3)``; target_w2c, target_K:
                ``(B, F, 4, 4)``, ``(B, F, 3, 3)``; all intrinsics in pixels of ``image_hw``.
            feature_hw: the target feature map size.
            near, far: ``(B,)`` per-sample bounds (default: the module's).
        """
        B, Fr = target_w2c.shape[:2]
        h, w = feature_hw
        dtype = ref_features.dtype
        geo = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        origins, dirs = target_rays(
            target_w2c.reshape(B * Fr, 4, 4).to(geo),
            target_K.reshape(B * Fr, 3, 3).to(geo),
            image_hw,
            feature_hw,
        )
        near = torch.full((B,), self.near, device=origins.device, dtype=geo) if near is None else near.to(geo)
        far = torch.full((B,), self.far, device=origins.device, dtype=geo) if far is None else far.to(geo)
        S = self.num_samples
        z = sample_depths(
            near.repeat_interleave(Fr * h * w), far.repeat_interleave(Fr * h * w), S, self.training
        )
        z = z.reshape(B, Fr * h * w, S)
        points = origins.reshape(B, -1, 1, 3) + dirs.reshape(B, -1, 1, 3) * z.unsqueeze(-1)  # (B, R, S, 3)
        reduced = self.ref_proj(ref_features.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        gathered, visible = gather_reference_features(
            points.reshape(B, -1, 3), reduced, ref_w2c.to(geo), ref_K.to(geo), image_hw
        )
        density, feats = self.point_field(gathered, visible)
        density = density.reshape(B, -1, S).to(geo)
        feats = feats.reshape(B, -1, S, feats.shape[-1])
        colours = torch.tanh(self.rgb_head(feats)).to(geo)
        rendered, depth, opacity = volume_render(density, torch.cat([feats.to(geo), colours], -1), z.to(geo))
        rendered, rgb = rendered[..., :-3], rendered[..., -3:]
        rendered = self.out_proj(rendered.to(dtype))  # (B, F*h*w, C)
        return RenderOutput(
            features=rendered.reshape(B, Fr, h, w, -1).permute(0, 1, 4, 2, 3),
            depth=depth.reshape(B, Fr, h, w),
            opacity=opacity.reshape(B, Fr, h, w),
            rgb=rgb.reshape(B, Fr, h, w, 3).permute(0, 1, 4, 2, 3),
        )
