"""Simulator rollouts on the Gymnasium API, cut into action-labelled clips (GAIA-1 / UniSim data).

One slot is one episode: the environment is reset with the slot's seed (and its action
space seeded from it), a policy from the recipe acts for as many steps as the clips need,
rendered headless with ``render_mode="rgb_array"``, and the episode is cut into
`clips_per_episode` clips of `clip_frames` frames every `stride` steps. Clip ``j`` of
episode ``<key>`` has key ``<key>-<j>`` and the episode as its group. An episode that ends
(crash, termination, time limit) before a clip is complete yields a rejection naming the
step and the cause for each clip it could not fill: counted, never a silent gap.

A clip's frames ``f_0 … f_{T-1}`` come with the actions ``a_t`` taken at ``f_t``, the
rewards they earned, the observations (``obs.npy``) and, for driving, the ego vehicle's
x, y, speed and heading (``ego.npy``). Same recipe, same bytes: environments, action
spaces and the clip encoder are all seeded or fixed.

Simulator packages register their environments on import; `highway_env` (the driving
default) is always imported, others are named by the operator in
``SYNTHFACTORY_GYM_PACKAGES`` (comma-separated modules), never by a recipe, which is
untrusted and may not make a worker import arbitrary code.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import io
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from synthfactory import models
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.samples import Rejection, Sample, SampleSlot, derive_seed
from synthfactory.video import CLIP_FORMATS, CLIP_MEMBER, encode_clip

#: simulator packages imported so their environments register (operators add more)
SIMULATOR_PACKAGES = ("highway_env",)
#: a string in env_kwargs shaped like a Python path (highway-env imports `other_vehicles_type`)
DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
#: the frames one episode may hold in memory (its clips' windows only)
MAX_EPISODE_FRAME_BYTES = 2 << 30
GYM_PACKAGES_VAR = "SYNTHFACTORY_GYM_PACKAGES"


class _PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomPolicy(_PolicyParams):
    """Uniform actions from the action space, seeded per episode."""

    kind: Literal["random"] = "random"


class ConstantPolicy(_PolicyParams):
    """The same action every step: for highway-env a meta-action name such as ``IDLE``
    hands control to the env's own lane-keeping controller."""

    kind: Literal["constant"]
    action: int | str | tuple[float, ...] = Field(description="action index, meta-action name, or Box vector")


class TorchPolicy(_PolicyParams):
    """A torch MLP policy (`mlp_policy`): a directory with ``config.json`` (its description,
    e.g. ``{"hidden": [64, 64]}``) and ``policy.pt`` (its state dict, loaded weights-only;
    the layer sizes are read from it); greedy, so deterministic."""

    kind: Literal["torch"]
    model: str = Field(description="local directory holding config.json and policy.pt")


Policy = Annotated[RandomPolicy | ConstantPolicy | TorchPolicy, Field(discriminator="kind")]


class RolloutParams(GeneratorParams):
    env: str = Field("highway-fast-v0", pattern=r"^[A-Za-z0-9_/.-]+-v\d+$", description="registered Gymnasium env id")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of gymnasium.make "
                                       "(highway-env takes `config`)")
    policy: Policy = Field(default_factory=RandomPolicy)
    clip_frames: int = Field(8, ge=2, le=256, description="frames per clip (T)")
    stride: int | None = Field(None, ge=1, le=4096, description="steps between clip starts; default clip_frames")
    clips_per_episode: int = Field(3, ge=1, le=256)
    fps: int | None = Field(None, ge=1, le=240, description="clip frame rate; default the env's policy or render rate")
    clip_format: Literal[CLIP_FORMATS] = Field("mp4", description="mp4 (H.264, small) or npy (lossless frames)")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _bounded(self) -> "RolloutParams":
        if self.steps_needed() > 100_000:
            raise ValueError(f"an episode would need {self.steps_needed()} steps; at most 100000")
        if len(json.dumps(self.env_kwargs, default=str)) > 10_000:
            raise ValueError("env_kwargs: at most 10000 characters")
        for value in _strings(self.env_kwargs):  # a recipe may not make a worker import code
            if DOTTED_PATH.match(value) and not value.startswith(tuple(f"{p}." for p in SIMULATOR_PACKAGES)):
                raise ValueError(f"env_kwargs: {value!r} looks like a Python path; only classes of "
                                 f"{', '.join(SIMULATOR_PACKAGES)} may be named")
        return self

    def steps_needed(self) -> int:
        return (self.clips_per_episode - 1) * (self.stride or self.clip_frames) + self.clip_frames


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


