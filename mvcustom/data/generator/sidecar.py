"""Ground-truth sidecar helpers shared by the dataset writers."""

from __future__ import annotations

import io

import numpy as np
import torch

from mvcustom.data.generator.scene import Render


def sample_pixels(gen: torch.Generator, fg: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """``(count,)`` flat pixel indices, half on the subject and half elsewhere (where possible)."""
    idx_fg = torch.nonzero((fg & valid).reshape(-1)).squeeze(-1)
    idx_bg = torch.nonzero((~fg & valid).reshape(-1)).squeeze(-1)
    n_fg = min(count // 2, len(idx_fg))
    pick = [
        idx_fg[torch.randperm(len(idx_fg), generator=gen)[:n_fg]],
        idx_bg[torch.randperm(len(idx_bg), generator=gen)[: count - n_fg]],
    ]
    return torch.cat(pick)


def surface_samples(gen: torch.Generator, rend: Render, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, ``count`` pixel centres ``(N, P, 2)`` (corner-origin) and the world points
    ``(N, P, 3)`` their rays hit: what the renderer drew where, for reprojection tests."""
    W = rend.depth.shape[-1]
    uv, pts = [], []
    for i in range(rend.depth.shape[0]):
        pix = sample_pixels(gen, rend.foreground[i], rend.depth[i] > 0, count)
        uv.append(torch.stack([(pix % W).double() + 0.5, (pix // W).double() + 0.5], -1))
        pts.append(rend.points[i].reshape(-1, 3)[pix])
    return torch.stack(uv), torch.stack(pts)


def save_npz(fs, path: str, **arrays) -> None:
    """``np.savez_compressed`` through an fsspec filesystem."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
