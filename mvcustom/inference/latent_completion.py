"""Consistency-aware latent completion (paper §3.4, Fig. 3b; DESIGN.md §1, inference).

Feature rendering fills the pixels an anchor sees; the disoccluded ones (mask 0) would otherwise
keep stretched or repeated texture. For the first steps (``T`` down to ``tau``), the latent of
those pixels is rebuilt from the model's own clean estimate: predict ``x0`` from ``x_t``, put it
back to the current noise level with the forward process and fresh noise, and blend it into the
disoccluded region only, so the motion modules re-synthesise it coherently with the covered
frames. Choices the paper leaves open (PAPER.md §5, §8.6), ours: one re-noising per step, fresh
noise from the sampler's generator each step, no mask dilation.
"""

from __future__ import annotations

import torch

from mvcustom.inference.sampler import predict_x0  # noqa: F401  (re-exported: completion's x0)

Tensor = torch.Tensor


def renoise(scheduler, x0: Tensor, timestep, generator: torch.Generator | None = None) -> Tensor:
    """The forward process ``q(x_t | x0)``: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
    t = int(timestep)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    a = scheduler.alphas_cumprod[t].to(x0.device, x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def complete_latents(
    latents: Tensor,
    x0: Tensor,
    covered: Tensor,
    scheduler,
    timestep,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace the disoccluded region of ``latents (B, F, C, h, w)`` (at ``timestep``) by ``x0``
    re-noised to ``timestep``; ``covered (F, h, w)`` or ``(B, F, h, w)`` bool, True = keep."""
    if covered.shape[-2:] != latents.shape[-2:]:
        raise ValueError(f"mask {tuple(covered.shape)} does not match latents {tuple(latents.shape)}")
    keep = covered.to(latents.device).bool()
    keep = keep.unsqueeze(0) if keep.ndim == 3 else keep
    return torch.where(keep.unsqueeze(2), latents, renoise(scheduler, x0, timestep, generator))
