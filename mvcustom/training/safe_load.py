"""Checkpoints load with ``torch.load(weights_only=True)`` (issue 7, security).

DeepSpeed's default checkpoint engine loads every ``*.pt`` file with ``weights_only=False``,
i.e. full pickle: a checkpoint folder in a shared bucket is then a way to run code on every
training worker that resumes from it. :func:`harden_checkpoint_loading` swaps the engine's
checkpoint engine for one that loads with ``weights_only=True`` and allows exactly the plain
value classes DeepSpeed's own ZeRO checkpoints hold besides tensors and builtins (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0/2/3 checkpoints, fp32 and bf16).
Anything else in a checkpoint is refused by torch with an error naming the class.
"""

from __future__ import annotations

import functools

import torch


def deepspeed_safe_globals() -> list:
    """The non-tensor classes in DeepSpeed ZeRO checkpoints (data holders, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_load(path: str, map_location=None):
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's value classes allowed."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@functools.cache
def _weights_only_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return weights_only_load(path, map_location)

    return WeightsOnlyCheckpointEngine


def harden_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file with :func:`weights_only_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: mvcustom loads "
            "checkpoints with torch.load(weights_only=True) through the default torch engine; remove "
            "'checkpoint.writer' / 'datastates' from deepspeed.raw_override"
        )
    current.__class__ = _weights_only_engine_class()  # same state, safe load
