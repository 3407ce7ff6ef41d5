"""A readable DDIM sampling loop that takes the denoiser as an argument (DESIGN.md §6.5).

``denoise(latents, t) -> prediction`` is any callable (the model with its conditioning bound,
classifier-free guidance applied by the caller); the scheduler (diffusers ``DDIMScheduler``)
turns predictions into the next latents. ``step_hook(i, t, latents, prediction) -> latents``
lets inference strategies (depth-aware feature rendering, latent completion) intervene between
steps without forking the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def ddim_scheduler(scheduler_config: dict):
    from diffusers import DDIMScheduler

    keys = DDIMScheduler.__init__.__code__.co_varnames
    return DDIMScheduler(**{k: v for k, v in scheduler_config.items() if k in keys})


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    scheduler,
    shape: tuple[int, ...],
    num_steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    eta: float = 0.0,
    step_hook: Callable[[int, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Sample latents of ``shape`` (``(B, F, C, h, w)``) from pure noise in ``num_steps`` steps."""
    scheduler.set_timesteps(num_steps, device=device)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        prediction = denoise(latents.to(dtype), t.expand(shape[0])).float()
        latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator).prev_sample
        if step_hook is not None:
            latents = step_hook(i, t, latents, prediction)
    return latents


def video_grid(frames: Tensor, max_clips: int = 4) -> np.ndarray:  # noqa: F821
    """``frames (B, F, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(B*H, F*W, 3)`` grid (clips as rows)."""
    import numpy as np

    x = frames[:max_clips].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    B, Fr, C, H, W = x.shape
    grid = x.permute(0, 3, 1, 4, 2).reshape(B * H, Fr * W, C)
    return np.ascontiguousarray(grid.cpu().numpy())
