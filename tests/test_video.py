"""The clip encoding: same frames, same bytes, whatever the process encoded before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from synthfactory.video import ClipFormatError, decode_clip, encode_clip

#: four 32×64 frames of a tiny random video model's output: with x264's macroblock-tree
#: rate control on, their bytes varied with what had been encoded before in the process
MBTREE_CLIP = Path(__file__).parent / "data" / "mbtree_clip.npy"


def test_the_same_frames_encode_to_the_same_bytes_between_other_encodes() -> None:
    clip = np.load(MBTREE_CLIP)
    noise = np.random.default_rng(1)
    seen = set()
    for i in range(60):
        if i % 3 == 0:
            encode_clip(noise.integers(0, 255, (2, 32, 64, 3), dtype=np.uint8), 1)
        elif i % 3 == 1:
            encode_clip(noise.integers(0, 255, (4, 32, 48, 3), dtype=np.uint8), 5)
        seen.add(hashlib.sha256(encode_clip(clip, 1)).hexdigest())
    assert len(seen) == 1


def test_clips_round_trip() -> None:
    clip = np.load(MBTREE_CLIP)
    assert np.array_equal(decode_clip(encode_clip(clip, 5, "npy"), "npy"), clip)
    decoded = decode_clip(encode_clip(clip, 5))
    assert decoded.shape == clip.shape and decoded.dtype == np.uint8


@pytest.mark.parametrize(("frames", "message"), [
    (np.zeros((4, 31, 64, 3), np.uint8), "H.264 needs even frame sizes, got 64×31"),
    (np.zeros((4, 32, 64), np.uint8), "a clip is T×H×W×3 uint8 frames"),
    (np.zeros((4, 32, 64, 3), np.float32), "a clip is T×H×W×3 uint8 frames"),
])
def test_frames_it_cannot_write_are_refused(frames: np.ndarray, message: str) -> None:
    with pytest.raises(ClipFormatError, match=message):
        encode_clip(frames, 5)


def test_bytes_that_are_not_a_clip_are_refused() -> None:
    with pytest.raises(ClipFormatError, match="not a readable MP4 clip"):
        decode_clip(b"not a video")
