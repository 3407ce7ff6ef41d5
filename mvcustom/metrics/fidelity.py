"""Fidelity to a known true view: PSNR and SSIM, over the whole frame or a mask (the subject).

Where the truth is known (the generator renders the true view of a subject at any requested
camera: :mod:`mvcustom.data.generator.truth`), a generated frame can be scored against it, not
only for consistency with its neighbours. Images are tensors ``(..., 3, H, W)`` on one scale
whose peak-to-peak range is ``data_range`` (2 for ``[-1, 1]``, 255 for uint8 values).

SSIM is Wang et al. (2004): an 11-tap Gaussian window of sigma 1.5, ``K1 = 0.01``,
``K2 = 0.03``, per channel then averaged; borders are replicated. Masked, the SSIM map is averaged
over the mask's pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 2.0) -> Tensor:
    """PSNR in dB over all pixels, or over ``mask``'s (broadcast to the images)."""
    err = (a.double() - b.double()) ** 2
    if mask is not None:
        m = mask.double().expand_as(err)
        mse = (err * m).sum() / m.sum().clamp_min(1)
    else:
        mse = err.mean()
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: Tensor, b: Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """The SSIM map ``(N, C, H, W)`` of images ``(N, C, H, W)``."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"ssim needs two (N, C, H, W) images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    C = a.shape[1]
    g = _gaussian_window(window, sigma)
    kx = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), kx, groups=C)
        return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), ky, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 2.0) -> Tensor:
    """Mean SSIM of images ``(N, C, H, W)``, over all pixels or ``mask``'s (``(N, 1, H, W)`` or
    ``(N, H, W)``)."""
    m = ssim_map(a, b, data_range)
    if mask is None:
        return m.mean()
    w = (mask if mask.dim() == 4 else mask.unsqueeze(1)).double().expand_as(m)
    return (m * w).sum() / w.sum().clamp_min(1)


def truth_scores(frames: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Generated ``frames`` against the ``truth`` at the same cameras (both ``(N, H, W, 3)``
    uint8) and the subject's ``mask`` ``(N, H, W)``: PSNR and SSIM of the whole frame and of the
    subject (``None`` where the subject is out of view in every frame), and the subject's share
    of the pixels."""
    if frames.shape != truth.shape:
        raise ValueError(f"generated frames {frames.shape} and true views {truth.shape} differ in shape")
    a = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    b = torch.from_numpy(np.ascontiguousarray(truth)).permute(0, 3, 1, 2)
    m = torch.from_numpy(np.ascontiguousarray(mask)).bool().unsqueeze(1)
    has_subject = bool(m.any())
    return {
        "psnr_truth": float(psnr(a, b, data_range=255.0)),
        "ssim_truth": float(ssim(a, b, data_range=255.0)),
        "psnr_truth_subject": float(psnr(a, b, m, data_range=255.0)) if has_subject else None,
        "ssim_truth_subject": float(ssim(a, b, m, data_range=255.0)) if has_subject else None,
        "truth_subject_fraction": float(m.double().mean()),
    }
