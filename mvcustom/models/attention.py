"""Dense spatio-temporal attention (STT, DESIGN.md §1; PAPER.md §2).

AnimateDiff's motion modules attend along time only: the query at ``(frame f, row y, column x)``
sees the keys at ``(f', y, x)`` for every frame ``f'``. MVCustom widens this so a query also sees
a spatial neighbourhood in every frame; the neighbourhood grows during training until it covers
the whole feature map ("progressive expansion", paper Fig. 2b).

Our definition (the paper gives none, PAPER.md §8): the window is the square of Chebyshev radius
``r`` (latent pixels of the feature map the module runs on) around ``(y, x)``, truncated at the
map's border (keys outside the map do not exist; they are masked, never zero-padded into the
softmax). So

* ``r = 0`` is exactly AnimateDiff's 1D temporal attention (same weights, same maths);
* ``r >= max(H, W) - 1`` (or ``r < 0``, "full") is full 3D attention over ``F * H * W`` tokens.

Memory: the windowed case never forms an ``(F*H*W)^2`` mask. The map is cut into ``T x T``
query tiles; each tile attends to its halo ``(T + 2r)^2`` in every
frame with a tile-local mask of size ``(T^2 F) x ((T + 2r)^2 F)`` (HaloNet's blocked local
attention). Scores and keys therefore grow with the window, not with the map. ``T`` trades
wasted scores (``(T + 2r)^2`` computed per query against ``(2r + 1)^2`` needed) for duplicated
keys (``(T + 2r)^2 / T^2`` copies); ``T = min(2r + 1, 4)`` was fastest on CPU at 32x32 latents
(see ``benchmarks/attention.py``) and is a config knob (``MVCustomConfig.stt_tile``). SDPA
picks the fused kernel the device offers (CUDA's memory-efficient kernel takes the mask). Cost
not yet removed: the boolean mask is built per tile, ``H*W*F * (T+2r)^2*F`` entries per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

FULL = -1
"""Radius value meaning "the whole feature map" (full 3D attention)."""


def is_full(radius: int, height: int, width: int) -> bool:
    """Whether a window of ``radius`` covers every position of an ``height x width`` map."""
    return radius < 0 or radius >= max(height, width) - 1


def spatio_temporal_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    radius: int,
    scale: float | None = None,
    tile: int | None = None,
) -> Tensor:
    """Attention of every ``(f, y, x)`` to all frames within a spatial window of ``radius``.

    Args:
        query, key, value: ``(B, heads, H, W, F, head_dim)``.
        radius: window radius in feature-map pixels; ``0`` = 1D temporal attention,
            ``-1`` or ``>= max(H, W) - 1`` = full 3D attention.
        scale: softmax scale (default ``head_dim ** -0.5``).
        tile: query tile side for the windowed case (default ``min(2 * radius + 1, 4)``).
    Returns:
        ``(B, heads, H, W, F, head_dim)``.
    """
    if query.ndim != 6 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "query, key, value must share shape (B, heads, H, W, F, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    B, nh, H, W, Fr, d = query.shape
    # The reshapes below are views when the inputs are permuted views of (B, H, W, F, heads, d)
    # memory, which is how the processor produces them (no copies on the r = 0 and full paths).
    if radius == 0:
        flat = [x.permute(0, 2, 3, 1, 4, 5).reshape(B * H * W, nh, Fr, d) for x in (query, key, value)]
        out = F.scaled_dot_product_attention(*flat, scale=scale)
        return out.reshape(B, H, W, nh, Fr, d).permute(0, 3, 1, 2, 4, 5)
    if is_full(radius, H, W):
        flat = [
            x.permute(0, 2, 3, 4, 1, 5).reshape(B, H * W * Fr, nh, d).transpose(1, 2)
            for x in (query, key, value)
        ]
        out = F.scaled_dot_product_attention(*flat, scale=scale)
        return out.transpose(1, 2).reshape(B, H, W, Fr, nh, d).permute(0, 4, 1, 2, 3, 5)
    return _halo_attention(query, key, value, radius, scale, tile or min(2 * radius + 1, 4))


def _halo_mask(H: int, W: int, Fr: int, radius: int, T: int, device) -> Tensor:
    """``(tiles, T*T*F, S*S*F)`` boolean mask, ``S = T + 2r``: True where attention is allowed."""
    nH, nW = math.ceil(H / T), math.ceil(W / T)
    S = T + 2 * radius
    a = torch.arange(T, device=device)  # query offset inside its tile
    s = torch.arange(S, device=device)  # key offset inside the halo (halo starts r before the tile)
    window = (s[None, :] - radius - a[:, None]).abs() <= radius  # (T, S), per axis
    tiles_h = torch.arange(nH, device=device) * T
    tiles_w = torch.arange(nW, device=device) * T
    key_ok_h = ((tiles_h[:, None] + s[None, :] - radius) >= 0) & ((tiles_h[:, None] + s - radius) < H)
    key_ok_w = ((tiles_w[:, None] + s[None, :] - radius) >= 0) & ((tiles_w[:, None] + s - radius) < W)
    q_pad_h = (tiles_h[:, None] + a[None, :]) >= H  # (nH, T) query rows that are padding
    q_pad_w = (tiles_w[:, None] + a[None, :]) >= W
    # axes: tile_h, tile_w, qa, qb, ka, kb
    win = window[None, None, :, None, :, None] & window[None, None, None, :, None, :]
    key_ok = key_ok_h[:, None, None, None, :, None] & key_ok_w[None, :, None, None, None, :]
    # A padded query row keeps its (discarded) output finite by attending to its whole window.
    q_pad = q_pad_h[:, None, :, None, None, None] | q_pad_w[None, :, None, :, None, None]
    mask = win & (key_ok | q_pad)  # (nH, nW, T, T, S, S)
    mask = mask.reshape(nH * nW, T * T, 1, S * S, 1).expand(-1, -1, Fr, -1, Fr)
    return mask.reshape(nH * nW, T * T * Fr, S * S * Fr)


def _halo_attention(query: Tensor, key: Tensor, value: Tensor, radius: int, scale, T: int) -> Tensor:
    B, nh, H, W, Fr, d = query.shape
    nH, nW = math.ceil(H / T), math.ceil(W / T)
    Hp, Wp = nH * T, nW * T
    S = T + 2 * radius
    # pad order for F.pad starts at the last dim: (d, F, W, H)
    q = F.pad(query, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
    kv_pad = (0, 0, 0, 0, radius, radius + Wp - W, radius, radius + Hp - H)
    k = F.pad(key, kv_pad)
    v = F.pad(value, kv_pad)
    q = q.reshape(B, nh, nH, T, nW, T, Fr, d).permute(2, 4, 0, 1, 3, 5, 6, 7)
    q = q.reshape(nH * nW, B * nh, T * T * Fr, d)

    def halo(x: Tensor) -> Tensor:  # (B, nh, Hp+2r, Wp+2r, F, d) -> (tiles, B*nh, S*S*F, d)
        x = x.unfold(2, S, T).unfold(3, S, T)  # (B, nh, nH, nW, F, d, S, S)
        x = x.permute(2, 3, 0, 1, 6, 7, 4, 5)  # (nH, nW, B, nh, S, S, F, d)
        return x.reshape(nH * nW, B * nh, S * S * Fr, d)

    mask = _halo_mask(H, W, Fr, radius, T, query.device).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, halo(k), halo(v), attn_mask=mask, scale=scale)
    out = out.reshape(nH, nW, B, nh, T, T, Fr, d).permute(2, 3, 0, 4, 1, 5, 6, 7)
    return out.reshape(B, nh, Hp, Wp, Fr, d)[:, :, :H, :W]


def reference_spatio_temporal_attention(
    query: Tensor, key: Tensor, value: Tensor, radius: int, scale: float | None = None
) -> Tensor:
    """Straightforward reference: one dense ``(F*H*W)^2`` mask (tests and benchmarks only)."""
    B, nh, H, W, Fr, d = query.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys = ys.reshape(-1, 1).expand(-1, Fr).reshape(-1)
    xs = xs.reshape(-1, 1).expand(-1, Fr).reshape(-1)
    r = max(H, W) if radius < 0 else radius
    mask = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
    flat = [x.reshape(B, nh, H * W * Fr, d) for x in (query, key, value)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask.to(query.device), scale=scale)
    return out.reshape(B, nh, H, W, Fr, d)


class SpatioTemporalAttnProcessor:
    """diffusers attention processor for the motion modules' self-attention layers.

    The motion transformer hands it tokens laid out ``(B * H * W, F, C)`` (rows ``b, y, x``) and
    ``spatial_shape=(H, W)`` plus the ``radius`` in force through ``cross_attention_kwargs``; with
    no ``spatial_shape`` (a stock AnimateDiff caller) it is plain temporal attention. The weights
    are the layer's own ``to_q/to_k/to_v/to_out``, so the pretrained motion module is reused as is.
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        spatial_shape: tuple[int, int] | None = None,
        radius: int = 0,
        tile: int | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SpatioTemporalAttnProcessor serves self-attention without masks only")
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise ValueError("SpatioTemporalAttnProcessor does not support norms inside the attention")
        BHW, Fr, _ = hidden_states.shape
        H, W = spatial_shape if spatial_shape is not None else (1, 1)
        if spatial_shape is None:
            radius = 0
        if BHW % (H * W):
            raise ValueError(f"{BHW} token rows do not split into feature maps of {H}x{W}")
        B = BHW // (H * W)
        nh = attn.heads

        def split(x: Tensor) -> Tensor:  # (B*H*W, F, nh*d) -> (B, nh, H, W, F, d)
            return x.reshape(B, H, W, Fr, nh, -1).permute(0, 4, 1, 2, 3, 5)

        q, k, v = (split(layer(hidden_states)) for layer in (attn.to_q, attn.to_k, attn.to_v))
        out = spatio_temporal_attention(q, k, v, radius, scale=attn.scale, tile=tile)
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(BHW, Fr, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def radius_at(schedule: list[tuple[int, int]] | list[list[int]], step: int) -> int:
    """The STT radius in force at ``step`` of a progressive schedule ``[[step, radius], ...]``
    (sorted by step, starting at 0): the radius of the last entry whose step is ``<= step``."""
    if not schedule or schedule[0][0] != 0:
        raise ValueError(f"an STT radius schedule must start at step 0, got {schedule}")
    radius = schedule[0][1]
    for start, r in schedule:
        if start > step:
            break
        radius = r
    return int(radius)
