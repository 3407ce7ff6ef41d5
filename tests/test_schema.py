"""The shard schema: encode -> tar -> read back with plain webdataset -> decode."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from mvcustom.data.schema import ClipSample, decode_sample, encode_sample, make_key


def _sample(n=3, h=16, w=24, key="co3d-110_13051_23361-0000"):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack(
        [np.stack([(xx * 10 + i * 20) % 256, yy * 15 % 256, np.full_like(xx, 128)], -1) for i in range(n)]
    ).astype(np.uint8)
    return ClipSample(
        key=key,
        meta={
            "source": "co3d",
            "sequence": "110_13051_23361",
            "category": "apple",
            "pose_source": "co3d",
            "caption": "a photo of an apple — naïve",
        },
        caption="a photo of an apple — naïve",
        frames=frames,
        intrinsics=np.tile(np.array([[20, 0, 12], [0, 20, 8], [0, 0, 1]], np.float32), (n, 1, 1)),
        extrinsics=np.tile(np.eye(4, dtype=np.float32), (n, 1, 1)),
        depth=rng.uniform(0.5, 3, (n, h, w)).astype(np.float16),
        mask=(rng.uniform(size=(n, h, w)) > 0.5).astype(np.uint8) * 255,
    )


def test_round_trip_through_a_tar(tmp_path):
    s = _sample()
    path = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write(encode_sample(s))
    raw = next(iter(wds.WebDataset(str(path), shardshuffle=False)))
    assert sorted(k for k in raw if k.startswith("frame_")) == [
        "frame_000.jpg",
        "frame_001.jpg",
        "frame_002.jpg",
    ]
    back = decode_sample(raw)
    assert back.key == s.key and back.caption == s.caption and back.meta["num_frames"] == 3
    assert np.array_equal(back.intrinsics, s.intrinsics) and np.array_equal(back.extrinsics, s.extrinsics)
    assert np.array_equal(back.depth, s.depth) and np.array_equal(back.mask, s.mask)
    assert np.abs(back.frames.astype(int) - s.frames.astype(int)).mean() < 3  # JPEG
    # plain webdataset decoding works without our code too
    dec = next(iter(wds.WebDataset(str(path), shardshuffle=False).decode("rgb8")))
    assert dec["frame_001.jpg"].shape == (16, 24, 3) and dec["depth.npy"].dtype == np.float16


def test_our_tar_writer_lays_members_out_as_webdatasets(tmp_path):
    """pipelines.shards.tar_bytes (the standard library's tarfile: webdataset's import pulls in
    torch) against webdataset.TarWriter on the same two samples: the same members, in the same
    order, with the same bytes and mode; a field that is not encoded bytes is refused."""
    import io
    import tarfile

    from pipelines.shards import tar_bytes

    samples = [encode_sample(_sample()), encode_sample(_sample(n=2, key="co3d-110_13051_23361-0001"))]
    with wds.TarWriter(str(tmp_path / "wds.tar")) as w:
        for smp in samples:
            w.write(smp)

    def members(tar):
        return [(m.name, m.mode, m.isfile(), tar.extractfile(m).read()) for m in tar.getmembers()]

    with tarfile.open(tmp_path / "wds.tar") as a, tarfile.open(fileobj=io.BytesIO(tar_bytes(samples))) as b:
        assert members(b) == members(a)
    (tmp_path / "ours.tar").write_bytes(tar_bytes(samples))
    raw = list(wds.WebDataset(str(tmp_path / "ours.tar"), shardshuffle=False))
    assert [decode_sample(r).key for r in raw] == [smp["__key__"] for smp in samples]
    with pytest.raises(ValueError, match="field txt is str, not encoded bytes"):
        tar_bytes([{**samples[0], "txt": "not bytes"}])


def test_keys():
    assert make_key("webvid", "1053841541", 3) == "webvid-1053841541-0003"
    assert make_key("co3d", "a b/c.d", 0).startswith("co3d-a_b_c_d_")
    assert make_key("co3d", "106_12648_23157", 0) == "co3d-106_12648_23157-0000"  # clean ids unchanged
    # injective: ids that differ only in replaced characters keep different keys
    assert len({make_key("co3d", s, 0) for s in ("a.b", "a_b", "a b", "a/b")}) == 4
    with pytest.raises(ValueError, match="unknown source"):
        make_key("youtube", "x", 0)


@pytest.mark.parametrize(
    ("change", "member"),
    [
        ({"key": "co3d.x-0000"}, "__key__"),
        ({"intrinsics": np.zeros((2, 3, 3), np.float32)}, "intrinsics.npy"),
        ({"depth": np.zeros((3, 16, 24), np.float32)}, "depth.npy"),
        ({"meta": {"source": "vimeo", "pose_source": None}}, "json"),
        ({"meta": {"source": "co3d"}}, "json"),
    ],
)
def test_schema_violations_are_named(change, member):
    s = _sample()
    for k, v in change.items():
        setattr(s, k, v)
    with pytest.raises(ValueError, match=f"member '{member}"):
        encode_sample(s)


def test_missing_member_is_named():
    raw = encode_sample(_sample())
    del raw["extrinsics.npy"]
    with pytest.raises(ValueError, match="member 'extrinsics.npy' is missing"):
        decode_sample(raw)


def test_clip_without_poses_is_allowed_only_when_flagged():
    s = _sample()
    s.intrinsics = s.extrinsics = None
    with pytest.raises(ValueError, match="member 'intrinsics.npy' is required unless"):
        encode_sample(s)
    s.meta["pose_source"] = None
    back = decode_sample(encode_sample(s))
    assert back.intrinsics is None and back.extrinsics is None


def test_member_name_guard():
    from mvcustom.data.schema import check_member_name

    for ok in ("co3d-seq-0000.frame_000.jpg", "folder/k.json", "k..json"):
        assert check_member_name(ok)
    for bad in ("/etc/passwd", "../k.json", "a/../../k.json", "..\\k.json", "C:/k.json", "\\\\host\\k"):
        with pytest.raises(ValueError, match="absolute or '..' path"):
            check_member_name(bad)
