"""The live feed of a run in progress: which shards are durable, and who is reading them.

Train-while-generate needs a contract between the run and its readers that works
through the filesystem alone (any process, no Prefect client):

``<registry>/.synthfactory/live/<dataset>/feed.json`` is rewritten atomically by the
run each time a shard becomes durable in the shard cache; it lists the shards in the
order they finished, with the absolute path of each accepted-samples tar, and says
when the run has finished (or failed). A reader never sees a half-written shard because
a path enters the feed only after its tar was fsynced and renamed into place.

``consumers/<consumer>.json`` is each reader's progress (shards read, heartbeat).
With ``execution.max_unread_shards`` set, the run starts no new shard while the
slowest live reader would fall more than that many shards behind (finished plus in
flight): a slow trainer pauses generation instead of filling the disk. A reader silent for ``STALE_AFTER_S`` no longer holds the
run back, so a crashed trainer cannot stall it forever.

``writer.lock`` is held (``flock``) by the run while it writes a running feed: a feed
that says "running" with the lock free belongs to a run that was killed, and readers
see it as failed at once instead of waiting out their timeout.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from synthfactory.files import atomic_write_json, flock_held, try_flock

STALE_AFTER_S = 120.0
FEED_FILE = "feed.json"
WRITER_LOCK = "writer.lock"
KILLED = "the run ended without closing its feed (killed?)"
CONSUMERS_DIR = "consumers"


def default_consumer() -> str:
    """A reader name unique to this process: host-pid-random."""
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def live_dir(registry_root: Path, dataset: str) -> Path:
    return Path(registry_root) / ".synthfactory" / "live" / dataset


@dataclass
class FeedShard:
    name: str  # e.g. shapes-000003.tar
    path: str  # absolute path of the durable accepted-samples tar
    samples: int
    manifest: str | None = None  # absolute path of its manifest fragment (what readers check samples against)


@dataclass
class Feed:
    """What a reader sees: shards in completion order and whether more will come."""

    dataset: str
    run_id: str
    total_shards: int
    shards: list[FeedShard] = field(default_factory=list)
    state: str = "running"  # running | finished | failed
    message: str = ""
    classes: list[str] | None = None  # the recipe's label set, so readers can index labels

    @property
    def done(self) -> bool:
        return self.state != "running"


def read_feed(registry_root: Path, dataset: str) -> Feed | None:
    """The current feed of `dataset`, or None when no run has published one. A running
    feed whose writer lock is free is read once more before it is called killed: the run
    may have closed it (saved, then unlocked) between the first read and the lock check."""
    feed = _load_feed(registry_root, dataset)
    if feed is not None and not feed.done and not flock_held(live_dir(registry_root, dataset) / WRITER_LOCK):
        feed = _load_feed(registry_root, dataset)
        if feed is not None and not feed.done:
            feed.state, feed.message = "failed", KILLED
    return feed


def _load_feed(registry_root: Path, dataset: str) -> Feed | None:
    try:
        raw = json.loads((live_dir(registry_root, dataset) / FEED_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    raw["shards"] = [FeedShard(**entry) for entry in raw["shards"]]
    return Feed(**raw)


class FeedWriter:
    """The run's side: announce durable shards, wait for readers, say when it is over."""

    def __init__(self, registry_root: Path, dataset: str, total_shards: int, max_unread: int | None = None,
                 classes: list[str] | None = None) -> None:
        self.dir = live_dir(registry_root, dataset)
        self.max_unread = max_unread
        self.feed = Feed(dataset, uuid.uuid4().hex, total_shards, classes=classes)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = try_flock(self.dir / WRITER_LOCK)
        if self._lock is None:
            raise RuntimeError(f"another run of {dataset} is writing its live feed in {self.dir}")
        self._save()

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / FEED_FILE, asdict(self.feed))

    def shard_ready(self, name: str, path: Path, samples: int, manifest: Path | None = None) -> None:
        self.feed.shards.append(FeedShard(name, str(path), samples, str(manifest) if manifest else None))
        self._save()

    def close(self, state: str, message: str = "") -> None:
        self.feed.state, self.feed.message = state, message
        self._save()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def slowest_reader(self) -> int | None:
        """Shards read by the slowest live reader of this run; None if nobody is reading."""
        positions = []
        for path in (self.dir / CONSUMERS_DIR).glob("*.json"):
            try:
                progress = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            waiting_for_a_run = progress.get("run_id") is None
            if (progress.get("run_id") == self.feed.run_id or waiting_for_a_run) and \
                    time.time() - progress.get("heartbeat", 0) < STALE_AFTER_S:
                positions.append(0 if waiting_for_a_run else int(progress.get("consumed", 0)))
        return min(positions) if positions else None

    def must_wait(self, in_flight: int = 0) -> bool:
        """True while starting one more shard could leave the slowest reader more than
        `max_unread` shards behind, counting the `in_flight` shards that will land."""
        if self.max_unread is None:
            return False
        slowest = self.slowest_reader()
        return slowest is not None and len(self.feed.shards) + in_flight - slowest >= self.max_unread


class FeedReader:
    """A reader's side: register, report progress (the run's back-pressure signal)."""

    def __init__(self, registry_root: Path, dataset: str, consumer: str | None = None) -> None:
        self.registry_root, self.dataset = Path(registry_root), dataset
        self.consumer = consumer or default_consumer()

    def feed(self) -> Feed | None:
        return read_feed(self.registry_root, self.dataset)

    def report(self, run_id: str | None, consumed: int) -> None:
        """Record that `consumed` shards of run `run_id` have been read (also a heartbeat).
        `run_id=None` registers a reader waiting for the next run, which then starts
        no more shards than the reader's buffer allows."""
        path = live_dir(self.registry_root, self.dataset) / CONSUMERS_DIR / f"{self.consumer}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"run_id": run_id, "consumed": consumed, "heartbeat": time.time()})

    def leave(self) -> None:
        (live_dir(self.registry_root, self.dataset) / CONSUMERS_DIR / f"{self.consumer}.json").unlink(missing_ok=True)
