"""Write rendered camera-motion clips as a WebVid tree.

Layout (m-bain/webvid ``download.py``; also what video2dataset's WebVid example reads)::

    <root>/results_2M_<split>.csv                 videoid,contentUrl,duration,page_dir,name
    <root>/videos/<page_dir>/<videoid>.mp4        H.264, yuv420p

CSV fields as WebVid writes them: ``videoid`` the Shutterstock id, ``contentUrl`` the preview
URL (``https://ak.picdn.net/shutterstock/videos/<id>/preview/stock-footage-<slug>.mp4``; not
reachable here, readers use the local layout), ``duration`` ISO-8601 (``PT00H00M02S``),
``page_dir`` the 50-page bucket (``006001_006050``), ``name`` the caption (free text, quoted by
the CSV writer when needed; some captions carry non-ASCII characters on purpose).

Sidecar ``ground_truth/webvid/<videoid>.npz``: ``w2c``/``K``/``image_hw`` of every frame
(OpenCV, canonical scene frame, +z up), ``timestamps`` (s), ``points_world``/``points_uv``
(surface points hit by the rays of those pixel centres), and ``motion``.
"""

from __future__ import annotations

import csv
import io
import math

import av
import fsspec
import numpy as np
import torch

from mvcustom.configs.sample_data import WebVidSampleConfig
from mvcustom.data.generator.scene import Scene, render
from mvcustom.data.generator.scene import uniform as _u
from mvcustom.data.generator.sidecar import save_npz, surface_samples
from mvcustom.data.generator.subjects import CATEGORIES, make_room, make_subject
from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at

CSV_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")

_CAPTIONS = {
    "orbit": "Slow orbit around a {c} standing in a colourful room",
    "truck": "Camera trucks sideways past a {c}, tiled walls in the background",
    "dolly": "Dolly in towards a {c} on a mosaic floor, 4k",
    "arc": "Café-style interior — camera arcs up and around a {c}",
    "static": "Static shot of a {c} in a patterned room",
}


