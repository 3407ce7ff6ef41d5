"""Training-side reader: stream shards (schema in :mod:`mvcustom.data.schema`) as torch tensors.

Built on ``webdataset``: shard lists are shuffled per epoch (seeded), split across nodes
(``torch.distributed`` rank / world size, as under Ray Train) and then across DataLoader workers,
so no two readers see the same shard; samples are shuffled in a buffer. Object-store URLs
(``s3://``, ``gs://``, ... any fsspec protocol) are opened through fsspec: the module registers
fsspec in webdataset's ``gopen_schemes`` for protocols webdataset would otherwise shell out for.

Each yielded sample is a dict:

==============  ===========================================================
``frames``      float32 ``(N, 3, H, W)`` in ``[-1, 1]`` (the VAE's input range)
``intrinsics``  float32 ``(N, 3, 3)`` (absent if the clip has no poses)
``extrinsics``  float32 ``(N, 4, 4)`` world-to-camera (absent likewise)
``depth``       float32 ``(N, H, W)``, 0 = unknown (when the shard has depth)
``mask``        float32 ``(N, H, W)`` in ``[0, 1]`` (CO3D)
``caption``     str; ``key`` str; ``meta`` dict (the ``json`` member)
==============  ===========================================================
"""

from __future__ import annotations

import importlib

import fsspec
import numpy as np
import torch

from mvcustom.data.schema import check_member_name, decode_sample

_FSSPEC_SCHEMES = ("s3", "gs", "gcs", "memory", "az", "abfs", "file")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return fsspec.open(url, mode).open()


def _register_fsspec_schemes() -> None:
    gopen = importlib.import_module("webdataset.gopen")
    for scheme in _FSSPEC_SCHEMES:
        gopen.gopen_schemes[scheme] = _fsspec_open


def expand_shards(specs: list[str] | str) -> list[str]:
    """Shard URLs from URLs, folders or globs (fsspec), sorted; a folder means its ``*.tar``."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    urls: list[str] = []
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec)
        proto = spec.split("://", 1)[0] + "://" if "://" in spec else ""
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = fs.glob(path.rstrip("/") + "/*.tar")
        else:
            found = [path] if fs.exists(path) else []
        if not found:
            raise FileNotFoundError(f"no shards match {spec!r}")
        urls += [
            proto + p if proto and not p.startswith(proto) else p for p in sorted(found) if p.endswith(".tar")
        ]
    return urls


def to_tensors(raw: dict) -> dict:
    """One raw WebDataset sample -> the training dict described in the module docstring."""
    s = decode_sample(raw)
    out = {
        "frames": torch.from_numpy(s.frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0),
        "caption": s.caption,
        "key": s.key,
        "meta": s.meta,
    }
    if s.intrinsics is not None:
        out["intrinsics"] = torch.from_numpy(s.intrinsics)
        out["extrinsics"] = torch.from_numpy(s.extrinsics)
    if s.depth is not None:
        out["depth"] = torch.from_numpy(s.depth.astype(np.float32))
    if s.mask is not None:
        out["mask"] = torch.from_numpy(s.mask).float().div(255.0)
    return out


def make_clip_dataset(
    shards: list[str] | str,
    shuffle_buffer: int = 64,
    seed: int = 0,
    shuffle_shards: bool = True,
    resampled: bool = False,
):
    """A ``webdataset`` pipeline (an ``IterableDataset``) of training dicts.

    Args:
        shards: shard URLs, folders or globs (see :func:`expand_shards`).
        shuffle_buffer: sample shuffle buffer (0 = keep shard order; evaluation).
        seed: seeds shard and sample shuffling (deterministic given the seed and epoch).
        shuffle_shards: shuffle the shard list each epoch.
        resampled: sample shards with replacement forever (for step-based training).
    """
    import webdataset as wds

    _register_fsspec_schemes()
    urls = expand_shards(shards)
    ds = wds.WebDataset(
        urls,
        resampled=resampled,
        shardshuffle=(len(urls) if shuffle_shards else False) if not resampled else None,
        nodesplitter=None if resampled else wds.split_by_node,
        workersplitter=wds.split_by_worker,
        seed=seed,
        empty_check=False,
        select_files=check_member_name,
    )
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    return ds.map(to_tensors)
