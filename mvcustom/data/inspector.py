"""Shard inspector: a static HTML page per shard folder, to look at the data before training.

``python -m jobs.inspect_shards SHARDS_URL [SHARDS_URL ...] [--samples N] --out DIR`` (issue 17).
For each shard folder (a folder of ``*.tar`` written by ``jobs.preprocess``, any fsspec URL) the
page shows:

* the folder's ``manifest.parquet`` / ``errors.parquet`` summary: clips per source, frames per
  clip, error records counted by stage and reason, and the first rows of each;
* for ``N`` clips spread over the folder (the first sample of evenly spaced shards, then the
  next samples): the caption and metadata, the frames as a strip, depth as a colour-mapped strip
  with its range, units and source (0 = unknown, drawn black), the masks, the pose source and
  its quality figures, and a 3D plot of the camera frusta along the clip.

Images are PNG files beside ``index.html`` (relative links), so the folder can be copied or
logged to MLflow as it is. Everything is read through fsspec, written through fsspec.
"""

from __future__ import annotations

import html
import io
import json
import posixpath

import fsspec
import numpy as np

from mvcustom.data.reader import _register_fsspec_schemes, expand_shards
from mvcustom.data.schema import ClipSample, check_member_name, decode_sample

STRIP_FRAMES = 8


def shard_folders(specs: list[str] | str) -> dict[str, list[str]]:
    """Shard URLs grouped by their folder (``expand_shards`` semantics: folders, globs, URLs)."""
    folders: dict[str, list[str]] = {}
    for url in expand_shards(specs):
        folders.setdefault(url.rsplit("/", 1)[0], []).append(url)
    return folders