def clip_cameras(gen: torch.Generator, motion: str, num_frames: int, image_hw: tuple[int, int]) -> Cameras:
    """Camera path of one clip (canonical frame, +z up, subject near the origin)."""
    H, W = image_hw
    f = _u(gen, 0.75, 1.0) * W
    t = torch.linspace(0, 1, num_frames, dtype=torch.float64)
    a0 = math.radians(_u(gen, 0, 360))
    target = torch.tensor([0.0, 0.0, 0.35], dtype=torch.float64).expand(num_frames, 3).clone()
    h = _u(gen, 0.7, 1.1)
    if motion in ("orbit", "arc"):
        span = math.radians(_u(gen, 60, 100) if motion == "orbit" else _u(gen, 30, 50))
        az = a0 + span * t
        r = _u(gen, 1.9, 2.2)
        z = h + (0.5 * t if motion == "arc" else 0.0)
        eye = torch.stack(
            [
                r * torch.cos(az),
                r * torch.sin(az),
                torch.as_tensor(z, dtype=torch.float64).expand(num_frames),
            ],
            -1,
        )
    elif motion == "truck":
        r = _u(gen, 2.0, 2.2)
        base = torch.tensor([r * math.cos(a0), r * math.sin(a0), h], dtype=torch.float64)
        side = torch.tensor([-math.sin(a0), math.cos(a0), 0.0], dtype=torch.float64)
        eye = base + (t - 0.5).unsqueeze(-1) * 1.0 * side
        target = target + (t - 0.5).unsqueeze(-1) * 1.0 * side  # parallel tracking shot
    elif motion == "dolly":
        r = 2.2 - 0.8 * t
        eye = torch.stack([r * math.cos(a0), r * math.sin(a0), torch.full_like(t, h)], -1)
        # Look slightly off the subject so the path is not exactly along the optical axis.
        target = target + torch.tensor([-0.3 * math.sin(a0), 0.3 * math.cos(a0), 0.0], dtype=torch.float64)
    elif motion == "static":
        r = 2.1
        eye = torch.tensor([r * math.cos(a0), r * math.sin(a0), h], dtype=torch.float64).expand(num_frames, 3)
    else:
        raise ValueError(f"unknown camera motion {motion!r}")
    w2c = look_at(eye, target, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    K = intrinsics_matrix(f, f, W / 2, H / 2).expand(num_frames, 3, 3)
    return Cameras(w2c, K, image_hw)


def encode_h264(frames: np.ndarray, fps: int, crf: int, x264_params: str = "") -> bytes:
    """``frames (N, H, W, 3)`` uint8 RGB -> H.264 mp4 bytes (PyAV's bundled libx264).

    MB-tree rate control is off: with it, libx264 (PyAV 18's) encodes the same frames into a
    different video from run to run (measured on a 160x96 clip: 9 different videos in 12
    encodes, decoded pixels up to 43 levels apart, with one thread or many; at 128x96 one
    video), and everything measured on the generated data (SfM's errors in the tests) would
    change with it. With ``mbtree=0``: one video in 24 encodes, at 160x96 and 320x180.
    ``x264_params`` (``key=value:...``) are added to it (tests encode other GOP structures)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        params = "mbtree=0" + (f":{x264_params}" if x264_params else "")
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": params}
        for arr in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def iso_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{(s % 3600) // 60:02d}M{s % 60:02d}S"


def page_dir_for(page: int) -> str:
    lo = (page - 1) // 50 * 50 + 1
    return f"{lo:06d}_{lo + 49:06d}"


def write_webvid(out: str, cfg: WebVidSampleConfig, seed: int, gt_out: str) -> dict:
    """Write the WebVid CSV and videos under ``out`` and the sidecar under ``gt_out``."""
    fs, root = fsspec.core.url_to_fs(out)
    gfs, groot = fsspec.core.url_to_fs(gt_out)
    fs.makedirs(root, exist_ok=True)
    gfs.makedirs(f"{groot}/webvid", exist_ok=True)
    num_frames = max(int(round(cfg.fps * cfg.duration_s)), 2)
    rows, index = [], []
    for k in range(cfg.num_videos):
        gen = torch.Generator().manual_seed(seed * 7_000_003 + 31 * k + 5)
        motion = cfg.motions[k % len(cfg.motions)]
        category = CATEGORIES[int(_u(gen, 0, len(CATEGORIES) - 1e-9))]
        sseed = seed * 7919 + k
        scene = Scene(make_subject(category, sseed) + make_room(sseed + 50_000))
        cams = clip_cameras(gen, motion, num_frames, (cfg.height, cfg.width))
        rend = render(scene, cams)
        videoid = str(1_000_000_000 + int(_u(gen, 0, 99_999_999)))
        page_dir = page_dir_for(int(_u(gen, 1, 30_000)))
        caption = _CAPTIONS[motion].format(c=category)
        slug = "-".join(caption.lower().encode("ascii", "ignore").decode().replace(",", "").split())[:80]
        rel = f"videos/{page_dir}/{videoid}.mp4"
        fs.makedirs(f"{root}/videos/{page_dir}", exist_ok=True)
        with fs.open(f"{root}/{rel}", "wb") as f:
            f.write(encode_h264(rend.rgb.numpy(), cfg.fps, cfg.crf))
        rows.append(
            {
                "videoid": videoid,
                "contentUrl": f"https://ak.picdn.net/shutterstock/videos/{videoid}/preview/stock-footage-{slug}.mp4",
                "duration": iso_duration(num_frames / cfg.fps),
                "page_dir": page_dir,
                "name": caption,
            }
        )
        uv, pts = surface_samples(gen, rend, 64)
        save_npz(
            gfs,
            f"{groot}/webvid/{videoid}.npz",
            w2c=cams.w2c.numpy(),
            K=cams.K.numpy(),
            image_hw=cams.image_hw.numpy(),
            timestamps=np.arange(len(cams)) / cfg.fps,
            points_world=pts.numpy(),
            points_uv=uv.numpy(),
            motion=np.array(motion),
        )
        index.append(
            {"videoid": videoid, "path": rel, "motion": motion, "category": category, "num_frames": len(cams)}
        )
    with fs.open(f"{root}/results_2M_{cfg.split}.csv", "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return {"videos": index, "csv": f"results_2M_{cfg.split}.csv"}


def replicate_webvid(src: str, dst: str, n: int) -> list[dict]:
    """A WebVid tree at ``dst`` listing ``n`` clips: ``src``'s rows in order, then replicas of
    them (a new ``videoid`` ``<id>r<k>``, the video a symlink to the original), so benchmarks
    list more clips than were rendered for the same decoding work per clip (rendering costs
    ~10 s a clip). Local paths only (the videos are symlinks). ``dst`` must not exist yet.
    Returns the rows written to ``dst``'s CSV, which keeps ``src``'s file name."""
    import glob
    import os

    if n < 1:
        raise ValueError(f"replicate_webvid needs n >= 1 clips, got {n}")
    csvs = glob.glob(os.path.join(src, "results_*.csv"))
    if len(csvs) != 1:
        raise FileNotFoundError(f"{src} must hold one WebVid CSV (results_*.csv); found {csvs or 'none'}")
    with open(csvs[0], newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csvs[0]} lists no clips to replicate")
    os.makedirs(os.path.join(dst, "videos"))  # FileExistsError names a dst already there
    out = []
    for i in range(n):
        orig = rows[i % len(rows)]
        row = dict(orig) if i < len(rows) else {**orig, "videoid": f"{orig['videoid']}r{i // len(rows)}"}
        os.makedirs(os.path.join(dst, "videos", row["page_dir"]), exist_ok=True)
        os.symlink(
            os.path.abspath(os.path.join(src, "videos", orig["page_dir"], f"{orig['videoid']}.mp4")),
            os.path.join(dst, "videos", row["page_dir"], f"{row['videoid']}.mp4"),
        )
        out.append(row)
    with open(os.path.join(dst, os.path.basename(csvs[0])), "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out)
    return out
