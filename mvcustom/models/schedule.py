"""The diffusion schedule: one builder for training's noise and inference's sampler.

A model is trained on one noise schedule (betas, prediction type, ...) and can only be sampled
with that schedule. Both sides therefore build their scheduler here, from the model's scheduler
config (``model.scheduler_config``; on disk ``scheduler/scheduler_config.json`` of an export),
through diffusers' own ``DDIMScheduler.from_config``, so every key the class defines is honoured:
``beta_*``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``, ``steps_offset``,
``set_alpha_to_one``, ``clip_sample`` (and its range), ``thresholding`` and
``rescale_betas_zero_snr``. Training uses the same class for ``add_noise`` and ``get_velocity``
(the forward process depends only on the betas), so training's and inference's
``alphas_cumprod`` are one tensor computed by one code path.

Refused, with the key named: a key DDIM does not know (it would be silently ignored: a schedule
from another scheduler family the sampler cannot follow), except the few that only steer other
families' samplers (:data:`IGNORED_KEYS`); and a zero-terminal-SNR schedule with epsilon
prediction (at the last timestep the noisy sample is pure noise, so an epsilon prediction says
nothing about the clean sample; use ``v_prediction``, as the zero-SNR recipe does).
"""

from __future__ import annotations

#: Keys other diffusers schedulers write into a config that change only how *they* sample, not
#: the noise levels a model is trained on: PNDM's Runge-Kutta warm-up (SD 1.5's shipped
#: scheduler is PNDM) and DDPM's ancestral-variance choice. Dropped without a word.
IGNORED_KEYS = ("skip_prk_steps", "variance_type")


def clean_scheduler_config(config: dict, source: str = "the model's scheduler config") -> dict:
    """``config`` without diffusers' private keys (``_class_name``, ...) and :data:`IGNORED_KEYS`,
    checked: a key ``DDIMScheduler`` does not define, or zero terminal SNR with epsilon
    prediction, is a ``ValueError`` naming ``source``."""
    import inspect

    from diffusers import DDIMScheduler

    out = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in IGNORED_KEYS}
    # the signature, not diffusers' extract_init_dict, which silently drops the keys of every
    # "compatible" scheduler class (use_karras_sigmas, ...)
    known = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    unknown = set(out) - known
    if unknown:
        raise ValueError(
            f"{source}: scheduler key(s) {sorted(unknown)} are not DDIMScheduler settings, so sampling "
            "would silently ignore them and follow another schedule than the one trained on. Remove them, "
            "or express the schedule in DDIM's keys (beta_start, beta_end, beta_schedule, trained_betas, "
            "prediction_type, timestep_spacing, rescale_betas_zero_snr, ...)"
        )
    if out.get("rescale_betas_zero_snr") and out.get("prediction_type", "epsilon") == "epsilon":
        raise ValueError(
            f"{source}: rescale_betas_zero_snr=true needs prediction_type v_prediction (or sample): at zero "
            "terminal SNR the last timestep's input is pure noise and an epsilon prediction cannot recover "
            "the clean sample"
        )
    return out


def build_scheduler(config: dict, source: str = "the model's scheduler config"):
    """The one scheduler of a model's schedule (a fresh diffusers ``DDIMScheduler``): training
    draws its noise with it (``add_noise``, ``get_velocity``), inference samples with it
    (``set_timesteps``, ``step``). ``source`` names where ``config`` came from in errors."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(clean_scheduler_config(config, source))


def check_same_schedule(scheduler, config: dict, source: str = "the model") -> None:
    """Refuse a sampler whose noise levels or prediction type differ from the schedule the model
    was trained on (``config``): its samples would be wrong however good the model."""
    import torch

    trained = build_scheduler(config, source)
    a, b = trained.alphas_cumprod, getattr(scheduler, "alphas_cumprod", None)
    same_levels = b is not None and b.shape == a.shape and torch.allclose(b.double(), a.double(), rtol=1e-6)
    if not same_levels or scheduler.config.prediction_type != trained.config.prediction_type:
        have = {
            k: scheduler.config.get(k) for k in ("beta_schedule", "beta_start", "beta_end", "prediction_type")
        }
        want = {k: trained.config.get(k) for k in have}
        raise ValueError(
            f"the sampler's schedule {have} differs from the one {source} was trained with {want}"
            f"{'' if same_levels else ' (different noise levels)'}: build it with "
            "mvcustom.models.schedule.build_scheduler(model.scheduler_config), or pass none"
        )
