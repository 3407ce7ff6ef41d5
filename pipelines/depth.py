"""ZoeDepth in the preprocessing pipeline.

Each actor loads the model once (:func:`load_estimator`), on a GPU when the actor was given one
(``depth.num_gpus``, fractional to share a GPU), and estimates depth for every frame of the
shards it handles, in batches of ``depth.batch_size`` frames: inside the shard workers
(``pipelines.preprocess.ShardWorker``, the fused layout) or as a stage of its own
(:class:`DepthStage`, the separate layout).
"""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
from PIL import Image

from mvcustom.configs.preprocess import DepthModelConfig
from mvcustom.data.schema import frame_members, npy_bytes

DEPTH_UNITS = "metres (ZoeDepth metric estimate; scale not aligned to the poses)"


def add_depth(sample: dict, estimator, mode: str) -> dict:
    """Estimate depth for one encoded sample; ``mode`` ``replace`` writes ``depth.npy``,
    ``both`` writes ``depth_est.npy`` beside the dataset's ``depth.npy``."""
    frame_keys = frame_members(sample)
    frames = np.stack([np.array(Image.open(io.BytesIO(sample[k])).convert("RGB")) for k in frame_keys])
    depth = estimator(frames).astype(np.float16)
    meta = json.loads(sample["json"])
    if mode == "both":
        sample["depth_est.npy"] = npy_bytes(depth)
        meta["depth_est_source"], meta["depth_est_units"] = "zoedepth", DEPTH_UNITS
    else:
        sample["depth.npy"] = npy_bytes(depth)
        meta["depth_source"], meta["depth_units"] = "zoedepth", DEPTH_UNITS
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf8")
    return sample


def load_estimator(cfg: DepthModelConfig, set_threads: bool = True):
    """The model of one actor: on a GPU when the actor was given one (``num_gpus``), else on CPU
    with ``floor(num_cpus)`` torch threads (the actor's share of its node, not the whole node)."""
    import torch

    from mvcustom.models.zoedepth import DepthEstimator

    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    if device == "cpu" and set_threads:
        torch.set_num_threads(max(1, math.floor(cfg.cpus_per_actor)))
    return DepthEstimator(cfg.model, device, cfg.input_size, cfg.flip_average, cfg.batch_size)


class DepthStage:
    """``map_batches`` callable class of the separate layout: one shard row per batch."""

    def __init__(self, cfg: DepthModelConfig, mode: str = "replace"):
        self.estimator = load_estimator(cfg)
        self.mode = mode

    def __call__(self, batch: dict) -> dict:
        out = []
        for payload in batch["samples"]:
            samples = [add_depth(s, self.estimator, self.mode) for s in pickle.loads(payload)]
            out.append(pickle.dumps(samples))
        batch["samples"] = np.array(out, dtype=object)
        return batch
