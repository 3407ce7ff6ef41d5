"""A readable DDIM sampling loop that takes the denoiser as an argument (DESIGN.md §6.5).

``denoise(latents, t) -> prediction`` is any callable (the model with its conditioning bound,
classifier-free guidance applied by the caller); the scheduler (diffusers ``DDIMScheduler``, built
from the model's own schedule by :func:`mvcustom.models.schedule.build_scheduler`, the function
training draws its noise with) turns predictions into the next latents. ``step_hook(i, t_next, latents, x0) -> latents`` lets
inference strategies (anchor replay, latent completion) intervene between steps without forking
the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def predict_x0(scheduler, sample: Tensor, prediction: Tensor, timestep) -> Tensor:
    """The clean latent implied by ``prediction`` at ``timestep`` (epsilon, v or sample)."""
    t = int(timestep)
    a = scheduler.alphas_cumprod[t].to(sample.device, torch.float32)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * prediction) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * prediction
    if kind == "sample":
        return prediction
    raise ValueError(f"unsupported prediction_type {kind!r}")


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
    step_hook: Callable[[int, Tensor | None, Tensor, Tensor], Tensor] | None = None,
    noise: Tensor | None = None,
    progress: Callable | None = None,
) -> Tensor:
    """Sample latents of ``shape`` (``(B, F, C, h, w)``) from pure noise in ``num_steps`` steps.

    ``noise``: the initial noise (default: drawn from ``generator``), so several passes can share
    it. ``step_hook(i, t_next, latents, x0)``: called after step ``i`` with the latents at
    ``t_next`` (``None`` after the last step) and that step's clean estimate; returns the latents
    to go on with. ``progress``: wraps the timesteps (e.g. a pipeline's progress bar).
    """
    scheduler.set_timesteps(num_steps, device=device)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    latents = noise * scheduler.init_noise_sigma
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        prediction = denoise(latents.to(dtype), t.expand(shape[0])).float()
        x0 = predict_x0(scheduler, latents, prediction, t) if step_hook is not None else None
        latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator).prev_sample
        if step_hook is not None:
            latents = step_hook(i, timesteps[i + 1] if i + 1 < len(timesteps) else None, latents, x0)
    return latents


def video_grid(frames: Tensor, max_clips: int = 4) -> np.ndarray:  # noqa: F821
    """``frames (B, F, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(B*H, F*W, 3)`` grid (clips as rows)."""
    import numpy as np

    x = frames[:max_clips].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    B, Fr, C, H, W = x.shape
    grid = x.permute(0, 3, 1, 4, 2).reshape(B * H, Fr * W, C)
    return np.ascontiguousarray(grid.cpu().numpy())
