"""Which frames of a video a clip samples, decoded without the disposable frames it does not keep.

A clip keeps ``count`` frames sampled at ``target_fps`` from the start of the video (the rule of
:class:`FrameSampler`). On WebVid that is a third or less of the frames (8 fps from 24-30 fps
sources), yet every frame used to go through the decoder: most of the preprocessing job's
decode time. In an H.264 stream a picture none of whose slices has ``nal_ref_idc > 0`` is
*disposable*: no other picture predicts from it (ITU-T H.264 7.4.1), so a decoder that never
sees it produces every other picture bit for bit as before. :meth:`SampledVideo.frames` withholds
those of them the clip does not keep: on x264's default GOP (B-pyramid, 3 B-frames) half the
pictures are disposable, and sampling every third frame skips a third of all pictures.

Correct by construction, not by assumption:
- The plan runs on the packets' presentation times in the same order the decoded frames would
  come out (pts order), with the same rule, so it selects the frames the plain loop selects. A
  picture's decision waits until :data:`LOOKAHEAD` later packets are known (H.264 reorders at
  most 16 pictures, so every earlier-presented picture is known by then); a stream that breaks
  that bound, or a decoder that returns frames out of presentation order or not every kept
  one, is decoded again the plain way.
- Streams this cannot reason about (not H.264 in length-prefixed (avcC) form, packets without
  pts, repeated pts, packets the demuxer marks to discard) are decoded the plain way from the
  start.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from typing import Any

# Packets read past a picture before deciding whether to skip it: more than H.264's largest
# reorder depth (max_dec_frame_buffering <= 16), so every picture presented before it is known.
LOOKAHEAD = 32

__all__ = ["FrameSampler", "LOOKAHEAD", "NoVideoStream", "SampledVideo", "is_disposable_h264"]


class FrameSampler:
    """The sampling rule: frames in presentation order, the first whose time reaches each
    multiple of ``1 / target_fps`` (half a source frame early counts), ``count`` of them; every
    frame when ``target_fps`` is None."""

    def __init__(self, count: int, target_fps: float | None, fps: float):
        self.count = count
        self.step = 1.0 / target_fps if target_fps else None
        self.half = 0.5 / fps if fps else 0.0
        self.taken = 0

    @property
    def done(self) -> bool:
        return self.taken >= self.count

    def take(self, t: float) -> bool:
        """Whether the next frame in presentation order, at ``t`` seconds, is kept."""
        if self.done:
            return False
        if self.step is None or t + 1e-6 >= self.taken * self.step - self.half:
            self.taken += 1
            return True
        return False


def _nal_length_size(extradata: bytes | None) -> int | None:
    """Bytes of each NAL unit's length prefix from an avcC record (ISO/IEC 14496-15 5.2.4.1),
    or None for Annex B or missing extradata."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    return (extradata[4] & 0x03) + 1


