"""Config of the synthetic dataset generator (``python -m jobs.make_sample_data``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mvcustom.configs.base import check


@dataclass
class Co3dSampleConfig:
    """The synthetic CO3Dv2 tree.

    Attributes:
        categories: subject categories (see ``mvcustom.data.generator.subjects.CATEGORIES``).
        sequences_per_category: sequences (one subject each) per category.
        frames_per_sequence: frames in each orbit-like hand-held capture.
        image_sizes: ``[height, width]`` choices; each sequence takes one (non-square on purpose).
        intrinsics_formats: NDC formats the annotations are written in, cycled over sequences
            (CO3Dv2 uses ``ndc_isotropic``; ``ndc_norm_image_bounds`` is CO3Dv1's).
        depth_hole_fraction: share of depth pixels written as unknown (0), as in real CO3D's
            MVS depth, to exercise the depth masks.
        points_per_frame: ground-truth surface points recorded per frame in the sidecar.
    """

    categories: list[str] = field(default_factory=lambda: ["teddybear", "chair", "car"])
    sequences_per_category: int = 2
    frames_per_sequence: int = 24
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(120, 160), (160, 120), (144, 176)])
    intrinsics_formats: list[str] = field(default_factory=lambda: ["ndc_isotropic", "ndc_norm_image_bounds"])
    depth_hole_fraction: float = 0.05
    points_per_frame: int = 64

    def __post_init__(self) -> None:
        from mvcustom.data.generator.subjects import CATEGORIES

        for c in self.categories:
            check(
                c in CATEGORIES,
                f"co3d.categories: unknown category {c!r}; the generator knows {list(CATEGORIES)}",
            )
        check(self.sequences_per_category >= 1, "co3d.sequences_per_category must be >= 1")
        check(self.frames_per_sequence >= 2, "co3d.frames_per_sequence must be >= 2")
        check(len(self.image_sizes) > 0, "co3d.image_sizes must not be empty")
        for f in self.intrinsics_formats:
            check(
                f in ("ndc_isotropic", "ndc_norm_image_bounds"),
                f"co3d.intrinsics_formats: unknown format {f!r}",
            )
        check(0 <= self.depth_hole_fraction < 1, "co3d.depth_hole_fraction must be in [0, 1)")


@dataclass
class WebVidSampleConfig:
    """The synthetic WebVid tree: ``results_2M_<split>.csv`` plus ``videos/{page_dir}/{videoid}.mp4``.

    Attributes:
        num_videos: clips to render (camera moving through a textured room).
        height, width: video size (even numbers, H.264 4:2:0).
        fps: frame rate.
        duration_s: clip length in seconds.
        crf: x264 constant rate factor (18 is visually lossless).
        motions: camera motions cycled over clips: ``orbit``, ``truck`` (sideways),
            ``dolly`` (forward), ``arc``, ``static`` (no camera motion: a shot to filter out).
        split: CSV split name (``train`` or ``val``).
    """

    num_videos: int = 4
    height: int = 180
    width: int = 320
    fps: int = 24
    duration_s: float = 2.0
    crf: int = 18
    motions: list[str] = field(default_factory=lambda: ["orbit", "truck", "dolly", "arc"])
    split: str = "train"

    def __post_init__(self) -> None:
        check(self.num_videos >= 0, "webvid.num_videos must be >= 0")
        check(
            self.height % 2 == 0 and self.width % 2 == 0,
            f"webvid.height/width must be even for H.264, got {self.height}x{self.width}",
        )
        check(self.fps > 0 and self.duration_s > 0, "webvid.fps and webvid.duration_s must be positive")
        for m in self.motions:
            check(m in ("orbit", "truck", "dolly", "arc", "static"), f"webvid.motions: unknown motion {m!r}")
        check(self.split in ("train", "val"), f"webvid.split must be train or val, got {self.split!r}")


@dataclass
class SampleDataConfig:
    """What ``jobs.make_sample_data`` writes under ``--out``: ``co3d/``, ``webvid/``, ``ground_truth/``.

    Attributes:
        seed: everything is a deterministic function of this seed.
        co3d: the CO3Dv2 tree (``None``/``write_co3d: false`` to skip).
        webvid: the WebVid tree.
        write_co3d, write_webvid: which trees to write.
    """

    PRESETS = ("demo", "debug")

    seed: int = 0
    co3d: Co3dSampleConfig = field(default_factory=Co3dSampleConfig)
    webvid: WebVidSampleConfig = field(default_factory=WebVidSampleConfig)
    write_co3d: bool = True
    write_webvid: bool = True

    @classmethod
    def demo(cls) -> SampleDataConfig:
        return cls()

    @classmethod
    def debug(cls) -> SampleDataConfig:
        return cls(
            co3d=Co3dSampleConfig(
                categories=["teddybear", "car"], sequences_per_category=2, frames_per_sequence=8
            ),
            webvid=WebVidSampleConfig(
                num_videos=2, height=96, width=160, fps=12, duration_s=1.0, motions=["arc", "truck"]
            ),
        )
