"""An oracle denoiser, to test a sampler against an answer it did not produce.

The oracle knows the clean latents ``x0`` of a clip and the training schedule, whose noise levels
it computes itself from the config's numbers (:func:`reference_alphas_cumprod`: DDPM's linear and
scaled-linear betas and the zero-terminal-SNR rescaling, written without diffusers), and answers
every call with the exact epsilon or v of its input. A sampler driven by it must land on ``x0``
(up to the noise its last step leaves); one on another schedule than training's does not. It
stands in for :class:`mvcustom.models.MVCustomModel` inside :class:`MVCustomPipeline`
(``pipe.model.forward = OracleDenoiser(...)``), so the whole generate path is what is tested.
"""

from __future__ import annotations

import numpy as np
import torch

from mvcustom.models.components import SD_SCHEDULER
from mvcustom.models.mvcustom import DenoiseOutput

Tensor = torch.Tensor

#: The schedules the sampler is checked on: SD 1.5's (epsilon), v-prediction, and zero terminal
#: SNR with trailing spacing (``tests/test_sampling.py``, ``benchmarks/gpu_check.py``).
ORACLE_SCHEDULES = {
    "sd15_epsilon": dict(SD_SCHEDULER),
    "sd15_v": dict(SD_SCHEDULER, prediction_type="v_prediction"),
    "zero_snr_trailing_v": dict(
        SD_SCHEDULER, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ),
}


def reference_alphas_cumprod(config: dict) -> np.ndarray:
    """The training schedule's cumulative alphas from ``config``'s numbers (DDPM's definitions;
    zero terminal SNR: Lin et al. 2024, Algorithm 1), float64, independent of diffusers."""
    n, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n) ** 2
    elif config["beta_schedule"] == "linear":
        betas = np.linspace(b0, b1, n)
    else:
        raise ValueError(
            f"reference_alphas_cumprod knows linear and scaled_linear, not {config['beta_schedule']!r}"
        )
    alphas_cumprod = np.cumprod(1 - betas)
    if config.get("rescale_betas_zero_snr"):
        s = np.sqrt(alphas_cumprod)
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])  # the first level kept, the last one zero
        alphas_cumprod = s**2
    return alphas_cumprod


class OracleDenoiser:
    """A perfect denoiser for the clean latents ``x0 (1, F, C, h, w)`` seen from ``w2c (F, 4, 4)``
    under the training schedule ``config``. Called as the model is (``latents (B, F', C, h, w)``,
    ``timesteps (B,)``, text, cameras, ...), it finds each of the ``F'`` frames by its camera
    (the pipeline's anchor pass samples the anchor frames alone) and returns their exact
    prediction in the latents' dtype and device. ``calls`` counts the calls."""

    def __init__(self, x0: Tensor, w2c: Tensor, config: dict):
        self.x0, self.w2c = x0.double().cpu(), w2c.double().cpu()
        self.abar = torch.from_numpy(reference_alphas_cumprod(config))
        self.kind = config["prediction_type"]
        self.calls = 0

    def __call__(self, latents, timesteps, text, cameras, references=None, radius=0, *args, **kwargs):
        self.calls += 1
        w2c = cameras.w2c[0].double().cpu()  # (F', 4, 4): which frames of the clip these are
        index = [int((self.w2c - c).abs().flatten(1).sum(1).argmin()) for c in w2c]
        x0 = self.x0[:, index].expand(latents.shape[0], -1, -1, -1, -1)
        a = self.abar[timesteps.cpu().long()].view(-1, 1, 1, 1, 1)
        x = latents.double().cpu()
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        pred = eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return DenoiseOutput(sample=pred.to(latents.device, latents.dtype))
