"""DeepSpeed set-up: the one place the model is wrapped (torchtitan's ``parallelize_*``).

The DeepSpeed JSON is derived from the typed config (one source of truth):
``deepspeed.zero_stage`` / ``offload_optimizer`` / ``precision``, ``batch_size``,
``optim.grad_accum`` and ``optim.grad_clip``; a ``deepspeed.config_file`` preset (tuning knobs,
``infra/deepspeed/*.json``) is merged over it, checked against the keys the typed config owns, and
``deepspeed.raw_override`` is merged last. The
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
    """The DeepSpeed JSON for a :class:`mvcustom.configs.train.TrainConfig`: derived from the typed
    config, then ``deepspeed.config_file`` (:func:`load_preset`), then ``deepspeed.raw_override``."""
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
    if out["bf16"]["enabled"]:
        # DeepSpeed >= 0.19 casts only the parameters to bf16 and keeps fp32 buffers, but the
        # motion modules' sinusoidal position table is a buffer: added in fp32 it upcasts the
        # hidden states and the next bf16 Linear fails ("float != BFloat16"). Cast buffers too,
        # as module.bfloat16() does (our geometry runs in fp32 explicitly, not through buffers).
        out["data_types"] = {"buffer_dtype": "bf16"}
    if ds.offload_optimizer:
        # DeepSpeed refuses a client optimizer under ZeRO-Offload unless told otherwise (it wants
        # its CPUAdam, which JIT-builds for ~40 s); our torch AdamW then steps on the CPU copy.
        out["zero_force_ds_cpu_optimizer"] = False
    if ds.config_file:
        out = _merge(out, load_preset(ds.config_file, out, cfg))
    return _merge(out, ds.raw_override)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: Keys of the DeepSpeed JSON that the typed config owns: (dotted key, the ``--set`` key that
#: changes it). A preset file may leave them out, say ``"auto"``, or repeat the typed value.
OWNED_KEYS = (
    ("train_micro_batch_size_per_gpu", "batch_size"),
    ("gradient_accumulation_steps", "optim.grad_accum"),
    ("gradient_clipping", "optim.grad_clip"),
    ("zero_optimization.stage", "deepspeed.zero_stage"),
    ("zero_optimization.offload_optimizer.device", "deepspeed.offload_optimizer"),
    ("zero_optimization.stage3_max_reuse_distance", "deepspeed.stage3_max_reuse_distance"),
    ("bf16.enabled", "deepspeed.precision"),
    ("fp16.enabled", "deepspeed.precision"),
)


def load_preset(path: str, derived: dict, cfg) -> dict:
    """The DeepSpeed JSON at ``path`` (any fsspec URL), its owned keys checked against ``derived``.

    ``"auto"`` takes the typed value (as in HF Trainer); a different value raises ``ValueError``
    naming the file, the key, both values and the ``--set`` key to use instead: the typed config
    stays the one source of truth, so the config MLflow logs is the one DeepSpeed ran.
    ``stage3_max_reuse_distance`` is owned only while the typed config puts it in the JSON (set,
    at stage 3); otherwise the file's value stands (``"auto"``: DeepSpeed's default).
    ``train_batch_size: "auto"`` is dropped: DeepSpeed derives it (micro-batch x accumulation x
    world size) and checks a number given there itself.
    """
    import json

    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf8") as f:
            preset = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"deepspeed.config_file {path!r} not found (a local path is read where the engine is "
            "built, e.g. in a Ray Train worker's own directory: give an absolute path or a URL)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(preset, dict):
        raise ValueError(f"{path}: the top level must be a JSON object")
    if preset.get("train_batch_size") == "auto":
        del preset["train_batch_size"]
    typed_values = {
        "zero_optimization.offload_optimizer.device": "cpu" if cfg.deepspeed.offload_optimizer else "none",
        "fp16.enabled": False,  # precision is bf16 or fp32
    }
    for key, set_key in OWNED_KEYS:
        *parents, leaf = key.split(".")
        node = _get(preset, ".".join(parents)) if parents else preset
        if not isinstance(node, dict) or leaf not in node:
            continue
        typed = typed_values[key] if key in typed_values else _get(derived, key)
        value = node[leaf]
        if typed is _MISSING:
            if value == "auto":
                del node[leaf]
        elif value == "auto":
            node[leaf] = typed
        elif not _same(value, typed):
            raise ValueError(
                f"{path}: {key} is {value!r} but the typed config gives {typed!r}. The typed config "
                f'owns this key: remove it from the file or write "auto", and change it with '
                f"--set {set_key}=... instead"
            )
    return preset


_MISSING = object()


def _get(d, dotted: str):
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return _MISSING
        d = d[p]
    return d


def _same(a, b) -> bool:
    """Equal JSON values, without Python's ``True == 1``."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


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

    def __init__(self, model: nn.Module, stage: str, scheduler, loss_config=None):
        super().__init__()
        self.model = model
        self.stage = stage
        self.noise_scheduler = scheduler
        self.loss_config = loss_config

    def forward(self, batch: dict, radius: int, generator: torch.Generator):
        return diffusion_loss(
            self.model,
            batch,
            self.noise_scheduler,
            self.stage,
            radius=radius,
            loss_config=self.loss_config,
            generator=generator,
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