def pick_samples(shards: list[str], count: int) -> list[ClipSample]:
    """Up to ``count`` decoded clips: the first of evenly spaced shards, then the next ones."""
    import webdataset as wds

    _register_fsspec_schemes()
    if count <= 0:
        return []
    chosen = sorted(
        {round(i * (len(shards) - 1) / max(count - 1, 1)) for i in range(min(count, len(shards)))}
    )
    order = [shards[i] for i in chosen] + [s for i, s in enumerate(shards) if i not in chosen]
    out: list[ClipSample] = []
    per_shard = max(1, -(-count // max(len(chosen), 1)))
    for url in order:
        taken = 0
        for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False, select_files=check_member_name):
            out.append(decode_sample(raw))
            taken += 1
            if len(out) >= count or taken >= per_shard:
                break
        if len(out) >= count:
            break
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _strip(images: np.ndarray, frames: list[int]) -> np.ndarray:
    """Frames side by side (``(N, H, W[, 3])`` -> ``(H, N*W[, 3])``) with a 2-pixel gap."""
    parts = []
    for i in frames:
        im = images[i]
        gap = np.full((im.shape[0], 2, *im.shape[2:]), 255, dtype=im.dtype)
        parts += [im, gap]
    return np.concatenate(parts[:-1], axis=1)


def depth_strip(depth: np.ndarray, frames: list[int]) -> tuple[np.ndarray, float, float]:
    """Colour-mapped depth strip (viridis between the clip's 2nd and 98th percentile of valid
    depth; 0 / non-finite = unknown, black). Returns ``(rgb, low, high)``."""
    from matplotlib import colormaps

    d = depth[frames].astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    lo, hi = np.percentile(d[valid], [2, 98]) if valid.any() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    rgb = (colormaps["viridis"](np.clip((d - lo) / (hi - lo), 0, 1))[..., :3] * 255).astype(np.uint8)
    rgb[~valid] = 0
    return _strip(rgb, list(range(len(frames)))), float(lo), float(hi)


def frusta_plot(extrinsics: np.ndarray, intrinsics: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """A 3D plot of the camera frusta (world frame), the path through their centres, first
    camera in red; frustum depth 15% of the path's extent (at least 0.1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, W = image_hw
    R = extrinsics[:, :3, :3]
    t = extrinsics[:, :3, 3]
    centers = -np.einsum("nji,nj->ni", R, t)
    extent = float(np.ptp(centers, axis=0).max()) if len(centers) > 1 else 1.0
    depth = max(0.15 * extent, 0.1)
    corners_px = np.array([[0, 0, 1], [W, 0, 1], [W, H, 1], [0, H, 1]], dtype=np.float64)
    fig = plt.figure(figsize=(3.6, 3.2), dpi=80)
    ax = fig.add_subplot(projection="3d")
    for n in range(len(centers)):
        rays = corners_px @ np.linalg.inv(intrinsics[n]).T * depth  # camera frame, z = depth
        world = (rays - t[n]) @ R[n]  # R^T (x - t)
        color = "tab:red" if n == 0 else "tab:blue"
        for k in range(4):
            ax.plot(*zip(centers[n], world[k], strict=True), color=color, linewidth=0.6)
            ax.plot(*zip(world[k], world[(k + 1) % 4], strict=True), color=color, linewidth=0.6)
    ax.plot(centers[:, 0], centers[:, 1], centers[:, 2], "k.-", markersize=2, linewidth=0.8)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("z")
    ax.set_title(f"{len(centers)} cameras (first in red)", fontsize=8)
    return figure_image(fig)


def figure_image(fig) -> np.ndarray:
    """A matplotlib figure as an ``(H, W, 3)`` uint8 image (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _table(rows: list[dict], columns: list[str], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table class='{css_class}'><tr>{head}</tr>{body}</table>"


def _read_parquet(fs, path: str):
    import pyarrow.parquet as pq

    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


def folder_summary(folder: str) -> dict:
    """Counts and first rows of the folder's manifest and errors (``None`` where absent)."""
    fs, root = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache()
    manifest = _read_parquet(fs, f"{root}/manifest.parquet")
    errors = _read_parquet(fs, f"{root}/errors.parquet")
    out: dict = {"manifest": None, "errors": None}
    if manifest is not None:
        out["manifest"] = {
            "clips": len(manifest),
            "by_source": manifest.groupby("source").size().to_dict() if len(manifest) else {},
            "frames": {
                "min": int(manifest.num_frames.min()) if len(manifest) else None,
                "max": int(manifest.num_frames.max()) if len(manifest) else None,
            },
            "first_rows": manifest.head(5).to_dict("records"),
        }
    if errors is not None:
        counts = []
        if len(errors):
            keys = [c for c in ("stage", "reason") if c in errors]
            grouped = errors.groupby(keys).size().sort_values(ascending=False)
            counts = [
                dict(zip(keys, k if isinstance(k, tuple) else (k,), strict=True), count=int(n))
                for k, n in grouped.items()
            ]
        out["errors"] = {
            "records": len(errors),
            "by_stage_and_reason": counts[:20],
            "first_rows": errors.head(5).to_dict("records"),
        }
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
img{max-width:100%;height:auto;display:block;margin:.3em 0}.clip{border-top:2px solid #888;margin-top:1.5em;padding-top:.5em}
.meta{font-size:13px;color:#333}code{background:#f4f4f4;padding:0 3px}"""


def inspect_folder(folder: str, shards: list[str], out: str, samples: int = 4) -> str:
    """Write ``out/index.html`` (and its images) for one shard folder; returns the page's URL."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)

    def put(name: str, data: bytes) -> str:
        with fs.open(posixpath.join(root, name), "wb") as f:
            f.write(data)
        return name

    summary = folder_summary(folder)
    parts = [f"<h1>Shards: <code>{html.escape(folder)}</code></h1>", f"<p>{len(shards)} shard(s).</p>"]
    m, e = summary["manifest"], summary["errors"]
    if m is None:
        parts.append(
            "<p><b>No manifest.parquet</b> beside these shards (not written by jobs.preprocess?).</p>"
        )
    else:
        by_source = ", ".join(f"{k}: {v}" for k, v in m["by_source"].items()) or "none"
        parts.append(
            f"<h2 id='summary'>Manifest</h2><p>{m['clips']} clip(s) ({html.escape(by_source)}); "
            f"frames per clip {m['frames']['min']}-{m['frames']['max']}.</p>"
        )
        if m["first_rows"]:
            parts.append(_table(m["first_rows"], list(m["first_rows"][0]), "summary"))
    if e is not None:
        parts.append(f"<h2>Error records</h2><p>{e['records']} record(s).</p>")
        if e["by_stage_and_reason"]:
            parts.append(_table(e["by_stage_and_reason"], list(e["by_stage_and_reason"][0])))
            parts.append("<p>First rows:</p>" + _table(e["first_rows"], list(e["first_rows"][0])))
    clips = pick_samples(shards, samples)
    parts.append(f"<h2>{len(clips)} sampled clip(s)</h2>")
    for n, clip in enumerate(clips):
        frames = clip.frames
        idx = sorted(
            {
                round(i * (len(frames) - 1) / max(STRIP_FRAMES - 1, 1))
                for i in range(min(STRIP_FRAMES, len(frames)))
            }
        )
        meta = clip.meta
        shown = {
            k: meta.get(k)
            for k in (
                "source",
                "category",
                "sequence",
                "frame_indices",
                "stored_size_hw",
                "fps",
                "camera_motion",
            )
            if meta.get(k) is not None
        }
        parts.append(f"<div class='clip'><h3>{html.escape(clip.key)}</h3>")
        parts.append(f"<p>Caption: <i>{html.escape(clip.caption)}</i></p>")
        parts.append(f"<p class='meta'>{html.escape(json.dumps(shown, default=str))}</p>")
        parts.append(
            f"<p>Frames {idx} of {len(frames)}:</p><img alt='frames' src='{put(f'clip{n:03d}_frames.png', _png(_strip(frames, idx)))}'>"
        )
        if clip.depth is not None:
            rgb, lo, hi = depth_strip(clip.depth, idx)
            units = meta.get("depth_units") or "unknown units"
            parts.append(
                f"<p>Depth ({html.escape(str(meta.get('depth_source')))}, {html.escape(str(units))}): "
                f"viridis from {lo:.3g} to {hi:.3g}; black = unknown.</p>"
                f"<img alt='depth' src='{put(f'clip{n:03d}_depth.png', _png(rgb))}'>"
            )
        else:
            parts.append("<p>No depth in this clip.</p>")
        if clip.mask is not None:
            parts.append(
                f"<p>Masks:</p><img alt='masks' src='{put(f'clip{n:03d}_masks.png', _png(_strip(clip.mask, idx)))}'>"
            )
        if clip.extrinsics is not None:
            quality = meta.get("pose_quality")
            parts.append(
                f"<p>Poses: {html.escape(str(meta.get('pose_source')))}"
                + (f"; quality {html.escape(json.dumps(quality, default=str))}" if quality else "")
                + "</p>"
            )
            plot = frusta_plot(
                clip.extrinsics.astype(np.float64), clip.intrinsics.astype(np.float64), frames.shape[1:3]
            )
            parts.append(f"<img alt='cameras' src='{put(f'clip{n:03d}_cameras.png', _png(plot))}'>")
        else:
            parts.append("<p>No poses in this clip.</p>")
        parts.append("</div>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Shards: "
        f"{html.escape(folder)}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    put("index.html", page.encode("utf8"))
    return posixpath.join(out.rstrip("/"), "index.html")


def inspect_shards(specs: list[str] | str, out: str, samples: int = 4) -> list[str]:
    """One page per shard folder under ``out`` (a sub-folder each when there are several);
    returns the pages' URLs."""
    folders = shard_folders(specs)  # no shards at all: expand_shards names the spec
    pages, used = [], set()
    for folder, shards in sorted(folders.items()):
        name = folder.rstrip("/").rsplit("/", 1)[-1] or "shards"
        while name in used:  # two folders of one name (a/co3d, b/co3d)
            name += "_"
        used.add(name)
        target = out if len(folders) == 1 else posixpath.join(out.rstrip("/"), name)
        pages.append(inspect_folder(folder, shards, target, samples))
    return pages
