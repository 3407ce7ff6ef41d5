"""DeepSpeed set-up: the one place the model is wrapped (torchtitan's ``parallelize_*``).

The DeepSpeed JSON is derived from the typed config (one source of truth):
``deepspeed.zero_stage`` / ``offload_optimizer`` / ``precision``, ``batch_size``,
``optim.grad_accum`` and ``optim.grad_clip``; ``deepspeed.raw_override`` is merged last. The
optimizer is a client ``torch.optim.AdamW`` over the stage's trainable parameters (DeepSpeed's
own Adam JIT-compiles a CPU kernel for ~40 s, STACK.md) and the LR schedule a ``LambdaLR``
(linear warmup, then constant or cosine to 0), which the engine steps at every optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mvcustom.models.objective import diffusion_loss


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(cfg, device: torch.device) -> dict:
    """The DeepSpeed JSON for a :class:`mvcustom.configs.train.TrainConfig`."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.zero_stage == 3:
        # let engine.save_16bit_model gather full weights (the export path does not rely on it)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.stage3_max_reuse_distance is not None:
            zero["stage3_max_reuse_distance"] = ds.stage3_max_reuse_distance
    out = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(ds.precision, device) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(out, ds.raw_override)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the peak LR at optimizer step ``s``: linear warmup, then constant/cosine."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


class TrainStep(nn.Module):
    """What DeepSpeed wraps: the model plus its loss, so ``engine(batch)`` is one forward."""

    def __init__(self, model: nn.Module, stage: str, scheduler):
        super().__init__()
        self.model = model
        self.stage = stage
        self.noise_scheduler = scheduler

    def forward(self, batch: dict, radius: int, generator: torch.Generator):
        return diffusion_loss(
            self.model, batch, self.noise_scheduler, self.stage, radius=radius, generator=generator
        )


def build_engine(step_module: TrainStep, params: dict, cfg, device: torch.device):
    """``deepspeed.initialize`` with our optimizer and schedule; returns the engine."""
    import deepspeed

    optimizer = torch.optim.AdamW(
        list(params.values()), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.999)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.schedule)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=step_module,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, device),
    )
    return engine
