"""Clip checks on planted faults: frozen and flickering clips refused, near-duplicate
clips found (the first kept), the rollout mix measured against its limits, real
highway-env clips passing, and the report showing a clip as a filmstrip."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from synthfactory.checks import CHECKS, DatasetView, Findings
from synthfactory.release.report import _filmstrip, _grid, _reason_kind
from synthfactory.samples import Sample, SampleSlot, slot_for
from synthfactory.shards import SHARDS_DIR, write_tar
from synthfactory.video import encode_clip

FPS = 15


def moving_clip(seed: int, frames: int = 8, size: int = 64) -> np.ndarray:
    """A bright square crossing a smooth random background (pHash-distinct per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 200, (6, 6, 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    clip = np.repeat(background[None], frames, axis=0).copy()
    row = int(rng.integers(4, size - 16))
    for t in range(frames):
        clip[t, row : row + 12, 2 + 5 * t : 14 + 5 * t] = 255
    return clip


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def clip_sample(i: int, frames: np.ndarray, clip_format: str = "mp4", episode: str | None = None) -> Sample:
    """A sample with the members and columns gym-rollouts writes."""
    key = f"{i:010d}-0"
    member = {"mp4": "mp4", "npy": "frames.npy"}[clip_format]
    actions = np.zeros((len(frames), 1), dtype=np.float32)
    columns = {"episode": episode or f"{i:010d}", "clip": 0, "frames": len(frames), "fps": FPS,
               "actions": actions.ravel().tolist(), "crashed": False, "episode_end": ""}
    files = {
        member: encode_clip(frames, FPS, clip_format),
        "actions.npy": npy(actions),
        "rewards.npy": npy(np.zeros(len(frames), dtype=np.float32)),
        "obs.npy": npy(np.zeros((len(frames), 4), dtype=np.float32)),
        "json": json.dumps({**columns, "key": key}).encode(),
        "txt": f"clip {key}".encode(),
    }
    return Sample(SampleSlot(i, key, i), f"clip {key}", files, payload=member, columns=columns, group=columns["episode"])


def failing(findings: Findings) -> list[str]:
    """The metrics outside their limits, as the gate would judge them."""
    return sorted(
        name for name, (low, high) in findings.limits.items()
        if (low is not None and findings.metrics[name] < low) or (high is not None and findings.metrics[name] > high)
    )


@pytest.mark.parametrize("clip_format", ["mp4", "npy"])
def test_frozen_and_flickering_clips_are_refused_moving_ones_kept(clip_format):
    motion = CHECKS.get("clip-motion").from_params({})
    moving = [moving_clip(seed) for seed in range(3)]
    frozen = np.repeat(moving_clip(10)[:1], 8, axis=0)
    flicker = moving_clip(11).copy()
    flicker[1::2] = (flicker[1::2] * 0.3).astype(np.uint8)  # every other frame dark
    samples = [clip_sample(i, f, clip_format) for i, f in enumerate([*moving, frozen, flicker])]

    verdicts = motion.check(samples)

    for verdict in verdicts[:3]:
        assert verdict.reason is None
        assert verdict.columns["motion"] > 0.003 and verdict.columns["frozen_fraction"] == 0
        assert verdict.columns["flicker"] < 0.005
    assert verdicts[3].reason == "frozen clip: 7 of 7 frame pairs unchanged"
    assert verdicts[3].columns["motion"] < 0.001 and verdicts[3].columns["frozen_fraction"] == 1
    assert verdicts[4].reason.startswith("flickering clip: ")
    assert [_reason_kind(v.reason) for v in verdicts[3:]] == ["frozen clip", "flickering clip"]  # report rows
    assert verdicts[4].columns["flicker"] > 0.1
    assert set(motion.columns) == {"motion", "frozen_fraction", "flicker"}


def test_clip_motion_limits_are_params_and_images_pass_untouched():
    lenient = CHECKS.get("clip-motion").from_params({"max_frozen_fraction": 1.0, "max_flicker": None})
    half_frozen = np.concatenate([moving_clip(1)[:4], np.repeat(moving_clip(1)[4:5], 4, axis=0)])
    flicker = moving_clip(2).copy()
    flicker[1::2] = 0
    image = Sample(SampleSlot(9, "0000000009", 9), "a picture", {"png": b"\x89PNG"}, "png")
    verdicts = lenient.check([clip_sample(0, half_frozen), clip_sample(1, flicker), image])
    assert [v.reason for v in verdicts] == [None, None, None]
    assert verdicts[0].columns["frozen_fraction"] == pytest.approx(3 / 7, abs=1e-3)
    assert verdicts[2].columns == {}
    strict = CHECKS.get("clip-motion").from_params({})
    assert strict.check([clip_sample(0, half_frozen)])[0].reason is None  # 3 of 7 < half
    broken = clip_sample(3, moving_clip(3))
    broken.files["mp4"] = b"not an mp4"
    assert strict.check([broken])[0].reason.startswith("unreadable clip: ")


def dedup_view(check, samples: list[Sample]) -> DatasetView:
    verdicts = check.check(samples)
    return DatasetView(pa.table({
        "key": [s.slot.key for s in samples],
        "frame_hashes": pa.array([v.columns.get("frame_hashes") for v in verdicts], pa.list_(pa.string())),
    }))


def test_clip_dedup_finds_reencoded_and_noisy_copies_and_keeps_the_original():
    dedup = CHECKS.get("clip-dedup").from_params({})
    originals = [moving_clip(seed) for seed in range(12)]
    rng = np.random.default_rng(0)
    noisy = np.clip(originals[5].astype(np.int16) + rng.integers(-3, 4, originals[5].shape), 0, 255).astype(np.uint8)
    samples = [clip_sample(i, frames) for i, frames in enumerate(originals)]
    samples += [clip_sample(12, originals[2], "npy"), clip_sample(13, noisy)]  # same frames as npy; noisy copy
    # listed out of key order: the earlier key is kept whatever the manifest order
    samples = [samples[13], *samples[:13]]

    findings = dedup.evaluate(dedup_view(dedup, samples), None)

    assert set(findings.rejected) == {"0000000012-0", "0000000013-0"}, findings.rejected
    assert findings.rejected["0000000012-0"].startswith("near-duplicate clip of 0000000002-0 (pHash Hamming ")
    assert findings.rejected["0000000013-0"].startswith("near-duplicate clip of 0000000005-0 (pHash Hamming ")
    assert _reason_kind(findings.rejected["0000000013-0"]) == "near-duplicate clip"
    assert findings.metrics == {"duplicates": 2, "duplicate_rate": round(2 / 14, 4)}
    assert failing(findings) == ["duplicate_rate"]  # 14% > 5%


def test_clip_dedup_needs_every_hashed_frame_close_and_groups_exact_repeats():
    dedup = CHECKS.get("clip-dedup").from_params({"max_duplicate_rate": 0.5})
    clip = moving_clip(1)
    same_start = clip.copy()
    same_start[4:] = moving_clip(2)[4:]  # first frame shared, middle and last not
    frozen = np.repeat(moving_clip(3)[:1], 8, axis=0)
    samples = [clip_sample(0, clip), clip_sample(1, same_start)] + [clip_sample(2 + i, frozen) for i in range(4)]
    findings = dedup.evaluate(dedup_view(dedup, samples), None)
    assert findings.rejected == {f"{i:010d}-0": "near-duplicate clip of 0000000002-0 (pHash Hamming 0)" for i in (3, 4, 5)}
    assert failing(findings) == []
    assert dedup.evaluate(DatasetView(pa.table({"key": ["a"]})), None).notes  # no clips: a note, no figures


def rollout_manifest() -> pa.Table:
    """Four episodes: e0 clean (8 steps), e1 crashes in its clip (5), e2 ends in a crash
    flagged only by episode_end (20), e3 clean (11). Actions: 0 x6, 1 x3, 2 x3."""
    rows = [  # episode, episode_steps, actions, crashed, episode_end
        ("e0", 8, [0, 0, 1], False, ""),
        ("e0", 8, [0, 2, 1], False, ""),
        ("e1", 5, [0, 0], True, "crashed"),
        ("e2", 20, [2, 2], False, "crashed"),
        ("e3", 11, [1, 0], False, "truncated"),
    ]
    episode, steps, actions, crashed, end = zip(*rows)
    return pa.table({
        "key": [f"{i:010d}" for i in range(len(rows))],
        "episode": list(episode),
        "episode_steps": pa.array(steps, pa.int32()),
        "actions": pa.array([[float(a) for a in acts] for acts in actions], pa.list_(pa.float32())),
        "crashed": list(crashed),
        "episode_end": list(end),
    })


def test_rollout_stats_measures_the_mix_and_fails_outside_its_limits():
    manifest = DatasetView(rollout_manifest())
    kl = 0.5 * math.log(0.5 / (1 / 3)) + 2 * 0.25 * math.log(0.25 / (1 / 3))  # shares .5/.25/.25 vs uniform

    relaxed = CHECKS.get("rollout-stats").from_params({"actions": 3}).evaluate(manifest, None)
    assert relaxed.metrics == {"unexpected_actions": 0, "action_kl": pytest.approx(kl, abs=1e-5), "episodes": 4,
                               "mean_episode_steps": 11.0, "crash_rate": 0.5}
    assert failing(relaxed) == []  # default max_action_kl 0.1 > 0.0589, the rest open
    assert set(relaxed.limits) == {"unexpected_actions", "action_kl"}

    strict = CHECKS.get("rollout-stats").from_params({
        "actions": 3, "max_action_kl": 0.05, "max_crash_rate": 0.25, "min_mean_episode_steps": 12,
    }).evaluate(manifest, None)
    assert failing(strict) == ["action_kl", "crash_rate", "mean_episode_steps"]
    assert strict.limits["mean_episode_steps"] == (12, None)

    # a target that matches the mix; a fourth action the recipe did not expect
    matched = CHECKS.get("rollout-stats").from_params({"action_target": {0: 2, 1: 1, 2: 1}}).evaluate(manifest, None)
    assert matched.metrics["action_kl"] == 0
    two = CHECKS.get("rollout-stats").from_params({"actions": 2}).evaluate(manifest, None)
    assert two.metrics["unexpected_actions"] == 1 and "unexpected_actions" in failing(two)


def test_rollout_stats_skips_what_is_absent():
    check = CHECKS.get("rollout-stats").from_params({})
    empty = check.evaluate(DatasetView(pa.table({"key": ["a"]})), None)
    assert empty.metrics == {} and len(empty.notes) == 2
    continuous = pa.table({"key": ["a"], "actions": pa.array([[0.25, -0.5]], pa.list_(pa.float32()))})
    assert check.evaluate(DatasetView(continuous), None).notes[0] == "actions are continuous: no action KL"
    with pytest.raises(ValueError, match="positive share"):
        CHECKS.get("rollout-stats").from_params({"action_target": {0: 0}})


def test_real_highway_clips_move_and_the_report_shows_them_as_filmstrips(tmp_path):
    from synthfactory.generators.rollouts import RolloutGenerator

    generator = RolloutGenerator.from_params({"env_kwargs": {"config": {"screen_width": 64, "screen_height": 32}},
                                              "clip_frames": 4, "clips_per_episode": 2})
    clips = [item for item in generator.generate([slot_for(0, i) for i in range(3)]) if isinstance(item, Sample)]
    assert clips, "every episode ended before its first clip"
    verdicts = CHECKS.get("clip-motion").from_params({}).check(clips)
    assert [v.reason for v in verdicts] == [None] * len(clips)
    assert all(v.columns["motion"] > 0.001 for v in verdicts)

    long = clip_sample(9, np.concatenate([moving_clip(s) for s in range(3)]), "npy")  # 24 frames -> 8 shown
    write_tar(tmp_path / SHARDS_DIR / "clips-000000.tar", [clips[0], long])
    manifest = pa.table({"key": [clips[0].slot.key, long.slot.key], "caption": [clips[0].caption, long.caption]})
    page = _grid(tmp_path, manifest)
    strips = re.findall(r'<figure class=clip><img alt="filmstrip" src="data:image/png;base64,([^"]+)">', page)
    sizes = [Image.open(io.BytesIO(base64.b64decode(strip))).size for strip in strips]
    assert sizes == [(4 * 64, 32), (8 * 64, 64)]  # frames side by side, small enough to stay unscaled
    assert clips[0].caption in page
    assert _filmstrip(b"junk", "mp4") is None