def is_disposable_h264(data: bytes | memoryview, length_size: int) -> bool:
    """True iff the access unit has slices and every slice NAL unit (types 1-5) has
    ``nal_ref_idc == 0``. Malformed input is not disposable (it goes to the decoder)."""
    view = memoryview(data)
    pos, end, slices = 0, len(view), 0
    while pos + length_size < end:
        size = int.from_bytes(view[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > end:
            return False
        header = view[pos]
        if 1 <= header & 0x1F <= 5:
            if header & 0x60:
                return False
            slices += 1
        pos += size
    return slices > 0 and pos == end


def _plain(packets: Iterator[Any], codec: Any, sampler: FrameSampler, fps: float):
    """Every picture through the decoder (PyAV's demux ends with the empty packet that drains it)."""
    k = -1
    for packet in packets:
        for frame in codec.decode(packet):
            k += 1
            t = float(frame.time) if frame.time is not None else (k / fps if fps else k)
            if sampler.take(t):
                yield k, frame
                if sampler.done:
                    return


class _Fallback(Exception):
    """The stream broke an assumption of the planned decode: decode it the plain way."""


def _planned(
    packets: Iterator[Any], codec: Any, sampler: FrameSampler, time_base, length_size: int, stats: dict
):
    """Decode in packet order, withholding disposable pictures the sampler does not keep.
    Raises :class:`_Fallback` (before yielding a wrong frame) where the stream is not as
    assumed."""
    ahead: deque = deque()
    seen: set[int] = set()  # pts of every packet read
    unresolved: list[int] = []  # pts heap of packets read, not yet placed in presentation order
    placed: dict[int, tuple[int, bool]] = {}  # pts -> (presentation index, kept)
    last_placed = -(2**63)  # placing runs in pts order: the largest pts placed

    def read() -> bool:
        """One more packet into ``ahead``; False at the end of the stream."""
        for packet in packets:
            if packet.size == 0:
                continue
            if packet.pts is None or packet.is_discard or packet.pts in seen:
                raise _Fallback
            if packet.pts < last_placed:
                raise _Fallback  # presented before a picture already placed: past LOOKAHEAD
            seen.add(packet.pts)
            ahead.append(packet)
            heapq.heappush(unresolved, packet.pts)
            return True
        return False

    def place(upto: int | None) -> None:
        """Give presentation indices to every read pts <= ``upto`` (all of them at the end)."""
        nonlocal last_placed
        while unresolved and (upto is None or unresolved[0] <= upto):
            last_placed = heapq.heappop(unresolved)
            placed[last_placed] = (len(placed), sampler.take(float(last_placed * time_base)))

    def decoded() -> Iterator[Any]:
        """The decoder's frames, the disposable pictures not kept never sent, then its drain."""
        exhausted = False
        while True:
            while not exhausted and len(ahead) <= LOOKAHEAD:
                exhausted = not read()
            if not ahead:
                break
            packet = ahead.popleft()
            place(None if exhausted else packet.pts)
            if not placed[packet.pts][1] and is_disposable_h264(memoryview(packet), length_size):
                stats["skipped"] += 1
                continue
            stats["sent"] += 1
            yield from codec.decode(packet)
        yield from codec.decode(None)

    kept, last_out = 0, -1
    for frame in decoded():
        got = placed.get(frame.pts)
        if got is None or got[0] <= last_out:
            raise _Fallback  # a frame that is no packet's, or out of presentation order
        last_out = got[0]
        if got[1]:
            kept += 1
            yield got[0], frame
            if sampler.done and kept == sampler.taken:
                return
    if kept != sampler.taken:
        raise _Fallback  # the decoder did not return a kept frame (a corrupt picture)


class NoVideoStream(ValueError):
    """The file opens but holds no video stream."""


class SampledVideo:
    """The first video stream of a seekable file object (PyAV), and the frames a clip keeps from
    it (:meth:`frames`). Raises :class:`NoVideoStream` when the file has none; PyAV's own errors
    for unreadable input pass through."""

    def __init__(self, file: Any):
        self.file = file
        self._open()
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.time_base = self.stream.time_base
        #: pictures decoded and withheld by the last :meth:`frames` (None: decoded the plain way)
        self.planned: dict | None = None

    def _open(self) -> None:
        import av

        self.container = av.open(self.file)
        if not self.container.streams.video:
            self.container.close()
            raise NoVideoStream("no video stream")
        self.stream = self.container.streams.video[0]

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> SampledVideo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def frames(self, count: int, target_fps: float | None) -> Iterator[tuple[int, Any]]:
        """``(source frame index, av.VideoFrame)`` of the ``count`` frames sampled at
        ``target_fps`` (fewer where the video ends first), in presentation order; the index is
        the frame's position in presentation order. The frames are the ones decoding every
        picture gives, bit for bit."""
        codec = self.stream.codec_context
        length_size = _nal_length_size(codec.extradata) if codec.name == "h264" else None
        self.planned = None
        if length_size is not None and count > 0:
            stats = {"sent": 0, "skipped": 0}
            out: list[tuple[int, Any]] = []
            try:  # held until the plan has held: a fallback must not follow frames already given
                sampler = FrameSampler(count, target_fps, self.fps)
                demuxed = self.container.demux(self.stream)
                for item in _planned(demuxed, codec, sampler, self.time_base, length_size, stats):
                    out.append(item)
            except _Fallback:
                self.close()
                self.file.seek(0)
                self._open()
            else:
                self.planned = stats
                yield from out
                return
        sampler = FrameSampler(count, target_fps, self.fps)
        yield from _plain(self.container.demux(self.stream), self.stream.codec_context, sampler, self.fps)
