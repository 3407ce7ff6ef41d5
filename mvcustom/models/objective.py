"""Training objective and the trainable-parameter sets of the two stages (DESIGN.md §1).

* ``backbone`` (stage 1, video clips): the motion modules (their STT attention included) and the
  camera encoder with its merges. Everything of Stable Diffusion stays frozen.
* ``customize`` (stage 2, one subject): the pose-conditioned blocks (FeatureNeRFs and their
  fusion layers) and the subject token's embedding rows. The backbone stays frozen (the paper
  leaves open whether STT is tuned per subject, PAPER.md §3; not here).

Loss (CD360's recipe, PAPER.md §3; weights in :class:`mvcustom.configs.model.LossConfig`, the
training config's ``loss`` section): the denoising MSE on the scheduler's prediction target
(epsilon or v), masked to the subject where the batch has masks and ``loss.masked``; in stage 2
plus, per pose-conditioned block (:func:`featurenerf_losses`), the FeatureNeRF opacity pushed to 1
on the subject (MSE, weight 10) and to 0 off it (L1, weight 10), and its rendered colour against
the target frame with the background composited to 0 (MSE, weight 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mvcustom.configs.model import LossConfig
from mvcustom.models.featurenerf import RenderOutput
from mvcustom.models.mvcustom import ClipCameras, MVCustomModel, References

Tensor = torch.Tensor

STAGES = ("backbone", "customize")


def _in_stage(name: str, stage: str) -> bool:
    if stage == "backbone":
        return (name.startswith("unet.") and ".motion_modules." in name) or name.startswith(
            ("camera_encoder.", "camera_merges.")
        )
    if stage == "customize":
        return name.startswith("pose_blocks.") or name.endswith("token_embedding.extra")
    raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")


def trainable_parameters(model: MVCustomModel, stage: str) -> dict[str, torch.nn.Parameter]:
    """The named parameters a stage trains (see the module docstring)."""
    params = {n: p for n, p in model.named_parameters() if _in_stage(n, stage)}
    if not params:
        raise ValueError(
            f"stage {stage!r} has nothing to train in this model "
            "(customize needs featurenerf_blocks or subject_tokens)"
        )
    return params


def set_trainable(model: MVCustomModel, stage: str) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the stage's parameters; returns them."""
    params = trainable_parameters(model, stage)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


