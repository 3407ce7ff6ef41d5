"""Write rendered captures as a CO3Dv2 tree, field for field (see :mod:`mvcustom.data.co3d`).

Each sequence is one subject in a textured room, captured hand-held around the subject like a
CO3D video: azimuth sweeping ~300-360°, wobbling elevation and distance, small roll, a principal
point off centre and slightly anisotropic focal length. The scene is then expressed in a random
similarity frame (rotation, translation, scale) because CO3D's world frames are arbitrary COLMAP
frames, not object-centred; readers must not rely on the subject sitting at the origin.

Ground truth that the dataset format cannot hold (or that tests must not read through the format)
goes to the sidecar ``ground_truth/co3d/<category>/<sequence>.npz``:

=================  ========================================================================
``w2c``            (N, 4, 4) float64 true world-to-camera (OpenCV), in the annotation world frame
``K``              (N, 3, 3) float64 true intrinsics, pixels (corner-origin)
``image_hw``       (N, 2) int64
``depth``          (N, H, W) float32 exact z-depth (annotation world units; no holes)
``foreground``     (N, H, W) bool exact subject mask
``points_world``   (N, P, 3) float64 surface points hit by the rays of ...
``points_uv``      (N, P, 2) float64 ... these pixel centres
``frame_numbers``  (N,) int64; ``world_from_canonical`` (4, 4) and ``world_scale`` ()
=================  ========================================================================
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math

import fsspec
import numpy as np
import torch
from PIL import Image

from mvcustom.configs.sample_data import Co3dSampleConfig
from mvcustom.data.co3d import (
    DepthAnnotation,
    FrameAnnotation,
    ImageAnnotation,
    MaskAnnotation,
    PointCloudAnnotation,
    SequenceAnnotation,
    ViewpointAnnotation,
    encode_depth_png,
)
from mvcustom.data.generator.scene import Scene, random_rotation, render
from mvcustom.data.generator.scene import uniform as _u
from mvcustom.data.generator.sidecar import save_npz, surface_samples
from mvcustom.data.generator.subjects import make_room, make_subject, subject_extent
from mvcustom.geometry.camera import Cameras, intrinsics_matrix, look_at
from mvcustom.geometry.conventions import cameras_to_pytorch3d


def capture_cameras(
    gen: torch.Generator, num_frames: int, image_hw: tuple[int, int], center: torch.Tensor, radius: float
) -> Cameras:
    """A hand-held orbit around ``center`` (canonical frame, +z up) that keeps a subject of
    bounding radius ``radius`` in view."""
    H, W = image_hw
    f = _u(gen, 0.95, 1.25) * max(H, W)
    half_fov = math.atan(min(H, W) / 2 / f)
    dist = min(1.0 * radius / math.sin(half_fov), 2.3)
    a0, span = _u(gen, 0, 360), _u(gen, 300, 350)
    t = torch.arange(num_frames, dtype=torch.float64) / max(num_frames - 1, 1)
    az = torch.deg2rad(a0 + span * t)
    el = torch.deg2rad(_u(gen, 12, 30) + _u(gen, 3, 8) * torch.sin(2 * math.pi * t * _u(gen, 1, 2)))
    r = dist * (1 + 0.05 * torch.sin(2 * math.pi * t * _u(gen, 1, 3) + _u(gen, 0, 6)))
    eye = center + torch.stack(
        [r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az), r * torch.sin(el)], -1
    )
    eye[:, 2] = eye[:, 2].clamp_min(0.08)
    target = center + 0.03 * radius * torch.randn(num_frames, 3, generator=gen, dtype=torch.float64)
    w2c = look_at(eye, target, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    roll = torch.deg2rad(3 * torch.randn(num_frames, generator=gen, dtype=torch.float64))
    Rr = torch.zeros(num_frames, 4, 4, dtype=torch.float64)
    Rr[:, 0, 0], Rr[:, 0, 1] = torch.cos(roll), -torch.sin(roll)
    Rr[:, 1, 0], Rr[:, 1, 1] = torch.sin(roll), torch.cos(roll)
    Rr[:, 2, 2] = Rr[:, 3, 3] = 1
    w2c = Rr @ w2c
    fy = f * (1 + _u(gen, -0.02, 0.02))
    K = intrinsics_matrix(f, fy, W / 2 + _u(gen, -3, 3), H / 2 + _u(gen, -3, 3)).expand(num_frames, 3, 3)
    return Cameras(w2c, K, image_hw)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _ply(points: np.ndarray, colors: np.ndarray) -> bytes:
    """Binary little-endian PLY with float xyz and uchar rgb (CO3D's points-only pointcloud.ply)."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    ).encode()
    rec = np.empty(len(points), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    rec["xyz"], rec["rgb"] = points, colors
    return header + rec.tobytes()


def _dump_jgz(fs, path: str, records: list) -> None:
    """What co3d's ``dump_dataclass_jgzip`` writes: gzip of ``json.dumps`` of the records."""
    data = json.dumps([dataclasses.asdict(r) for r in records]).encode("utf8")
    with fs.open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as g:
        g.write(data)


def _write_json(fs, path: str, obj) -> None:
    with fs.open(path, "w") as f:
        json.dump(obj, f)


def write_co3d(out: str, cfg: Co3dSampleConfig, seed: int, gt_out: str) -> dict:
    """Write the CO3Dv2 tree under ``out`` and the sidecar under ``gt_out``; return an index."""
    fs, root = fsspec.core.url_to_fs(out)
    gfs, groot = fsspec.core.url_to_fs(gt_out)
    index: dict = {"categories": {}}
    subset_map = {}
    for ci, category in enumerate(cfg.categories):
        frames_all: list[FrameAnnotation] = []
        seqs_all: list[SequenceAnnotation] = []
        seq_frames: dict[str, list[FrameAnnotation]] = {}
        seq_sets: dict[str, str] = {}
        for si in range(cfg.sequences_per_category):
            sseed = seed * 1_000_003 + ci * 1009 + si
            gen = torch.Generator().manual_seed(sseed)
            seq = f"{100 + si + 17 * ci}_{int(_u(gen, 1000, 20000))}_{int(_u(gen, 1000, 40000))}"
            H, W = cfg.image_sizes[(ci + si) % len(cfg.image_sizes)]
            fmt = cfg.intrinsics_formats[(ci + si) % len(cfg.intrinsics_formats)]
            subject = make_subject(category, sseed)
            scene = Scene(subject + make_room(sseed))
            center, radius = subject_extent(subject)
            cams = capture_cameras(gen, cfg.frames_per_sequence, (H, W), center, radius)
            rend = render(scene, cams)
            # Random similarity frame: X_ds = s * (R X + t).
            Rw = random_rotation(gen)
            tw = torch.randn(3, generator=gen, dtype=torch.float64)
            sw = _u(gen, 0.5, 3.0)
            T = torch.eye(4, dtype=torch.float64)
            T[:3, :3], T[:3, 3] = Rw, tw
            cams_ds = cams.transform_world(T, sw)
            depth_ds = (rend.depth * sw).to(torch.float32)
            pts_ds = sw * (rend.points @ Rw.T + tw)
            R3, T3, focal, pp = cameras_to_pytorch3d(cams_ds, fmt)
            scale_adj = _u(gen, 0.5, 2.0)
            seq_dir = f"{category}/{seq}"
            for sub in ("images", "masks", "depths", "depth_masks"):
                fs.makedirs(f"{root}/{seq_dir}/{sub}", exist_ok=True)
            seq_set = "train" if si < max(cfg.sequences_per_category - 1, 1) else "dev"
            seq_sets[seq] = seq_set
            frames = []
            for i in range(len(cams)):
                name = f"frame{i + 1:06d}"
                img_rel = f"{seq_dir}/images/{name}.jpg"
                rgb = rend.rgb[i].numpy()
                fg = rend.foreground[i].numpy()
                with fs.open(f"{root}/{img_rel}", "wb") as f:
                    f.write(_jpg(rgb))
                with fs.open(f"{root}/{seq_dir}/masks/{name}.png", "wb") as f:
                    f.write(_png((fg * 255).astype(np.uint8)))
                # Unknown depth in random rectangular holes, as MVS depth has.
                valid = np.ones((H, W), bool)
                hole_target = cfg.depth_hole_fraction * H * W
                while (~valid).sum() < hole_target:
                    hh, ww = int(_u(gen, 3, H / 4)), int(_u(gen, 3, W / 4))
                    y0, x0 = int(_u(gen, 0, H - hh)), int(_u(gen, 0, W - ww))
                    valid[y0 : y0 + hh, x0 : x0 + ww] = False
                d = depth_ds[i].numpy() * valid
                with fs.open(f"{root}/{seq_dir}/depths/{name}.jpg.geometric.png", "wb") as f:
                    f.write(encode_depth_png(d, scale_adj))
                with fs.open(f"{root}/{seq_dir}/depth_masks/{name}.png", "wb") as f:
                    f.write(_png((valid * 255).astype(np.uint8)))
                frames.append(
                    FrameAnnotation(
                        sequence_name=seq,
                        frame_number=i,
                        frame_timestamp=round(i / 10.0, 6),
                        image=ImageAnnotation(path=img_rel, size=(H, W)),
                        depth=DepthAnnotation(
                            path=f"{seq_dir}/depths/{name}.jpg.geometric.png",
                            scale_adjustment=scale_adj,
                            mask_path=f"{seq_dir}/depth_masks/{name}.png",
                        ),
                        mask=MaskAnnotation(path=f"{seq_dir}/masks/{name}.png", mass=float(fg.sum())),
                        viewpoint=ViewpointAnnotation(
                            R=tuple(map(tuple, R3[i].tolist())),
                            T=tuple(T3[i].tolist()),
                            focal_length=tuple(focal[i].tolist()),
                            principal_point=tuple(pp[i].tolist()),
                            intrinsics_format=fmt,
                        ),
                        meta={"frame_type": f"{seq_set}_known", "frame_splits": [], "eval_batch_maps": []},
                    )
                )
            # Points-only point cloud of the subject surface, like CO3D's pointcloud.ply.
            fgm = rend.foreground.reshape(-1)
            pc = pts_ds.reshape(-1, 3)[fgm]
            cols = rend.rgb.reshape(-1, 3)[fgm]
            keep = torch.randperm(len(pc), generator=gen)[:2000]
            with fs.open(f"{root}/{seq_dir}/pointcloud.ply", "wb") as f:
                f.write(_ply(pc[keep].numpy().astype(np.float32), cols[keep].numpy()))
            seqs_all.append(
                SequenceAnnotation(
                    sequence_name=seq,
                    category=category,
                    video=None,
                    point_cloud=PointCloudAnnotation(
                        path=f"{seq_dir}/pointcloud.ply",
                        quality_score=_u(gen, 0.3, 1.0),
                        n_points=int(len(keep)),
                    ),
                    viewpoint_quality_score=_u(gen, 0.2, 1.0),
                )
            )
            frames_all += frames
            seq_frames[seq] = frames
            gfs.makedirs(f"{groot}/co3d/{category}", exist_ok=True)
            # Sample after the loop so the per-frame hole RNG draws stay as they were.
            uv, pts = surface_samples(gen, rend, cfg.points_per_frame)
            pts = sw * (pts @ Rw.T + tw)
            save_npz(
                gfs,
                f"{groot}/co3d/{category}/{seq}.npz",
                w2c=cams_ds.w2c.numpy(),
                K=cams_ds.K.numpy(),
                image_hw=cams_ds.image_hw.numpy(),
                depth=depth_ds.numpy(),
                foreground=rend.foreground.numpy(),
                points_world=pts.numpy(),
                points_uv=uv.numpy(),
                frame_numbers=np.arange(len(cams)),
                world_from_canonical=T.numpy(),
                world_scale=np.float64(sw),
                # what rebuilds the scene (make_scene(category, scene_seed, scene_seed)), so a
                # benchmark can render the true view at any camera (generator.truth)
                category=np.str_(category),
                scene_seed=np.int64(sseed),
            )
            index["categories"].setdefault(category, []).append(
                {
                    "sequence_name": seq,
                    "intrinsics_format": fmt,
                    "image_hw": [H, W],
                    "set": seq_set,
                    "num_frames": len(cams),
                }
            )
        _dump_jgz(fs, f"{root}/{category}/frame_annotations.jgz", frames_all)
        _dump_jgz(fs, f"{root}/{category}/sequence_annotations.jgz", seqs_all)
        subset_map[category] = _write_set_lists(fs, f"{root}/{category}", seq_frames, seq_sets)
    _write_json(fs, f"{root}/category_to_subset_name_list.json", subset_map)
    return index


def _entry(fa: FrameAnnotation) -> list:
    return [fa.sequence_name, fa.frame_number, fa.image.path]


def _write_set_lists(
    fs, cat_dir: str, seq_frames: dict[str, list[FrameAnnotation]], seq_sets: dict[str, str]
) -> list[str]:
    """``fewview_dev`` (train: train sequences; test: dev sequences) and ``manyview_dev_0`` (one
    dev sequence split into known/unseen frames), with eval batches as CO3Dv2 lays them out."""
    fs.makedirs(f"{cat_dir}/set_lists", exist_ok=True)
    fs.makedirs(f"{cat_dir}/eval_batches", exist_ok=True)
    train = [_entry(f) for s, fr in seq_frames.items() if seq_sets[s] == "train" for f in fr]
    dev_seqs = [s for s in seq_frames if seq_sets[s] == "dev"]
    test = [_entry(f) for s in dev_seqs for f in seq_frames[s]]
    _write_json(
        fs, f"{cat_dir}/set_lists/set_lists_fewview_dev.json", {"train": train, "val": [], "test": test}
    )
    batches = []
    for s in dev_seqs:
        fr = seq_frames[s]
        for k in range(0, len(fr), max(len(fr) // 4, 1)):
            others = [fr[(k + j * max(len(fr) // 3, 1)) % len(fr)] for j in (1, 2)]
            batches.append([_entry(fr[k])] + [_entry(o) for o in others])
    _write_json(fs, f"{cat_dir}/eval_batches/eval_batches_fewview_dev.json", batches)
    subsets = ["fewview_dev"]
    if dev_seqs:
        fr = seq_frames[dev_seqs[0]]
        known = [_entry(f) for f in fr if f.frame_number % 2 == 0]
        unseen = [_entry(f) for f in fr if f.frame_number % 2 == 1]
        _write_json(
            fs,
            f"{cat_dir}/set_lists/set_lists_manyview_dev_0.json",
            {"train": known, "val": [], "test": unseen},
        )
        _write_json(fs, f"{cat_dir}/eval_batches/eval_batches_manyview_dev_0.json", [[e] for e in unseen])
        subsets.append("manyview_dev_0")
    return subsets
