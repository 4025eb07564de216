"""Simulator rollouts: deterministic clips, the policies, errors that name the field, and the
clip format through the loader, `webdataset` and Hugging Face `datasets`."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthfactory.generators.rollouts import RolloutGenerator, mlp_policy
from synthfactory.models import ModelError
from synthfactory.samples import Rejection, Sample, slot_for
from synthfactory.video import decode_clip

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"env_kwargs": {"config": {"screen_width": 64, "screen_height": 32}}, "clip_frames": 4, "clips_per_episode": 2}


def clips(params: dict, indices: range | list[int], seed: int = 7) -> list[Sample | Rejection]:
    return list(RolloutGenerator.from_params(params).generate([slot_for(seed, i) for i in indices]))


def digests(items: list[Sample | Rejection]) -> list[str]:
    return [
        f"{item.slot.key} rejected: {item.reason}" if isinstance(item, Rejection)
        else f"{item.slot.key} " + hashlib.sha256(b"".join(item.files[m] for m in sorted(item.files))).hexdigest()
        for item in items
    ]


def test_same_recipe_same_bytes_in_any_process_batch_and_order() -> None:
    together = digests(clips(SMALL, range(4)))
    assert len(together) == 8 and any(not line.split(" ", 1)[1].startswith("rejected") for line in together)
    alone = digests(clips(SMALL, [3]) + clips(SMALL, [1]))  # the env is reused; reset(seed) must be enough
    assert alone == together[6:8] + together[2:4]
    script = ("import json, sys; sys.path.insert(0, 'tests'); from test_rollouts import SMALL, clips, digests; "
              "print(json.dumps(digests(clips(SMALL, range(4)))))")
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(other.stdout.splitlines()[-1]) == together
    assert digests(clips(SMALL, range(4), seed=8)) != together


def test_a_clip_holds_its_frames_actions_and_state() -> None:
    sample = next(c for c in clips({**SMALL, "clip_format": "npy"}, range(6)) if isinstance(c, Sample))
    frames = decode_clip(sample.files["frames.npy"], "npy")
    assert frames.shape == (4, 32, 64, 3) and frames.dtype == np.uint8
    actions = np.load(io.BytesIO(sample.files["actions.npy"]))
    assert actions.shape == (4, 1) and set(actions.ravel()) <= {0, 1, 2, 3, 4}
    assert sample.columns["actions"] == actions.ravel().tolist()
    ego = np.load(io.BytesIO(sample.files["ego.npy"]))
    assert ego.shape == (4, 4)  # x, y, speed, heading of the ego vehicle
    meta = json.loads(sample.files["json"])
    assert meta["env"] == "highway-fast-v0" and "highway_env" in meta["env_version"]
    assert (meta["step_start"], meta["step_end"], meta["frames"]) == (0, 3, 4)
    assert sample.group == meta["episode"] == sample.slot.key.split("-")[0]
    # the same clip as H.264: small, and close to the lossless frames
    mp4 = next(c for c in clips(SMALL, [sample.slot.index]) if c.slot.key == sample.slot.key)
    assert len(mp4.files["mp4"]) < len(sample.files["frames.npy"]) / 4
    assert np.abs(decode_clip(mp4.files["mp4"]).astype(int) - frames).mean() < 4


def test_an_episode_cut_short_rejects_the_clips_it_could_not_fill() -> None:
    items = clips({**SMALL, "clip_frames": 10, "clips_per_episode": 3}, range(6))
    rejected = [item for item in items if isinstance(item, Rejection)]
    assert rejected, "random driving crashes within 30 steps in some of 6 episodes"
    assert all("episode crashed at step" in r.reason or "truncated" in r.reason for r in rejected)
    assert len(items) == 18  # every clip slot is accounted for: a clip or a rejection


def test_constant_and_torch_policies(tmp_path: Path) -> None:
    idle = [c for c in clips({**SMALL, "policy": {"kind": "constant", "action": "IDLE"}}, range(3)) if isinstance(c, Sample)]
    assert idle and all(set(c.columns["actions"]) == {1.0} for c in idle)
    torch.manual_seed(0)
    network = mlp_policy(25, [16], 5)
    torch.save(network.state_dict(), tmp_path / "policy.pt")
    (tmp_path / "config.json").write_text(json.dumps({"hidden": [16]}))
    params = {**SMALL, "policy": {"kind": "torch", "model": str(tmp_path)}}
    first = clips(params, range(3))
    assert digests(first) == digests(clips(params, range(3)))
    sample = next(c for c in first if isinstance(c, Sample))
    assert sample.columns["policy"].startswith(f"torch:{tmp_path}@sha256:")
    observation = np.load(io.BytesIO(sample.files["obs.npy"]))[0]
    greedy = int(network(torch.as_tensor(observation.reshape(1, -1))).argmax())
    assert sample.columns["actions"][0] == greedy


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"env": "highwy-fast-v0"}, r"env 'highwy-fast-v0' is not a registered Gymnasium environment; did you mean highway-fast-v0"),
        ({"policy": {"kind": "constant", "action": "BRAKE"}}, r"policy.action 'BRAKE': unknown action name; .* IDLE"),
        ({"policy": {"kind": "constant", "action": 9}}, r"policy.action 9 is not in env highway-fast-v0's action space"),
        ({"env_kwargs": {"config": {"screen_width": 63, "screen_height": 32}}}, r"renders 63×32 frames; mp4 clips need even sizes"),
        ({"policy": {"kind": "torch", "model": "/nonexistent/policy"}}, r"policy model '/nonexistent/policy': no such directory"),
        ({"env_kwargs": {"config": "not a dict"}}, r"env highway-fast-v0 with env_kwargs .*: ValueError"),
        ({"env_kwargs": {"config": {"screen_width": 2048, "screen_height": 2048}}, "clip_frames": 200},
         r"renders 2048×2048 frames: an episode's 2 clips of 200 would hold 4800 MiB; at most 2048 MiB"),
    ],
)
def test_bad_simulator_inputs_fail_before_any_shard(params: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):  # ModelError: the CLI exits 2 with this line
        RolloutGenerator.from_params({**SMALL, **params}).preflight()


def test_a_recipe_cannot_make_a_worker_import_code() -> None:
    """highway-env imports the class its config names (`other_vehicles_type`)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"env_kwargs: 'this.s' looks like a Python path"):
        RolloutGenerator.Params.model_validate({**SMALL, "env_kwargs": {"config": {"other_vehicles_type": "this.s"}}})
    allowed = {"config": {**SMALL["env_kwargs"]["config"], "other_vehicles_type": "highway_env.vehicle.behavior.IDMVehicle"}}
    RolloutGenerator.from_params({**SMALL, "env_kwargs": allowed}).preflight()