def prediction_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the denoiser must predict: ``noise`` (epsilon) or ``sqrt(a) noise - sqrt(1-a) x0`` (v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use epsilon or v_prediction")


def _mask_at(mask: Tensor, hw: tuple[int, int]) -> Tensor:
    """``mask (B, F, H, W)`` in [0, 1] -> ``(B, F, h, w)`` by area averaging."""
    B, Fr = mask.shape[:2]
    return F.adaptive_avg_pool2d(mask.reshape(B * Fr, 1, *mask.shape[2:]).float(), hw).reshape(B, Fr, *hw)


def _cameras(batch: dict, prefix: str, image_hw: tuple[int, int]) -> ClipCameras | None:
    if f"{prefix}extrinsics" not in batch:
        return None
    return ClipCameras(batch[f"{prefix}extrinsics"].float(), batch[f"{prefix}intrinsics"].float(), image_hw)


def diffusion_loss(
    model: MVCustomModel,
    batch: dict,
    scheduler,
    stage: str,
    radius: int = 0,
    loss_config: LossConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One training step's loss.

    Args:
        batch: ``frames (B, F, 3, H, W)`` in ``[-1, 1]``, ``caption`` (list of B prompts),
            optional ``extrinsics (B, F, 4, 4)`` / ``intrinsics (B, F, 3, 3)`` (camera
            conditioning), ``mask (B, F, H, W)``, and for stage 2 ``reference_frames (B, K, 3, H, W)``
            with ``reference_extrinsics`` / ``reference_intrinsics`` (and ``reference_mask``).
        scheduler: a diffusers noise scheduler (``add_noise``, ``config.prediction_type``).
        radius: the STT radius in force (:func:`mvcustom.models.attention.radius_at`).
        loss_config: the terms' weights (default: CD360's).
    Returns:
        ``(loss, figures)`` with the loss terms as floats for logging.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    weights = loss_config or LossConfig()
    frames = batch["frames"].to(model.device)
    B, Fr, _, H, W = frames.shape
    with torch.no_grad():
        latents = model.encode_frames(frames, generator).float()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (B,), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)

    captions = batch["caption"]
    text = model.encode_prompt([captions] if isinstance(captions, str) else list(captions))
    cameras = _cameras(batch, "", (H, W))
    references = None
    if stage == "customize" and "reference_frames" in batch:
        ref_cams = _cameras(batch, "reference_", (H, W))
        if ref_cams is None:
            raise ValueError("reference_frames need reference_extrinsics and reference_intrinsics")
        with torch.no_grad():
            ref_latents = model.encode_frames(batch["reference_frames"].to(model.device), generator)
        references = References(ref_latents, ref_cams)
    out = model(noisy, timesteps, text, cameras, references, radius=radius)

    err = (out.sample.float() - target.float()) ** 2  # (B, F, C, h, w)
    figures: dict[str, float] = {}
    if weights.masked and stage == "customize" and "mask" in batch:
        w = _mask_at(batch["mask"].to(err.device), tuple(err.shape[-2:])).unsqueeze(2)
        loss = (err * w).sum() / (w.sum() * err.shape[2]).clamp_min(1.0)
    else:
        loss = err.mean()
    figures["loss_denoise"] = float(loss.detach())
    if out.renders and "mask" in batch:
        terms = featurenerf_losses(out.renders, batch["mask"].to(err.device), frames)
        for name, value in terms.items():
            loss = loss + getattr(weights, name) * value
            figures[f"loss_{name}"] = float(value.detach())
    figures["loss"] = float(loss.detach())
    return loss, figures


def featurenerf_losses(renders: dict[int, RenderOutput], mask: Tensor, frames: Tensor) -> dict[str, Tensor]:
    """CD360's FeatureNeRF terms, each averaged over the pose-conditioned blocks.

    Args:
        renders: per block, what its FeatureNeRF rendered at the target cameras.
        mask: ``(B, F, H, W)`` subject masks in ``[0, 1]``; frames: ``(B, F, 3, H, W)`` in ``[-1, 1]``.
    Returns:
        ``fg_opacity``: mean of ``(opacity - 1)^2`` on the subject; ``bg_alpha``: mean of
        ``|opacity|`` off it; ``rgb``: mean of ``(rendered colour - frame * subject)^2`` over all
        pixels (the rendered colour is premultiplied by opacity, so the background's target is
        0). Masks and frames are area-averaged to each block's resolution; a pixel is subject
        where its averaged mask exceeds 0.5.
    """
    fg_terms, bg_terms, rgb_terms = [], [], []
    for render in renders.values():
        hw = tuple(render.opacity.shape[-2:])
        m = _mask_at(mask, hw)
        fg, bg = (m > 0.5).float(), (m <= 0.5).float()
        fg_terms.append(((render.opacity.float() - 1) ** 2 * fg).sum() / fg.sum().clamp_min(1))
        bg_terms.append((render.opacity.float().abs() * bg).sum() / bg.sum().clamp_min(1))
        B, Fr = frames.shape[:2]
        target = F.adaptive_avg_pool2d(frames.reshape(B * Fr, 3, *frames.shape[-2:]).float(), hw)
        target = target.reshape(B, Fr, 3, *hw) * fg.unsqueeze(2)
        rgb_terms.append(((render.rgb.float() - target) ** 2).mean())
    return {
        "fg_opacity": torch.stack(fg_terms).mean(),
        "bg_alpha": torch.stack(bg_terms).mean(),
        "rgb": torch.stack(rgb_terms).mean(),
    }
