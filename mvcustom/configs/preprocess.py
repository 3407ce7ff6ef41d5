"""Config of the preprocessing job (``python -m jobs.preprocess``): raw dataset -> WebDataset shards.

The shard schema is DESIGN.md §3; every path is an fsspec URL (local, ``s3://``, ``gs://``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mvcustom.configs.base import check
from mvcustom.configs.common import ClipConfig, MlflowConfig, RayConfig


@dataclass
class Co3dInputConfig:
    """Which CO3Dv2 frames become clips.

    Attributes:
        categories: categories to read (empty: every category folder under the root).
        sequences: sequence names to keep (empty: all): one subject for stage 2 is one CO3D
            sequence (``categories: [teddybear]``, ``sequences: [101_2160_9757]``); a name found
            in none of the categories is a config error.
        subset_name: set-list subset (``fewview_dev``, ``manyview_dev_0``, ...) restricting frames
            to its ``splits``; ``None`` uses every annotated frame.
        splits: set-list splits to keep (``train``, ``val``, ``test``) when ``subset_name`` is set.
        min_viewpoint_quality: drop sequences whose ``viewpoint_quality_score`` is lower (or
            missing, when this is > 0).
        clip_sampling: ``spread`` (views evenly around the capture), ``random`` or ``contiguous``.
        clips_per_sequence: clips drawn from each sequence.
        caption_template: caption, formatted with ``{category}``.
        captions_file: optional JSON ``{sequence_name: caption}`` that overrides the template.
        depth: ``dataset`` (CO3D's MVS depth), ``zoedepth`` (estimated) or ``both``.
    """

    categories: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    subset_name: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    min_viewpoint_quality: float = 0.0
    clip_sampling: Literal["spread", "random", "contiguous"] = "spread"
    clips_per_sequence: int = 1
    caption_template: str = "a photo of a {category}"
    captions_file: str | None = None
    depth: Literal["dataset", "zoedepth", "both"] = "dataset"

    def __post_init__(self) -> None:
        for s in self.splits:
            check(s in ("train", "val", "test"), f"co3d.splits: unknown split {s!r}")
        check(self.clips_per_sequence >= 1, "co3d.clips_per_sequence must be >= 1")


@dataclass
class WebVidInputConfig:
    """Which WebVid rows become clips.

    Attributes:
        csv: CSV files or globs relative to the input root (WebVid's ``results_*.csv``).
        video_path_template: where a row's video lies, relative to the input root, formatted with
            the row's columns (the m-bain downloader's layout ``videos/{page_dir}/{videoid}.mp4``).
        use_url_column: read ``contentUrl`` directly instead of the template.
        target_fps: frames are sampled at this rate from the video's start (``None``: every frame).
        max_rows: read at most this many rows (``None``: all).
    """

    csv: list[str] = field(default_factory=lambda: ["results_*.csv"])
    video_path_template: str = "videos/{page_dir}/{videoid}.mp4"
    use_url_column: bool = False
    target_fps: float | None = 8.0
    max_rows: int | None = None

    def __post_init__(self) -> None:
        check(len(self.csv) > 0, "webvid.csv must name at least one CSV file or glob")
        check(self.target_fps is None or self.target_fps > 0, "webvid.target_fps must be positive")


@dataclass
class PhotosInputConfig:
    """A folder of a user's own photos per subject (``source: photos``; pipelines/photos_records.py).

    Attributes:
        min_photos: a subject with fewer photos, or fewer registered by SfM, is an error record.
            It is the one minimum of the photos path: stage 2 draws ``clip.num_frames +
            data.num_references`` frames from the clip per sample (the sd15 configs: 16 + 5 = 21,
            the default; the debug configs: 4 + 2 = 6), and ``jobs.train`` refuses shards whose
            clips hold fewer, naming them, before any worker starts. A subject is accepted when at
            least ``min_photos`` of its photos register, whatever fraction of the folder that is
            (10 photos, 6 registered, ``min_photos`` 5: accepted with the 6, the other 4
            dropped): ``sfm.min_registered_fraction`` does not apply to photos, since the photos
            that do not register are dropped rather than interpolated, and only the count that
            remains matters to stage 2.
        max_photos: at most this many photos per subject (sorted by name).
        caption_template: caption when the folder has no ``caption.txt`` (``{name}``: folder name).
        subjects: subject folders to keep (empty: all).
        max_image_size: SfM sees each photo shrunk so that its longer side is at most this (each
            by its own factor; the cameras come back in pixels of the originals). ``None``
            (default): the photos at their original resolution, which keeps the features and
            the precision that shrinking loses. ``sfm.max_image_size`` is the video clips' cap
            and does not apply to photos; set this one to bound SfM's time on large photos.
    """

    min_photos: int = 21
    max_photos: int = 64
    caption_template: str = "a photo of a {name}"
    subjects: list[str] = field(default_factory=list)
    max_image_size: int | None = None

    def __post_init__(self) -> None:
        check(2 <= self.min_photos <= self.max_photos, "photos: need 2 <= min_photos <= max_photos")
        check(
            self.max_image_size is None or self.max_image_size >= 32,
            "photos.max_image_size must be >= 32 pixels, or null for the original resolution",
        )


@dataclass
class DepthModelConfig:
    """ZoeDepth estimation, and where it runs in the pipeline.

    Attributes:
        model: ``from_pretrained`` path or hub id (default ``Intel/zoedepth-nyu-kitti``).
        batch_size: frames per forward pass. Two-head checkpoints (``zoedepth-nyu-kitti``) vote
            the NYU/KITTI head over the whole batch, so keep it >= ``clip.num_frames``: one
            head per clip (batches never mix clips).
        placement: ``separate``: CPU build tasks feed a pool of depth actors, whose output
            write tasks commit (the GPU layout: decoding and SfM scale on CPUs apart from the
            GPUs). ``fused``: one pool of shard workers, each builds, estimates depth and
            commits its shards in one process with the model loaded once (the CPU layout: no
            second copy of every frame through the object store, no separate build and write
            worker processes; 256 clips with ZoeDepth on 2 CPUs: 1.38x the plain loop against
            1.06x, README). ``auto``: ``fused`` when
            ``num_gpus`` is 0, ``separate`` otherwise.
        num_gpus: GPUs per actor (fractions share a GPU; 0 runs on CPU).
        num_cpus: CPUs per actor; ``None``: 1 for a fused shard worker (it does all the CPU
            work of its shards), 0.5 for a separate depth actor (fractional so the build tasks
            feeding it are not starved). Torch uses ``floor(num_cpus)`` threads, at least 1.
        actors: a fixed pool size; ``None``: 1 depth actor (``separate``), or an autoscaling
            pool of shard workers (``fused``): it starts with as many as the cluster's CPUs
            hold at ``num_cpus`` each and grows, up to ``max_actors``, as nodes join (Ray
            Data's autoscaling actor pool), so an autoscaling cluster's new nodes get workers.
        max_actors: the autoscaling fused pool's upper bound; ``None``: one per shard to do.
            Each worker holds a model in memory: cap it on many-core nodes with little RAM.
        input_size: network input size ``[height, width]`` the frames are resized towards
            (ZoeDepth's processor uses 384x512; sides are rounded to multiples of 32).
        flip_average: also run the mirrored frame and average (the processor's default).
    """

    model: str = "Intel/zoedepth-nyu-kitti"
    batch_size: int = 16
    placement: Literal["auto", "separate", "fused"] = "auto"
    num_gpus: float = 0.0
    num_cpus: float | None = None
    actors: int | None = None
    max_actors: int | None = None
    input_size: tuple[int, int] = (384, 512)
    flip_average: bool = True

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "depth.batch_size must be >= 1")
        check(self.actors is None or self.actors >= 1, "depth.actors must be >= 1 (or null: automatic)")
        check(
            self.max_actors is None or self.max_actors >= 1,
            "depth.max_actors must be >= 1 (or null: one per shard)",
        )
        check(self.num_gpus >= 0, "depth.num_gpus must be >= 0")
        check(self.num_cpus is None or self.num_cpus > 0, "depth.num_cpus must be > 0 (or null: automatic)")
        check(min(self.input_size) >= 32, "depth.input_size sides must be >= 32")

    @property
    def fused(self) -> bool:
        """Whether depth runs inside the shard workers (see ``placement``)."""
        return self.placement == "fused" or (self.placement == "auto" and self.num_gpus == 0)

    @property
    def cpus_per_actor(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        return 1.0 if self.fused else 0.5


@dataclass
class SfmConfig:
    """pycolmap structure-from-motion for clips without poses (WebVid) and for photos (``source:
    photos``, which always match exhaustively, take their size cap from ``photos.max_image_size``
    and their minimum from ``photos.min_photos``: ``matcher``, ``max_image_size``,
    ``min_registered_fraction`` and ``keyframe_stride`` do not apply to them).

    Attributes:
        matcher: ``sequential`` (video order, ``overlap`` neighbours) or ``exhaustive``.
        overlap: neighbours matched per frame with the sequential matcher.
        mapper: ``incremental`` or ``global`` (GLOMAP).
        min_registered_fraction: a reconstruction registering fewer frames counts as failed
            (video clips; photos: ``photos.min_photos`` registered photos).
        keep_failed: keep clips whose SfM failed (without poses, flagged) instead of dropping them.
        num_threads: threads per SfM task (one Ray CPU each).
        first_octave: SIFT's first octave. COLMAP's default, -1, upsamples every frame 2x before
            the pyramid: on 16-frame 320x192 clips that is 3.3x the extraction time (106 vs 32 ms
            a frame) for the same rotation and focal errors (``benchmarks/sfm_accuracy.py``), so
            0 here; -1 can still help on frames far smaller than WebVid's.
        max_num_features: SIFT features kept per frame (COLMAP's default is 8192; 2048 is
            beyond what a 320x192 frame yields at octave 0, and bounds matching on larger ones).
        max_image_size: SfM sees the frames shrunk so that their longer side is at most this
            (bilinear, antialiased); the poses come back in pixels of the decoded frames.
            ``None``: full size. SIFT's cost grows with the pixels and a shrunk frame also
            yields fewer features to match and map: on rendered 596x336 clips (WebVid's
            preview size) SfM at 384x216 took ~0.5x the time at full size for rotation errors
            of the same order (orbits 0.19-0.20 deg median against 0.14-0.20), where 320 let one
            orbit slip to 0.9 deg. Clips are stored at 384x256 by the production config, so SfM
            at 384 resolves what is stored. Video clips only: photos are posed at their original
            resolution unless ``photos.max_image_size`` is set.
        keyframe_stride: with the sequential matcher (ordered video frames), the
            reconstruction (matching, incremental mapping, bundle adjustment) is built from
            every ``keyframe_stride``-th frame and the last; each frame between two keyframes is
            then placed against that map by absolute pose (SIFT matched to its two neighbouring
            keyframes' 3D points, LO-RANSAC PnP, refinement), and interpolated only where that
            fails. 2 halves the pairs matched and the images mapped: on
            ``benchmarks/sfm_accuracy.py``'s 16-frame 320x192 clips ~1.7x faster than 1 for
            rotation and focal errors of the same order. 1: every frame in the reconstruction.
            Unordered photos (the exhaustive matcher) always use every frame.
        extra_frames: WebVid: SfM also sees up to this many frames after the clip's last one
            (same sampling rate, when the video has them) and only the clip's poses are
            stored. The focal is observable only through rotation, so a longer reach
            conditions it better on short clips, at the cost of SfM time (about linear in the
            frames). 0: SfM on the stored frames only.
        min_quality: the pose-quality figure (``json.pose_quality.score`` =
            1 / (1 + s / 0.05), s the focal's relative standard deviation from bundle
            adjustment's covariance: 0.5 = focal known to +-5 %, 0.33 = +-10 %) below which a
            clip is low quality. 0 flags nothing.
        max_forward_motion: a clip whose reconstructed camera moves along its view
            (``json.pose_quality.forward_motion``, the median |cos| between baselines and the
            optical axis; 1 = a pure dolly) more than this is low quality too: SfM's rotations
            on dollies were 9 degrees off on the accuracy benchmark with a confident covariance,
            and their reconstructions, themselves wrong, still showed 0.52-0.54 against 0.18 for
            66-degree orbits, 0.06 for arcs and 0.01 for tracks. 1 flags none.
        low_quality: what happens to a low-quality clip: ``flag`` stores it with
            ``json.pose_quality.low = true`` (filter on it when training), ``drop`` makes it an
            error record (stage ``sfm``) like a failed reconstruction.
        seed: COLMAP's random seed, set again at the start of every clip's SfM. Its RANSACs
            draw from one generator per thread, so without that a clip's poses would depend on
            the clips its worker posed before it: a rerun, a resume or another placement of the
            shards would store different poses.
    """

    matcher: Literal["sequential", "exhaustive"] = "sequential"
    overlap: int = 5
    mapper: Literal["incremental", "global"] = "incremental"
    min_registered_fraction: float = 0.8
    keep_failed: bool = False
    num_threads: int = 1
    first_octave: int = 0
    max_num_features: int = 2048
    max_image_size: int | None = 384
    keyframe_stride: int = 2
    extra_frames: int = 0
    min_quality: float = 0.5
    max_forward_motion: float = 0.4
    low_quality: Literal["flag", "drop"] = "flag"
    seed: int = 0

    def __post_init__(self) -> None:
        check(0 < self.min_registered_fraction <= 1, "sfm.min_registered_fraction must be in (0, 1]")
        check(self.overlap >= 1 and self.num_threads >= 1, "sfm.overlap and sfm.num_threads must be >= 1")
        check(self.first_octave >= -1, "sfm.first_octave must be >= -1 (-1: upsample 2x first)")
        check(self.max_num_features >= 64, "sfm.max_num_features must be >= 64")
        check(self.extra_frames >= 0, "sfm.extra_frames must be >= 0")
        check(
            self.max_image_size is None or self.max_image_size >= 32,
            "sfm.max_image_size must be >= 32 pixels, or null for full size",
        )
        check(self.keyframe_stride >= 1, "sfm.keyframe_stride must be >= 1 (1: every frame is a keyframe)")
        check(0 <= self.min_quality <= 1, "sfm.min_quality must be in [0, 1] (0: flag nothing)")
        check(0 <= self.max_forward_motion <= 1, "sfm.max_forward_motion must be in [0, 1] (1: flag none)")


@dataclass
class PreprocessConfig:
    """Raw dataset -> shards.

    Attributes:
        source: ``co3d``, ``webvid`` or ``photos`` (a folder of unposed photos per subject).
        input: dataset root (fsspec URL).
        output: output folder for ``{split}-{index:06d}.tar``, ``manifest.parquet``, ``errors.parquet``.
        split: shard name prefix.
        samples_per_shard: clips per tar (the unit of work, retry and resume).
        jpeg_quality: quality of the stored frames.
        estimate_depth: run ZoeDepth (WebVid and photos need it for depth; CO3D per ``co3d.depth``).
        estimate_poses: run SfM (WebVid; photos always; CO3D has annotated cameras).
        lock_ttl_s: a run holds ``<output>/_lock.json`` and renews it every ``lock_ttl_s / 4``;
            a second run on the same output is refused unless the lock's owner died (same host)
            or stopped renewing it for this long (another host).
    """

    PRESETS = ("debug",)

    source: Literal["co3d", "webvid", "photos"] = "co3d"
    input: str = ""
    output: str = ""
    split: str = "train"
    samples_per_shard: int = 64
    jpeg_quality: int = 95
    estimate_depth: bool = True
    estimate_poses: bool = True
    lock_ttl_s: float = 120.0
    clip: ClipConfig = field(default_factory=ClipConfig)
    co3d: Co3dInputConfig = field(default_factory=Co3dInputConfig)
    webvid: WebVidInputConfig = field(default_factory=WebVidInputConfig)
    photos: PhotosInputConfig = field(default_factory=PhotosInputConfig)
    depth: DepthModelConfig = field(default_factory=DepthModelConfig)
    sfm: SfmConfig = field(default_factory=SfmConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="mvcustom-preprocess"))

    def __post_init__(self) -> None:
        check(self.samples_per_shard >= 1, "samples_per_shard must be >= 1")
        check(1 <= self.jpeg_quality <= 100, "jpeg_quality must be in [1, 100]")
        check(self.lock_ttl_s >= 4, "lock_ttl_s must be >= 4 seconds")
        check(
            all(c.isalnum() or c in "_-" for c in self.split) and self.split != "",
            f"split {self.split!r} may only use [A-Za-z0-9_-]",
        )

    @classmethod
    def debug(cls) -> PreprocessConfig:
        return cls(
            samples_per_shard=4,
            clip=ClipConfig(num_frames=8, height=64, width=64),
            depth=DepthModelConfig(batch_size=4, input_size=(64, 64), flip_average=False),
            sfm=SfmConfig(overlap=3),
            ray=RayConfig(num_cpus=2),
        )
