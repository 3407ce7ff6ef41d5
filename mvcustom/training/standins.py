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
  and the camera encoder over it).
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
