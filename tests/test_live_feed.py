"""The run side of train-while-generate: a real release run announces each durable shard
on the live feed, and a slow reader holds generation back to its buffer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from flows.release import run_release
from synthfactory.live import FeedReader
from synthfactory.registry import DataRegistry
from synthfactory.shards import read_shard

pytestmark = pytest.mark.slow

MAX_UNREAD = 2


def test_a_slow_reader_holds_the_run_to_its_buffer(tmp_path, prefect):
    recipe = write_recipe(
        tmp_path / "live.yaml", shard_size=30, seed=5,
        generator={"kind": "procedural-shapes", "params": {"image_size": 24, "classes": ["circle", "square"]}},
        validation={"share_significance": None, "caption_length": {"min": 5, "max": 200}},
        execution={"runner": "thread", "workers": 2, "retries": 0, "max_unread_shards": MAX_UNREAD},
    )
    registry = DataRegistry.open(tmp_path / "registry").root
    reader = FeedReader(registry, "live")
    reader.report(None, 0)  # a trainer started before the run: generation waits for it
    seen: list[tuple[str, int]] = []
    worst_lag = []
    errors: list[BaseException] = []

    def read_slowly() -> None:
        try:
            while True:
                feed = reader.feed()
                if feed is None:
                    time.sleep(0.05)
                    continue
                # what is on disk but unread can never exceed the buffer
                worst_lag.append(len(feed.shards) - len(seen))
                if len(seen) < len(feed.shards):
                    shard = feed.shards[len(seen)]
                    samples = sum(1 for _ in read_shard(Path(shard.path)))  # whole: a half shard would not parse
                    seen.append((shard.name, samples))
                    time.sleep(1.0)  # a slow training step
                    reader.report(feed.run_id, len(seen))
                elif feed.done:
                    return
                else:
                    reader.report(feed.run_id, len(seen))
                    time.sleep(0.05)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    thread = threading.Thread(target=read_slowly, daemon=True)
    thread.start()
    summary = run_release(str(recipe), str(registry), publish=False)
    thread.join(timeout=60)

    assert not errors, errors
    assert not thread.is_alive()
    assert sorted(name for name, _ in seen) == [f"live-{i:06d}.tar" for i in range(8)]
    assert sum(samples for _, samples in seen) == summary.samples  # no dataset check refused any
    assert max(worst_lag) <= MAX_UNREAD
    assert reader.feed().state == "finished"


def test_a_reader_following_a_killed_run_fails_at_once_not_after_its_timeout(tmp_path):
    """The run holds the feed's writer lock; once the kernel drops it (kill -9), the feed
    still says "running" but readers know better."""
    import signal
    import subprocess
    import sys

    from synthfactory.live import FeedWriter, read_feed
    from synthfactory.loader.errors import LoaderError
    from synthfactory.loader.sources import LiveRun

    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; from synthfactory.live import FeedWriter; "
         "w = FeedWriter(sys.argv[1], 'ds', 4); w.shard_ready('ds-000000.tar', sys.argv[2], 0); "
         "print('ready', flush=True); sys.stdin.read()", str(tmp_path), str(shard)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert read_feed(tmp_path, "ds").state == "running"
        with pytest.raises(RuntimeError, match="another run of ds is writing its live feed"):
            FeedWriter(tmp_path, "ds", 4)
        run = LiveRun(tmp_path, "ds", poll_s=0.05, timeout_s=120, consumer="t")
        follow = run.schedule(run.shard_names(), 0, 1, None)
        assert next(follow)[0].name == "ds-000000.tar"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    started = time.monotonic()
    with pytest.raises(LoaderError, match=r"failed: the run ended without closing its feed \(killed\?\)"):
        next(follow)
    assert time.monotonic() - started < 60
    assert read_feed(tmp_path, "ds").state == "failed"

    again = FeedWriter(tmp_path, "ds", 4)  # the rerun takes the feed over
    again.close("finished")
    assert read_feed(tmp_path, "ds").state == "finished"


def test_a_feed_closed_between_the_read_and_the_lock_check_is_not_called_killed(tmp_path, monkeypatch):
    """The run saves "finished", then unlocks: a reader that read "running" just before
    and checks the lock just after must not report the run as killed (seen under load)."""
    from synthfactory import live

    writer = live.FeedWriter(tmp_path, "racy", total_shards=1)

    def closed_meanwhile(path):
        writer.close("finished")
        return False

    monkeypatch.setattr(live, "flock_held", closed_meanwhile)
    feed = live.read_feed(tmp_path, "racy")
    assert (feed.state, feed.message) == ("finished", "")
