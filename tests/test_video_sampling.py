"""Sampled decoding: withholding disposable H.264 pictures gives the same frames, bit for bit."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from mvcustom.data.generator.webvid_writer import encode_h264
from pipelines import video_sampling
from pipelines.video_sampling import FrameSampler, SampledVideo, is_disposable_h264


def _textured_clip(num_frames: int = 48, fps: int = 24) -> bytes:
    """A moving smooth texture: x264 (medium preset: B-pyramid) encodes it with B-frames."""
    yy, xx = np.mgrid[0:96, 0:400].astype(float)
    base = 128 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 40 * np.sin((xx + yy) / 13.0)
    img = np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, -1)
    img[..., 1] = np.roll(img[..., 1], 9, axis=1)
    frames = np.stack([img[:, 3 * i : 3 * i + 160] for i in range(num_frames)])
    return encode_h264(frames, fps, crf=23)


def _every_picture(data: bytes, count: int, target_fps: float | None):
    """The reference: every packet through the decoder, the sampling rule on what comes out."""
    out = []
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        sampler = FrameSampler(count, target_fps, fps)
        for k, frame in enumerate(c.decode(video=0)):
            if sampler.take(float(frame.time)):
                out.append((k, frame.to_ndarray(format="rgb24")))
            if sampler.done:
                break
    return out


def _sampled(data: bytes, count: int, target_fps: float | None):
    with SampledVideo(io.BytesIO(data)) as video:
        got = [(k, f.to_ndarray(format="rgb24")) for k, f in video.frames(count, target_fps)]
        return got, video.planned


def _same(a, b) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(
        np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def clip() -> bytes:
    return _textured_clip()


@pytest.mark.parametrize(
    ("count", "target_fps"), [(16, 8.0), (12, 8.0), (5, 6.0), (3, 1.0), (40, 8.0), (10, None), (48, 24.0)]
)
def test_withheld_pictures_change_no_kept_frame(clip, count, target_fps):
    want = _every_picture(clip, count, target_fps)
    got, planned = _sampled(clip, count, target_fps)
    assert _same(want, got)
    assert planned is not None  # the planned path ran (no fallback)
    if target_fps is not None and target_fps < 24:  # frames the clip skips, some disposable
        assert planned["skipped"] > 0, planned
        assert planned["sent"] + planned["skipped"] <= 48
    elif count == 48:  # every picture kept: none withheld
        assert planned == {"sent": 48, "skipped": 0}


@pytest.mark.parametrize(
    "x264_params",
    [
        "b-pyramid=none",
        "b-pyramid=strict",
        "bframes=8:b-adapt=2",
        "bframes=0",
        "open-gop=1:keyint=10",
        "ref=1",
    ],
)
def test_other_gop_structures_decode_the_same(x264_params):
    """Without a B-pyramid, with more B-frames, none, open GOPs (B-frames presented before the
    I-frame that follows them in decode order) and one reference frame."""
    yy, xx = np.mgrid[0:64, 0:300].astype(float)
    img = np.clip(128 + 90 * np.sin(xx / 6.0) * np.cos(yy / 4.0), 0, 255).astype(np.uint8)
    frames = np.stack([np.repeat(img[:, 4 * i : 4 * i + 96, None], 3, -1) for i in range(40)])
    data = encode_h264(frames, 24, crf=23, x264_params=x264_params)
    for count, fps in ((12, 8.0), (7, 5.0), (40, None)):
        got, planned = _sampled(data, count, fps)
        assert _same(_every_picture(data, count, fps), got), (x264_params, count, fps)
        assert planned is not None
        if x264_params == "bframes=0":
            assert planned["skipped"] == 0  # every picture is a reference
        elif fps == 8.0:
            assert planned["skipped"] > 0, planned


def test_the_generated_webvid_clips_decode_the_same(sample_data):
    videos = sorted((sample_data / "webvid" / "videos").rglob("*.mp4"))
    assert videos
    for path in videos:
        data = path.read_bytes()
        for count, fps in ((4, 6.0), (12, None), (3, 4.0)):
            got, planned = _sampled(data, count, fps)
            assert _same(_every_picture(data, count, fps), got), (path.name, count, fps)
            assert planned is not None


def test_a_stream_that_reorders_past_the_lookahead_is_decoded_plainly(clip, monkeypatch):
    """With no lookahead a B-frame arrives after a later picture was placed: the plan cannot
    hold, and the whole clip is decoded again the plain way, with the same result."""
    monkeypatch.setattr(video_sampling, "LOOKAHEAD", 0)
    got, planned = _sampled(clip, 16, 8.0)
    assert planned is None
    assert _same(_every_picture(clip, 16, 8.0), got)


def test_streams_it_cannot_reason_about_are_decoded_plainly():
    buf = io.BytesIO()
    frames = np.random.default_rng(0).integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    data = buf.getvalue()
    got, planned = _sampled(data, 4, 4.0)
    assert planned is None
    assert _same(_every_picture(data, 4, 4.0), got)


def _nal(header: int, payload: bytes = b"\x88\x80") -> bytes:
    body = bytes([header]) + payload
    return len(body).to_bytes(4, "big") + body


def test_disposable_means_every_slice_is_unreferenced():
    sei, non_ref_slice, ref_slice, idr = 0x06, 0x01, 0x21, 0x65  # nal_ref_idc in bits 5-6
    assert is_disposable_h264(_nal(sei) + _nal(non_ref_slice), 4)
    assert is_disposable_h264(_nal(non_ref_slice) + _nal(non_ref_slice), 4)
    assert not is_disposable_h264(_nal(non_ref_slice) + _nal(ref_slice), 4)  # one slice referenced
    assert not is_disposable_h264(_nal(idr), 4)
    assert not is_disposable_h264(_nal(sei), 4)  # no picture in it
    assert not is_disposable_h264(_nal(non_ref_slice)[:-1], 4)  # truncated: to the decoder
    assert not is_disposable_h264(b"\x00\x00\x00\x00" + _nal(non_ref_slice), 4)  # empty NAL
    two = (3).to_bytes(2, "big") + bytes([non_ref_slice, 0x88, 0x80])
    assert is_disposable_h264(two, 2)  # 2-byte length prefixes (avcC lengthSizeMinusOne = 1)


def test_the_sampling_rule():
    s = FrameSampler(3, 8.0, 24.0)
    kept = [k for k in range(24) if s.take(k / 24)]
    assert kept == [0, 3, 6] and s.done and not s.take(1.0)
    s = FrameSampler(4, None, 24.0)
    assert [s.take(k / 24) for k in range(5)] == [True] * 4 + [False]
