"""The small interface the training loop runs against (DESIGN.md §6.11).

:class:`TrainContext` is all the loop knows of where it runs: rank, world size, device, how to
report metrics with a checkpoint folder, and the checkpoint to resume from. :class:`RayContext`
implements it under Ray Train (``ray.train.report`` / ``get_checkpoint``);
:class:`LocalContext` in a plain process (tests, debugging), where reported checkpoints are
copied to ``<output>/checkpoints/``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch


@dataclass
class TrainContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        raise NotImplementedError

    def latest_checkpoint(self) -> str | None:
        """A local folder holding the checkpoint to resume from (``None``: start fresh)."""
        raise NotImplementedError


def _device(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("scaling.use_gpu is set but this worker sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class LocalContext(TrainContext):
    """One process, or one rank of a ``torch.distributed`` job started elsewhere (torchrun)."""

    def __init__(self, output_dir: str, resume_from: str | None = None, use_gpu: bool = False):
        rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        super().__init__(rank, int(os.environ.get("WORLD_SIZE", 1)), local, _device(local, use_gpu))
        self.output_dir = output_dir
        self.resume_from = resume_from
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = os.path.join(self.output_dir, "checkpoints", f"step_{int(metrics['step']):08d}")
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            self.resume_from = dest

    def latest_checkpoint(self) -> str | None:
        return self.resume_from


class RayContext(TrainContext):
    """Inside a Ray Train worker (``TorchTrainer``'s ``train_loop_per_worker``)."""

    def __init__(self, resume_from: str | None = None, use_gpu: bool = False):
        import ray.train

        ctx = ray.train.get_context()
        local = ctx.get_local_rank()
        super().__init__(ctx.get_world_rank(), ctx.get_world_size(), local, _device(local, use_gpu))
        self.resume_from = resume_from
        self._held = None  # keeps a downloaded checkpoint folder alive

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> str | None:
        import ray.train

        # A restarted worker group (FailureConfig) gets the run's latest reported checkpoint;
        # a resubmitted job gets the one the launcher found in storage (``resume_from``). Ray
        # Train also restores a resubmitted run's newest checkpoint from storage, whether or
        # not every rank's files reached it: that one is used only when it is complete.
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            import fsspec

            from mvcustom.training.launch import checkpoint_complete

            self._held = ckpt.as_directory()
            local = self._held.__enter__()
            marker, why = checkpoint_complete(fsspec.filesystem("file"), local)
            if marker is not None:
                return local
            print(f"[rank {self.rank}] not resuming Ray's checkpoint {ckpt.path}: {why}", flush=True)
            self._held.__exit__(None, None, None)
            self._held = None
        return self.resume_from
