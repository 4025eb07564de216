"""The rollout set as a whole: action mix against the target, episode lengths, crash rate.

A world model or policy learns the dynamics its data shows: a rollout set whose actions
are skewed, whose episodes end early, or that crashes more than the recipe allows
teaches the wrong world. Each figure goes to metrics.json; a limit the recipe sets gates
it. Figures cover the released clips' episodes (an episode that ended before its first
clip was complete is a counted rejection, not a row here).
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from synthfactory.checks.base import CHECKS, CheckParams, DatasetCheck, DatasetView, Findings, PreviousRelease
from synthfactory.quality import diversity as dv


class RolloutStatsParams(CheckParams):
    actions: int | None = Field(
        None, ge=1, le=4096, description="number of discrete actions (0 … n-1): the target is uniform over them; "
        "default: uniform over the action values observed")
    action_target: dict[int, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="target share per discrete action value (weights, normalised); overrides `actions`")
    max_action_kl: float | None = Field(
        0.1, ge=0, description="largest KL(observed actions || target) in nats; null: measure only")
    min_mean_episode_steps: float | None = Field(None, ge=0, description="floor on the mean episode length (steps)")
    max_mean_episode_steps: float | None = Field(None, ge=0, description="ceiling on the mean episode length (steps)")
    max_crash_rate: float | None = Field(
        None, ge=0, le=1, description="largest share of episodes with a crash (driving); null: measure only")

    @model_validator(mode="after")
    def _some_target(self) -> "RolloutStatsParams":
        if self.action_target is not None and not any(self.action_target.values()):
            raise ValueError("action_target: at least one action needs a positive share")
        return self


@CHECKS.register("rollout-stats")
class RolloutStats(DatasetCheck):
    """The rollout set as a whole: action mix, episode length and crash rate."""

    Params = RolloutStatsParams
    version = "1"
    code = ("synthfactory.quality.diversity",)
    params: RolloutStatsParams

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        findings = Findings(metrics={})
        names = data.manifest.column_names
        if "actions" in names:
            self._actions(data.manifest, findings)
        else:
            findings.notes.append("no actions column: action mix skipped")
        if "episode" in names and "episode_steps" in names:
            self._episodes(data.manifest, findings)
        else:
            findings.notes.append("no episode / episode_steps columns: episode figures skipped")
        return findings

    def _actions(self, manifest: pa.Table, findings: Findings) -> None:
        p = self.params
        values = pc.list_flatten(manifest.column("actions")).to_numpy(zero_copy_only=False)
        values = values[~np.isnan(values)] if len(values) else values
        if not len(values):
            findings.notes.append("no actions recorded: action mix skipped")
            return
        if not np.all(values == np.round(values)):
            findings.notes.append("actions are continuous: no action KL")
            return
        counts = Counter(int(v) for v in values.astype(np.int64).tolist())
        explicit = p.action_target is not None or p.actions is not None
        target = (p.action_target if p.action_target is not None
                  else dict.fromkeys(range(p.actions), 1.0) if p.actions is not None
                  else dict.fromkeys(counts, 1.0))
        unexpected = sorted(a for a in counts if target.get(a, 0) <= 0)
        if explicit:
            findings.metrics["unexpected_actions"] = len(unexpected)
            findings.limits["unexpected_actions"] = (None, 0)
        if unexpected:
            findings.notes.append(f"actions outside the target: {', '.join(map(str, unexpected[:5]))}")
        judged = {a: n for a, n in counts.items() if a not in unexpected}
        if any(judged.values()):
            findings.metrics["action_kl"] = round(dv.kl_divergence(judged, target), 5)
            if p.max_action_kl is not None:
                findings.limits["action_kl"] = (None, p.max_action_kl)

    def _episodes(self, manifest: pa.Table, findings: Findings) -> None:
        """One value per episode: its length, and whether any of its clips saw a crash."""
        p = self.params
        crashed = pa.array([False] * manifest.num_rows)
        if "crashed" in manifest.column_names:
            crashed = pc.or_(crashed, pc.fill_null(manifest.column("crashed"), False))
        if "episode_end" in manifest.column_names:
            crashed = pc.or_(crashed, pc.fill_null(pc.equal(manifest.column("episode_end"), "crashed"), False))
        episodes = (pa.table({"episode": manifest.column("episode"), "steps": manifest.column("episode_steps"),
                              "crashed": crashed})
                    .group_by("episode").aggregate([("steps", "max"), ("crashed", "any")]))
        if not episodes.num_rows:
            findings.notes.append("no episodes")
            return
        findings.metrics["episodes"] = episodes.num_rows
        findings.metrics["mean_episode_steps"] = round(pc.mean(episodes.column("steps_max")).as_py(), 3)
        findings.metrics["crash_rate"] = round(pc.mean(pc.cast(episodes.column("crashed_any"), pa.float64())).as_py(), 4)
        if (p.min_mean_episode_steps, p.max_mean_episode_steps) != (None, None):
            findings.limits["mean_episode_steps"] = (p.min_mean_episode_steps, p.max_mean_episode_steps)
        if p.max_crash_rate is not None:
            findings.limits["crash_rate"] = (None, p.max_crash_rate)
