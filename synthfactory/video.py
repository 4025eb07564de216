"""Clips as bytes: H.264 MP4 through PyAV with fixed encoder settings, or lossless `.npy`.

Part of the format floor: the rollout generators write clips with `encode_clip`, and the
loader, checks and report read them back with `decode_clip`, so every reader agrees on
what a clip's bytes mean. A clip is a ``T×H×W×3`` uint8 array.

Same frames, same bytes: x264 runs single-threaded with a fixed preset and quality, and
the MP4 muxer writes no creation time; the bytes depend only on the frames, the fps and
the PyAV/FFmpeg build (pinned), which is what keeps releases reproducible and shard
caches valid.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

#: how a clip's frames are stored: H.264 in MP4 (small, lossy), or a lossless uint8 array
CLIP_FORMATS = ("mp4", "npy")
#: the member a clip's frames are stored in, per format; a sample may hold more clips as
#: ``<name>.mp4`` / ``<name>.frames.npy`` (a world model's context beside its output)
CLIP_MEMBER = {"mp4": "mp4", "npy": "frames.npy"}
#: x264 settings that fix the bitstream: one thread (no frame-thread races), a fixed
#: preset and quality, and no macroblock-tree rate control, whose output was seen to
#: depend on what the process had encoded before (same frames, different bytes). The
#: quantiser does not vary between frames (qcomp=1), so a frame that does not change
#: decodes unchanged and a frozen clip stays measurably frozen.
X264_OPTIONS = {"preset": "medium", "crf": "18", "threads": "1",
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:no-mbtree=1:qcomp=1.0"}


class ClipFormatError(ValueError):
    """Bytes that are not a clip this module wrote (or frames it cannot write)."""


def clip_format_of(member: str) -> str | None:
    """The clip format a sample member holds (``mp4``, ``context.mp4``: mp4;
    ``frames.npy``, ``context.frames.npy``: npy), or None for any other member."""
    for clip_format, suffix in CLIP_MEMBER.items():
        if member == suffix or member.endswith("." + suffix):
            return clip_format
    return None


def encode_clip(frames: np.ndarray, fps: int, clip_format: str = "mp4") -> bytes:
    """`frames` (T×H×W×3 uint8) as MP4 (even width and height) or `.npy` bytes."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ClipFormatError(f"a clip is T×H×W×3 uint8 frames, got {frames.dtype} {tuple(frames.shape)}")
    if clip_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
        return buffer.getvalue()
    if clip_format != "mp4":
        raise ClipFormatError(f"unknown clip format {clip_format!r}; available: {', '.join(CLIP_FORMATS)}")
    import av

    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ClipFormatError(f"H.264 needs even frame sizes, got {width}×{height}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options=X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_clip(data: bytes, clip_format: str = "mp4") -> np.ndarray:
    """The T×H×W×3 uint8 frames of a clip written by `encode_clip`."""
    if clip_format == "npy":
        try:
            frames = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ClipFormatError(f"not a readable .npy clip: {exc}") from None
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ClipFormatError(f"a .npy clip holds T×H×W×3 uint8 frames, got {frames.dtype} {frames.shape}")
        return frames
    if clip_format != "mp4":
        raise ClipFormatError(f"unknown clip format {clip_format!r}; available: {', '.join(CLIP_FORMATS)}")
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.error.FFmpegError as exc:
        raise ClipFormatError(f"not a readable MP4 clip: {exc}") from exc
    if not frames:
        raise ClipFormatError("the MP4 holds no video frames")
    return np.stack(frames)
