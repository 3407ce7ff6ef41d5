"""The generated WebVid tree: WebVid's CSV columns, the downloader's layout, real H.264 files."""

from __future__ import annotations

import csv
import re

import av
import numpy as np
import pytest

from mvcustom.data.generator.webvid_writer import CSV_COLUMNS, iso_duration, page_dir_for


def test_csv_and_video_layout(sample_data):
    root = sample_data / "webvid"
    with open(root / "results_2M_train.csv", newline="", encoding="utf8") as f:
        reader = csv.DictReader(f)
        assert (
            tuple(reader.fieldnames)
            == CSV_COLUMNS
            == ("videoid", "contentUrl", "duration", "page_dir", "name")
        )
        rows = list(reader)
    assert len(rows) == 2
    for row in rows:
        assert re.fullmatch(r"\d{10}", row["videoid"])
        assert re.fullmatch(r"PT\d\dH\d\dM\d\dS", row["duration"])
        assert re.fullmatch(r"(\d{6})_(\d{6})", row["page_dir"])
        lo, hi = (int(x) for x in row["page_dir"].split("_"))
        assert hi - lo == 49 and lo % 50 == 1
        assert row["contentUrl"].startswith(
            f"https://ak.picdn.net/shutterstock/videos/{row['videoid']}/preview/stock-footage-"
        )
        video = root / "videos" / row["page_dir"] / f"{row['videoid']}.mp4"
        with av.open(str(video)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
            frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
        assert len(frames) == 12 and frames[0].shape == (96, 160, 3)
        gt = np.load(sample_data / "ground_truth" / "webvid" / f"{row['videoid']}.npz")
        assert gt["w2c"].shape == (12, 4, 4) and gt["K"].shape == (12, 3, 3)
        # the decoded video is the rendered one: the camera moves, so frames differ
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5
    # captions survive verbatim, non-ASCII included
    assert any("Café" in r["name"] and "—" in r["name"] for r in rows)


def test_helpers():
    assert iso_duration(17) == "PT00H00M17S" and iso_duration(3725) == "PT01H02M05S"
    assert page_dir_for(27732) == "027701_027750" and page_dir_for(50) == "000001_000050"


@pytest.mark.slow
def test_make_sample_data_job_is_deterministic(tmp_path, capsys):
    from jobs.make_sample_data import main

    cfg = "jobs/configs/make_sample_data_debug.yaml"
    a = main(["--out", str(tmp_path / "a"), "--config", cfg, "--set", "write_webvid=false"])
    b = main(["--out", str(tmp_path / "b"), "--config", cfg, "--set", "write_webvid=false"])
    assert a["co3d_sequences"] == b["co3d_sequences"] == 4
    for p in (tmp_path / "a" / "co3d").rglob("*.jgz"):
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        import gzip

        assert gzip.decompress(p.read_bytes()) == gzip.decompress(q.read_bytes())
    assert '"co3d_sequences": 4' in capsys.readouterr().out


def test_generated_videos_are_the_same_bytes_every_time():
    """The generator's H.264 encode of one rendered 160x96 clip, six times: one video. (libx264
    with MB-tree on gave 9 different videos in 12 encodes of it, and SfM's errors with them.)"""
    import torch

    from mvcustom.data.generator.scene import Scene, render
    from mvcustom.data.generator.subjects import make_room, make_subject
    from mvcustom.data.generator.webvid_writer import clip_cameras, encode_h264

    cams = clip_cameras(torch.Generator().manual_seed(5), "arc", 12, (96, 160))
    frames = render(Scene(make_subject("teddybear", 0) + make_room(50_000)), cams).rgb.numpy()
    assert len({encode_h264(frames, 12, 18) for _ in range(6)}) == 1


def test_replicate_webvid_lists_more_clips_than_rendered(sample_data, tmp_path):
    """Benchmarks' scaled WebVid roots: the generated rows in order, then replicas with new ids
    whose videos are the originals' bytes; the reader's layout holds for every row."""
    from mvcustom.data.generator.webvid_writer import replicate_webvid

    src = sample_data / "webvid"
    dst = tmp_path / "webvid-5"
    rows = replicate_webvid(str(src), str(dst), 5)
    with open(dst / "results_2M_train.csv", newline="", encoding="utf8") as f:
        listed = list(csv.DictReader(f))
    assert listed == rows and len(rows) == 5
    with open(src / "results_2M_train.csv", newline="", encoding="utf8") as f:
        orig = list(csv.DictReader(f))
    assert rows[:2] == orig
    assert [r["videoid"] for r in rows[2:]] == [
        f"{orig[0]['videoid']}r1",
        f"{orig[1]['videoid']}r1",
        f"{orig[0]['videoid']}r2",
    ]
    assert len({r["videoid"] for r in rows}) == 5
    for i, r in enumerate(rows):
        o = orig[i % 2]
        assert r["name"] == o["name"] and r["page_dir"] == o["page_dir"]
        video = dst / "videos" / r["page_dir"] / f"{r['videoid']}.mp4"
        assert video.read_bytes() == (src / "videos" / o["page_dir"] / f"{o['videoid']}.mp4").read_bytes()
    with pytest.raises(FileExistsError):
        replicate_webvid(str(src), str(dst), 3)
    with pytest.raises(FileNotFoundError, match="results_"):
        replicate_webvid(str(tmp_path), str(tmp_path / "x"), 3)
    with pytest.raises(ValueError, match="n >= 1"):
        replicate_webvid(str(src), str(tmp_path / "y"), 0)