def test_shards_in_threads_of_one_worker_do_not_share_a_simulator() -> None:
    """The thread runner runs two shards in one process at once: each needs its own env."""
    from concurrent.futures import ThreadPoolExecutor

    alone = digests(clips(SMALL, range(6)))
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: digests(clips(SMALL, part)), [range(0, 3), range(3, 6)]))
    assert halves[0] + halves[1] == alone


def test_a_worker_that_rendered_still_stops_on_sigterm() -> None:
    """SDL's default signal handlers swallow SIGTERM; a pool or a cancelled run sends it."""
    import signal
    import time

    script = ("import sys, time; sys.path.insert(0, 'tests'); from test_rollouts import SMALL, clips; "
              "clips(SMALL, [0]); print('rendered', flush=True); time.sleep(120)")
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "rendered"
        worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.returncode == -signal.SIGTERM
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.slow
def test_driving_release_publishes_and_reads_through_loader_webdataset_and_hf_datasets(tmp_path, storage_env, prefect):
    """recipes/driving.yaml through the real flow and DVC publish, then read three ways."""
    import datasets
    import webdataset as wds

    from flows.release import run_release
    from synthfactory.loader import load
    from synthfactory.shards import read_manifest

    registry = tmp_path / "registry"
    summary = run_release(str(ROOT / "recipes/driving.yaml"), str(registry), samples=6,
                          overrides=["shard_size=3", "validation.min_accept_rate=0.1"])
    assert summary.tag == "driving@v1"
    release = registry / "data" / "driving"
    manifest = read_manifest(release)
    for column in ("env", "policy", "episode", "step_start", "frames", "fps", "width", "height", "actions", "crashed",
                   "motion", "frame_hashes"):
        assert column in manifest.column_names
    rows = manifest.num_rows
    assert rows >= 1 and summary.samples == rows and summary.rejected == 12 - rows

    clips_read = list(load("driving", version=1, registry=registry, fields=["mp4", "actions.npy", "json"],
                           shuffle=False, cache_dir=tmp_path / "cache"))  # streamed out of S3
    assert len(clips_read) == rows
    for clip in clips_read:
        assert clip["mp4"].dtype == torch.uint8 and tuple(clip["mp4"].shape) == (8, 3, 64, 128)  # T×C×H×W
        assert tuple(clip["actions.npy"].shape) == (8, 1)
        assert clip["json"]["key"] == clip["__key__"]

    urls = sorted(glob.glob(str(release / "shards" / "*.tar")))
    via_wds = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in via_wds) == sorted(c["__key__"] for c in clips_read)
    assert via_wds[0]["actions.npy"].shape == (8, 1) and decode_clip(via_wds[0]["mp4"]).shape == (8, 64, 128, 3)

    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf"))
    hf = hf.cast_column("mp4", datasets.Video(decode=False))  # decoding needs torchcodec; the bytes are plain MP4
    assert len(hf) == rows
    assert decode_clip(hf[0]["mp4"]["bytes"]).shape == (8, 64, 128, 3)
    assert np.asarray(hf[0]["actions.npy"]).shape == (8, 1)
