"""What a run did and what the dataset checks found, as values passed between the steps:
to the gate, into metrics.json, the report, the Prefect artifacts and the CLI's summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from synthfactory.release.build import ShardResult
from synthfactory.usage import add_usage

#: (check_metric, min, max): a dataset-level figure the gate holds the release to
Limit = tuple[str, float | None, float | None]


@dataclass(frozen=True)
class RunStats:
    """How the shards were produced, as reported to the user and in metrics.json."""

    seconds: float  # wall time of the shard fan-out
    retries: int
    shards_generated: int
    shards_reused: int  # found finished in the shard cache (resumed or unchanged)
    worker_seconds: float  # generation time summed over shards
    worker_cpu_seconds: float  # the workers' CPU time for the shards made in this run
    worker_processes: int  # distinct processes that ran shards (scale-out at work)
    device_seconds: dict[str, float]  # generation time on accelerators, per device
    usage: dict[str, float] = field(default_factory=dict)  # requests, tokens, ... of every shard the release holds
    usage_this_run: dict[str, float] = field(default_factory=dict)  # of the shards made in this run only

    @classmethod
    def of(cls, results: list[ShardResult], seconds: float) -> RunStats:
        device_seconds: dict[str, float] = {}
        for r in results:
            if r.device != "cpu":
                device_seconds[r.device] = round(device_seconds.get(r.device, 0.0) + r.seconds, 3)
        return cls(
            seconds=round(seconds, 3),
            retries=sum(r.attempt - 1 for r in results),
            shards_generated=sum(not r.reused for r in results),
            shards_reused=sum(r.reused for r in results),
            worker_seconds=round(sum(r.seconds for r in results), 3),
            worker_cpu_seconds=round(sum(r.cpu_seconds for r in results), 3),
            worker_processes=len({r.worker for r in results}),
            device_seconds=device_seconds,
            usage=add_usage(r.usage for r in results),
            usage_this_run=add_usage(r.usage for r in results if not r.reused),
        )

    def as_dict(self, samples: int) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": round(samples / self.seconds, 1) if self.seconds else None}


@dataclass(frozen=True)
class Quality:
    """What the dataset-level checks found: figures for metrics.json and the report, the
    limits the gate enforces, and the previous release they were compared with."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # check -> metric -> value
    limits: tuple[Limit, ...] = ()
    notes: tuple[str, ...] = ()
    previous: str | None = None  # the previous release's tag
    previous_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Staged:
    """A release staged in the work dir, before the gate: its figures and the checks' verdict."""

    metrics: dict[str, Any]  # what metrics.json will hold (without the gate's verdict)
    quality: Quality


@dataclass
class RunSummary:
    """The outcome of one run, returned by the flow and printed by the CLI."""

    dataset: str
    registry: str
    release_dir: str
    samples: int = 0
    rejected: int = 0
    rejected_by: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    shards_generated: int = 0
    shards_reused: int = 0
    samples_per_s: float | None = None
    tag: str | None = None  # the release made, None when only staged
    store: str = ""  # where it was pushed ("s3://bucket/prefix at endpoint")
    commit: str | None = None
    push_retries: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    up_to_date: bool = False  # skipped: the latest release has these inputs (then `tag` is it)
    expectations: int = 0  # the gate's expectations, all met (a failed gate raises)
    report_url: str = ""  # a browser link to the pushed HTML report (presigned, expires)
    report_expires: str = ""
    usage: str = ""  # what the release used and cost, in words (empty when it called no model)

    def pull_commands(self) -> list[str]:
        """How a user gets the release this run made or found current (none when only staged)."""
        if not self.tag:
            return []
        return [f"synthfactory pull {self.tag} --registry {self.registry}",
                f"dvc get {self.registry} data/{self.dataset} --rev {self.tag}"]

    def run_name(self) -> str:
        """What the run is called once it ends: the dataset, what it made, how many samples."""
        if self.up_to_date:
            return f"{self.dataset}: skipped ({self.tag} is current)"
        return f"{self.tag or self.dataset + ' (staged, not published)'} · {self.samples:,} samples"
