"""Stand-ins for the pretrained parts, trained from scratch by plain loops (small-scale runs).

MVCustom starts from Stable Diffusion 1.5's VAE and image UNet, which stage 1 keeps frozen. Where
those weights cannot be had (CI, the learning test, the micro-reproduction), a tiny model's random
VAE cannot reconstruct anything and its random image layers know no image, so nothing trained on
top of them could show that it learned. These loops train the two stand-ins on the run's own
frames, before the project's training job trains what MVCustom trains:

* :func:`train_vae`: the autoencoder (reconstruction MSE plus a small KL term, as SD's VAE), then
  its ``scaling_factor`` set to ``1 / std`` of the latents, as SD did, so the diffusion sees
  latents of unit variance;
* :func:`train_image_prior`: the UNet's image (spatial) layers on single frames with their
  prompts, the diffusion loss of the model's own schedule (stage 1 then trains the motion modules
  and the camera encoder over it);
* :func:`train_depth` (saved by :func:`save_depth_model`): ZoeDepth on the frames' exact depths,
  the stand-in for the depth estimator that depth-aware feature rendering uses at inference.
"""

from __future__ import annotations

import torch

from mvcustom.metrics.fidelity import psnr
from mvcustom.models.mvcustom import MVCustomModel

Tensor = torch.Tensor


def train_vae(
    model: MVCustomModel,
    frames: Tensor,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 16,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> dict:
    """Train ``model.vae`` to autoencode ``frames (N, 3, H, W)`` in ``[-1, 1]``; returns figures
    (``vae_psnr``: reconstruction PSNR of the posterior mean on ``frames``, ``scaling_factor``)."""
    vae = model.vae
    vae.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, frames.shape[0], (min(batch_size, frames.shape[0]),), generator=g)
        x = frames[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mode() for x in frames.split(batch_size)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(batch_size)]).clamp(-1, 1)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return {"vae_psnr": float(psnr(recon, frames)), "scaling_factor": float(vae.config.scaling_factor)}


def train_image_prior(
    model: MVCustomModel,
    frames: Tensor,
    captions: list[str],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> dict:
    """Train the UNet's image layers (everything but the motion modules) as a text-to-image
    model on single frames ``(N, 3, H, W)`` with ``captions`` (one per frame); returns the mean
    loss of the last tenth of the steps."""
    from mvcustom.models.objective import diffusion_loss
    from mvcustom.models.schedule import build_scheduler

    params = [p for n, p in model.unet.named_parameters() if ".motion_modules." not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scheduler = build_scheduler(model.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, frames.shape[0], (min(batch_size, frames.shape[0]),), generator=g)
        batch = {"frames": frames[idx].unsqueeze(1), "caption": [captions[int(i)] for i in idx]}
        loss, _ = diffusion_loss(model, batch, scheduler, "backbone", generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"prior_loss": sum(tail) / len(tail)}


def train_depth(
    model,
    frames: Tensor,
    depths: Tensor,
    steps: int,
    input_size: tuple[int, int] = (64, 64),
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Train a ZoeDepth (``transformers.ZoeDepthForDepthEstimation``, e.g. the tiny random one)
    on frames ``(N, 3, H, W)`` in ``[-1, 1]`` and their depths ``(N, H, W)`` (0 = unknown): an
    L1 loss on log depth over the known pixels, through the same pre- and post-processing as
    :class:`~mvcustom.models.zoedepth.DepthEstimator` at ``input_size``, with random horizontal
    flips (inference averages the mirrored prediction). The stand-in for ZoeDepth's pretrained
    weights, so that depth-aware feature rendering gets a depth that has learned the scenes.
    Returns ``abs_rel`` (mean ``|d - d*| / d*`` over the known pixels, via ``DepthEstimator``)
    before and after."""
    from mvcustom.models.zoedepth import DepthEstimator, postprocess, preprocess

    u8 = ((frames.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    depths = depths.float()

    def abs_rel() -> float:
        est = DepthEstimator(model, device="cpu", input_size=input_size, batch_size=batch_size)
        pred = torch.from_numpy(est(u8.numpy()))
        known = depths > 0
        return float(((pred - depths).abs()[known] / depths[known]).mean())

    before = abs_rel()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    H, W = depths.shape[-2:]
    for _ in range(steps):
        idx = torch.randint(0, len(u8), (min(batch_size, len(u8)),), generator=g)
        x, d = u8[idx], depths[idx]
        if bool(torch.rand((), generator=g) < 0.5):
            x, d = torch.flip(x, dims=[2]), torch.flip(d, dims=[-1])
        pv, pads = preprocess(x, input_size)
        pred = postprocess(model(pixel_values=pv).predicted_depth, (H, W), pads)
        known = d > 0
        loss = (pred.clamp_min(1e-4).log() - d.clamp_min(1e-4).log()).abs()[known].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {"depth_abs_rel_before": before, "depth_abs_rel": abs_rel()}


def save_depth_model(model, path: str, input_size: tuple[int, int]) -> str:
    """Save a trained ZoeDepth stand-in as a ``from_pretrained`` folder whose
    ``preprocessor_config.json`` names the ``input_size`` it was trained at (what
    :class:`~mvcustom.models.zoedepth.DepthEstimator` reads when given no size)."""
    import json
    import os

    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "ZoeDepthImageProcessor",
                "size": dict(zip(("height", "width"), input_size, strict=True)),
            },
            f,
        )
    return path
