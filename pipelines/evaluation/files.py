"""A sample's files (``<output>/samples/<id>/``) and the records that travel between Ray Data
stages: PNGs, atomic JSON, cameras as JSON, and rows as JSON strings (rows of different shapes
stay one schema)."""

from __future__ import annotations

import io
import json
import traceback
from pathlib import Path

import fsspec
import numpy as np
import torch
from PIL import Image

from mvcustom.geometry.camera import Cameras


def sample_dir(output: str, sid: str) -> str:
    return f"{output.rstrip('/')}/samples/{sid}"


def write_png(url: str, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def read_png(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.array(Image.open(io.BytesIO(f.read())).convert("RGB"))


def write_json(url: str, data: dict) -> None:
    """Atomically (temporary name, then rename): a killed writer leaves no half file behind."""
    from pipelines.shards import atomic_write

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write(fs, path, json.dumps(data, indent=1, default=float).encode("utf8"))


def read_json(url: str) -> dict | None:
    """The JSON object at ``url``; ``None`` when it is missing or unreadable (a file truncated
    by a writer older than :func:`write_json`'s atomic rename: its sample is redone)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read().decode("utf8"))
    except FileNotFoundError:
        return None
    except ValueError:
        print(f"[evaluate] {url} is truncated or not JSON: its sample is redone", flush=True)
        return None
    return data if isinstance(data, dict) else None


def cameras_json(cams: Cameras) -> dict:
    return {"w2c": cams.w2c.tolist(), "K": cams.K.tolist(), "image_hw": cams.image_hw[0].tolist()}


def cameras_from_json(d: dict) -> Cameras:
    return Cameras(
        torch.tensor(d["w2c"], dtype=torch.float64), torch.tensor(d["K"], dtype=torch.float64), d["image_hw"]
    )


def failure_reason(e: Exception) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


def as_batch(rows: list[dict]) -> dict:
    """Rows -> a Ray Data batch of JSON strings (rows of different shapes stay one schema)."""
    return {"record": [json.dumps(r, default=float) for r in rows]}


def records(batch: dict) -> list[dict]:
    return [json.loads(r) for r in batch["record"]]
