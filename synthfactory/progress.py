"""Rich progress display for a release run: shards done, samples/s, ETA."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ShardProgress:
    def __init__(self, dataset: str, shards: int, console: Console | None = None) -> None:
        self.samples_done = 0
        self._started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(f"generate {dataset}", total=shards, rate="")

    def shard_done(self, samples: int) -> None:
        self.samples_done += samples
        rate = self.samples_done / max(1e-9, time.perf_counter() - self._started)
        self._progress.update(self._task, advance=1, rate=f"{rate:,.0f} samples/s")

    def __enter__(self) -> "ShardProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
