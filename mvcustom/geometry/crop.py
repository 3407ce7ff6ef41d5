"""Image crop boxes: plain integer arithmetic, importable without torch (the decode-only
preprocessing path crops frames and never builds a camera)."""

from __future__ import annotations


def center_crop_box(H: int, W: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, crop_w, crop_h)`` of the largest centred crop of an ``H x W`` image with the
    aspect of ``height x width`` (integer pixels)."""
    if H <= 0 or W <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"sizes must be positive: image {H}x{W}, target {height}x{width}")
    if W * height > H * width:  # image is wider than the target: crop columns
        ch, cw = H, round(H * width / height)
    else:
        cw, ch = W, round(W * height / width)
    return (W - cw) // 2, (H - ch) // 2, cw, ch
