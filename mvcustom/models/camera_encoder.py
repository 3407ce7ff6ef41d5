"""CameraCtrl-style camera encoder (our addition beyond the paper, DESIGN.md §1).

Cameras are first taken relative to the first frame of their clip, so a global rigid motion of
the whole trajectory (the arbitrary world frame of SfM or CO3D) changes nothing. Each frame's
Plücker map (DESIGN.md §4) at image resolution is pixel-unshuffled to latent resolution, then a
small convolutional pyramid produces one feature map per UNet down level with that level's
channel count; a temporal self-attention per level lets a frame's code see the whole trajectory.
The features are added into the motion modules of the matching down level through a
zero-initialised merge (``PoseMotionTransformer``), as CameraCtrl fuses them into the encoder's
temporal attention, so an untrained encoder leaves the pretrained backbone unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mvcustom.geometry.camera import Cameras, rigid_inverse
from mvcustom.geometry.plucker import plucker_embedding

Tensor = torch.Tensor


def relative_to_first(w2c: Tensor) -> Tensor:
    """``w2c (B, F, 4, 4)`` -> the same cameras with frame 0 of each clip at the identity."""
    if w2c.ndim != 4 or w2c.shape[-2:] != (4, 4):
        raise ValueError(f"w2c must have shape (B, F, 4, 4), got {tuple(w2c.shape)}")
    return w2c @ rigid_inverse(w2c[:, :1])


def clip_plucker(w2c: Tensor, K: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Plücker maps of clips, relative to each clip's first camera.

    Args:
        w2c: ``(B, F, 4, 4)`` world-to-camera (OpenCV). K: ``(B, F, 3, 3)`` pixels of ``image_hw``.
    Returns:
        ``(B, F, 6, H, W)`` in ``w2c``'s dtype.
    """
    B, Fr = w2c.shape[:2]
    rel = relative_to_first(w2c.double())
    cams = Cameras(rel.reshape(B * Fr, 4, 4), K.double().reshape(B * Fr, 3, 3), image_hw)
    return plucker_embedding(cams).reshape(B, Fr, 6, *image_hw).to(w2c.dtype)


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 32, at least two channels each. One channel per group (the tiny
    widths) normalises a single value per group on the 1x1 maps of small inputs: zero signal,
    and torch refuses it outright for a single frame (the anchor pass at 32x32)."""
    g = math.gcd(channels, 32)
    while g > 1 and channels // g < 2:
        g //= 2
    return g


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class _TemporalAttention(nn.Module):
    """Self-attention across frames at every pixel, sinusoidal frame positions."""

    def __init__(self, channels: int, heads: int, max_frames: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        pos = torch.arange(max_frames).unsqueeze(1)
        div = torch.exp(torch.arange(0, channels, 2) * (-math.log(10000.0) / channels))
        table = torch.zeros(max_frames, channels)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div[: channels // 2])
        self.register_buffer("positions", table, persistent=False)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        BF, C, H, W = x.shape
        if num_frames > self.positions.shape[0]:
            raise ValueError(f"camera encoder supports at most {self.positions.shape[0]} frames")
        seq = x.reshape(BF // num_frames, num_frames, C, H * W).permute(0, 3, 1, 2)
        seq = seq.reshape(-1, num_frames, C)
        h = self.norm(seq) + self.positions[:num_frames].to(seq.dtype)
        seq = seq + self.attn(h, h, h, need_weights=False)[0]
        return seq.reshape(BF // num_frames, H * W, num_frames, C).permute(0, 2, 3, 1).reshape(BF, C, H, W)


class CameraEncoder(nn.Module):
    """Plücker maps ``(B, F, 6, H, W)`` -> one feature map per UNet down level.

    Args:
        channels: output channels per level (the UNet's ``block_out_channels``).
        downscale: image pixels per latent pixel (the VAE factor, 8 for SD).
        blocks_per_level: residual blocks per level.
        heads: temporal-attention heads (0 disables it).
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        downscale: int = 8,
        blocks_per_level: int = 1,
        heads: int = 1,
    ):
        super().__init__()
        self.downscale = downscale
        self.unshuffle = nn.PixelUnshuffle(downscale)
        self.conv_in = nn.Conv2d(6 * downscale * downscale, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.attentions = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            layers += [_ResBlock(ch) for _ in range(blocks_per_level)]
            self.levels.append(nn.Sequential(*layers))
            self.attentions.append(_TemporalAttention(ch, heads) if heads else nn.Identity())
            prev = ch

    def forward(self, plucker: Tensor) -> list[Tensor]:
        """``plucker (B, F, 6, H, W)`` -> list of ``(B*F, C_l, H / (d 2^l), W / (d 2^l))``."""
        if plucker.ndim != 5 or plucker.shape[2] != 6:
            raise ValueError(f"plucker must have shape (B, F, 6, H, W), got {tuple(plucker.shape)}")
        B, Fr, _, H, W = plucker.shape
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"image size {H}x{W} is not a multiple of {self.downscale}")
        x = self.conv_in(self.unshuffle(plucker.reshape(B * Fr, 6, H, W)))
        features = []
        for level, attention in zip(self.levels, self.attentions, strict=True):
            x = level(x)
            if isinstance(attention, _TemporalAttention):
                x = attention(x, Fr)
            features.append(x)
        return features