class RolloutError(models.ModelError):
    """A recipe's simulator or policy cannot work (unknown env id, wrong action): bad input."""


def _import_simulators() -> None:
    extra = [name.strip() for name in os.environ.get(GYM_PACKAGES_VAR, "").split(",") if name.strip()]
    for package in (*SIMULATOR_PACKAGES, *extra):
        importlib.import_module(package)


@models.load_once
def _make_env(env_id: str, kwargs_json: str, thread: int) -> Any:
    """One environment per worker thread and recipe, reset with each episode's seed (two
    shards in threads of one process must not step the same simulator)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")  # headless pygame rendering
    os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")  # SDL would turn SIGTERM into a quit event: a
    # worker stopped by the pool or a cancelled run would never exit
    import gymnasium as gym

    _import_simulators()
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        raise RolloutError(f"env {env_id!r} is not a registered Gymnasium environment"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return gym.make(env_id, render_mode="rgb_array", **json.loads(kwargs_json))
    except Exception as exc:  # a missing dependency, a bad config value: the recipe's to fix
        raise RolloutError(f"env {env_id} with env_kwargs {kwargs_json}: {type(exc).__name__}: {exc}") from None


def _env_version(env: Any) -> str:
    module = type(env.unwrapped).__module__.split(".")[0]
    try:
        package = f"{module} {importlib.metadata.version(module.replace('_', '-'))}"
    except importlib.metadata.PackageNotFoundError:
        package = module
    return f"{env.spec.id} ({package})"


@dataclass
class Episode:
    """What one rollout recorded; frames[t] is what the policy saw when it took actions[t]."""

    frames: dict[int, np.ndarray] = field(default_factory=dict)  # by step, inside clip windows only
    observations: dict[int, np.ndarray] = field(default_factory=dict)
    ego: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    crashed: list[bool] = field(default_factory=list)
    end: str | None = None  # why the episode stopped early: crashed, terminated, truncated

    @property
    def steps(self) -> int:
        return len(self.actions)


@GENERATORS.register("gym-rollouts")
class RolloutGenerator(Generator):
    """Action-labelled clips from Gymnasium environments (highway-env driving by default)."""

    Params = RolloutParams
    version = "1"
    code = ("synthfactory.video", "synthfactory.models")
    columns = {
        "env": pa.string(),
        "env_version": pa.string(),
        "policy": pa.string(),
        "episode": pa.string(),
        "episode_seed": pa.int64(),
        "clip": pa.int32(),
        "step_start": pa.int32(),
        "step_end": pa.int32(),
        "episode_steps": pa.int32(),
        "frames": pa.int32(),
        "fps": pa.int32(),
        "width": pa.int32(),
        "height": pa.int32(),
        "actions": pa.list_(pa.float32()),
        "clip_return": pa.float32(),
        "crashed": pa.bool_(),
        "episode_end": pa.string(),
    }
    params: RolloutParams

    def outputs_per_slot(self) -> int:
        return self.params.clips_per_episode

    def preflight(self) -> None:
        """Reset, render, act and step once, so an env, render size or policy that cannot
        work fails here (exit 2) rather than in every shard."""
        p, env = self.params, self.env()
        act = self._policy_for(env)
        try:
            observation, _ = env.reset(seed=0)
            frame = np.asarray(env.render())
            np.asarray(observation, dtype=np.float32)
            env.step(act(observation))
        except RolloutError:
            raise
        except Exception as exc:
            raise RolloutError(f"env {p.env} with policy {self.policy_name}: one step failed: "
                               f"{type(exc).__name__}: {exc}") from None
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise RolloutError(f"env {p.env} renders {frame.shape} arrays, not H×W×3 frames")
        held = frame.nbytes * p.clip_frames * p.clips_per_episode
        if held > MAX_EPISODE_FRAME_BYTES:
            raise RolloutError(f"env {p.env} renders {frame.shape[1]}×{frame.shape[0]} frames: an episode's "
                               f"{p.clips_per_episode} clips of {p.clip_frames} would hold {held >> 20} MiB; "
                               f"at most {MAX_EPISODE_FRAME_BYTES >> 20} MiB (render smaller, or fewer frames)")
        if p.clip_format == "mp4" and (frame.shape[0] % 2 or frame.shape[1] % 2):
            raise RolloutError(f"env {p.env} renders {frame.shape[1]}×{frame.shape[0]} frames; "
                               "mp4 clips need even sizes (set the render size, or clip_format: npy)")

    def env(self) -> Any:
        return _make_env(self.params.env, json.dumps(self.params.env_kwargs, sort_keys=True), threading.get_ident())

    @cached_property
    def env_version(self) -> str:
        """Looked up once: package metadata is read from disk."""
        return _env_version(self.env())

    @cached_property
    def policy_name(self) -> str:
        policy = self.params.policy
        if isinstance(policy, TorchPolicy):
            return f"torch:{policy.model}@{self._policy_model.revision}"
        if isinstance(policy, ConstantPolicy):
            return f"constant:{policy.action}"
        return "random"

    @cached_property
    def _policy_model(self) -> models.ResolvedModel:
        assert isinstance(self.params.policy, TorchPolicy)
        return models.resolve_model(self.params.policy.model, role="policy")

    @cached_property
    def fps(self) -> int:
        if self.params.fps:
            return self.params.fps
        env = self.env().unwrapped
        config = getattr(env, "config", None) or {}
        return int(config.get("policy_frequency") or env.metadata.get("render_fps") or 30)

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        env = self.env()
        act = self._policy_for(env)
        for slot in slots:
            yield from self._clips(slot, self._rollout(env, act, slot.seed))

    def _in_a_clip(self, step: int) -> bool:
        stride = self.params.stride or self.params.clip_frames
        return step % stride < self.params.clip_frames

    def _rollout(self, env: Any, act: Any, seed: int) -> Episode:
        """Step the episode; render and keep frames only where a clip will use them."""
        episode = Episode()
        observation, _ = env.reset(seed=seed)
        env.action_space.seed(derive_seed(seed, 1))
        for step in range(self.params.steps_needed()):
            if self._in_a_clip(step):
                episode.frames[step] = np.asarray(env.render(), dtype=np.uint8)
                episode.observations[step] = np.asarray(observation, dtype=np.float32)
                vehicle = getattr(env.unwrapped, "vehicle", None)
                if vehicle is not None:
                    episode.ego[step] = (*map(float, vehicle.position), float(vehicle.speed), float(vehicle.heading))
            action = act(observation)
            observation, reward, terminated, truncated, info = env.step(action)
            episode.actions.append(np.asarray(action, dtype=np.float32).reshape(-1))
            episode.rewards.append(float(reward))
            episode.crashed.append(bool(info.get("crashed", False)))
            if terminated or truncated:
                episode.end = "crashed" if episode.crashed[-1] else "terminated" if terminated else "truncated"
                break
        return episode

    def _clips(self, slot: SampleSlot, episode: Episode) -> Iterator[Sample | Rejection]:
        p = self.params
        stride, length = p.stride or p.clip_frames, p.clip_frames
        for j in range(p.clips_per_episode):
            start, stop = j * stride, j * stride + length
            clip_slot = SampleSlot(slot.index, f"{slot.key}-{j}", slot.seed)
            if stop > episode.steps:
                yield Rejection(clip_slot, f"episode {episode.end} at step {episode.steps}, before clip {j} "
                                f"(steps {start}-{stop - 1}) was complete")
                continue
            yield self._clip(clip_slot, slot, episode, j, start, stop)

    def _clip(self, clip_slot: SampleSlot, slot: SampleSlot, episode: Episode, j: int, start: int, stop: int) -> Sample:
        p = self.params
        window = range(start, stop)
        frames = np.stack([episode.frames[t] for t in window])
        actions = np.stack(episode.actions[start:stop])
        rewards = np.asarray(episode.rewards[start:stop], dtype=np.float32)
        crashed = any(episode.crashed[start:stop])
        height, width = frames.shape[1:3]
        columns = {
            "env": p.env,
            "env_version": self.env_version,
            "policy": self.policy_name,
            "episode": slot.key,
            "episode_seed": slot.seed,
            "clip": j,
            "step_start": start,
            "step_end": stop - 1,
            "episode_steps": episode.steps,
            "frames": len(frames),
            "fps": self.fps,
            "width": width,
            "height": height,
            "actions": actions.reshape(-1).tolist(),
            "clip_return": float(rewards.sum()),
            "crashed": crashed,
            "episode_end": episode.end or "",  # how the whole episode ended, on each of its clips
        }
        caption = (f"{p.env} rollout, {self.policy_name} policy, episode {slot.key} steps {start}-{stop - 1}"
                   + (", ends in a crash" if crashed else ""))
        files = {
            CLIP_MEMBER[p.clip_format]: encode_clip(frames, self.fps, p.clip_format),
            "actions.npy": _npy(actions),
            "rewards.npy": _npy(rewards),
            "obs.npy": _npy(np.stack([episode.observations[t] for t in window])),
            "json": json.dumps({**columns, "key": clip_slot.key, "caption": caption}, sort_keys=True).encode(),
            "txt": caption.encode(),
        }
        if episode.ego:
            files["ego.npy"] = _npy(np.asarray([episode.ego[t] for t in window], dtype=np.float32))
        return Sample(clip_slot, caption, files, payload=CLIP_MEMBER[p.clip_format], columns=columns, group=slot.key)

    def _policy_for(self, env: Any) -> Any:
        """observation -> action, for the recipe's policy on this env's action space."""
        policy, space = self.params.policy, env.action_space
        if isinstance(policy, RandomPolicy):  # the env's current space: some envs rebuild it on reset
            return lambda observation: env.action_space.sample()
        if isinstance(policy, ConstantPolicy):
            action = self._named_action(env, policy.action)
            if not space.contains(action):
                raise RolloutError(f"policy.action {policy.action!r} is not in env {self.params.env}'s action space {space}")
            return lambda observation: action
        return _torch_policy(self._policy_model, space)

    def _named_action(self, env: Any, action: int | str | tuple[float, ...]) -> Any:
        if isinstance(action, str):
            names = getattr(getattr(env.unwrapped, "action_type", None), "actions_indexes", None)
            if not names or action not in names:
                known = ", ".join(names) if names else "none (this env's actions are not named)"
                raise RolloutError(f"policy.action {action!r}: unknown action name; env {self.params.env} has: {known}")
            return np.int64(names[action])
        if isinstance(action, int):
            return np.int64(action)
        return np.asarray(action, dtype=env.action_space.dtype)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _torch_policy(model: models.ResolvedModel, space: Any) -> Any:
    """A greedy MLP policy from ``config.json`` + ``policy.pt`` (weights only)."""
    import torch
    from gymnasium import spaces

    try:  # the layer sizes come from the weights themselves, which are bounded by the file
        state = torch.load(model.path / "policy.pt", map_location="cpu", weights_only=True)
        shapes = [state[f"{2 * i}.weight"].shape for i in range(len(state) // 2)]
        network = mlp_policy(shapes[0][1], [rows for rows, _ in shapes[:-1]], _action_outputs(space))
        network.load_state_dict(state)
    except Exception as exc:
        raise RolloutError(f"policy.model {model.id!r}: not an MLP policy directory (config.json + policy.pt "
                           f"as mlp_policy writes it): {type(exc).__name__}: {exc}") from None
    network.eval()

    def act(observation: Any) -> Any:
        with torch.no_grad():
            out = network(torch.as_tensor(np.asarray(observation, dtype=np.float32).reshape(1, -1)))[0]
        if isinstance(space, spaces.Discrete):
            return np.int64(int(out.argmax()) + int(space.start))
        low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
        return (low + (torch.tanh(out) + 1) / 2 * (high - low)).numpy().astype(space.dtype)

    return act


def _action_outputs(space: Any) -> int:
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape))
    raise RolloutError(f"a torch policy acts in Discrete or Box action spaces, not {space}")


def mlp_policy(inputs: int, hidden: Sequence[int], outputs: int) -> Any:
    """The policy network a torch policy directory holds (also what examples train)."""
    import torch

    layers: list[Any] = []
    for width in hidden:
        layers += [torch.nn.Linear(inputs, width), torch.nn.Tanh()]
        inputs = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(inputs, outputs))
