"""The consumer side on real parts: a release published through Prefect + DVC to the
session's SeaweedFS, read back by the loader (S3 streaming, shard cache, DataLoader
workers × ranks), by webdataset and HF datasets, and live runs fed by a producer thread."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from conftest import write_recipe
from torch.utils.data import DataLoader

from synthfactory.generators import Sample
from synthfactory.generators.procedural import ShapesGenerator
from synthfactory.live import CONSUMERS_DIR, FeedWriter, live_dir
from synthfactory.loader import DiskCache, LoaderError, consumer_index, consumer_share, iter_samples, load
from synthfactory.samples import slot_for
from synthfactory.shards import (
    LEGACY_MANIFEST,
    MANIFEST_DIR,
    fragment_path,
    manifest_record,
    manifest_schema,
    plan_shards,
    read_manifest,
    tar_bytes,
    write_shard,
)
from synthfactory.storage import StorageConfig

CLASSES = ["circle", "square", "star"]
SHARDS, SHARD_SIZE = 8, 20
#: DataLoader workers start from a clean forkserver: Prefect 3.8.8 leaves an at-exit hook
#: behind that makes a child forked after a flow ran in this process exit with code 1
#: (AssertionError in QueueService._drain), and the fixture below runs a flow here.
WORKERS = {"num_workers": 2, "multiprocessing_context": "forkserver"}
multiprocessing.set_forkserver_preload(["synthfactory.loader"])


@dataclass(frozen=True)
class Published:
    registry: Path  # where it was released: its DVC cache holds every object
    clone: Path  # a consumer's `git clone`: no DVC cache, shards come from S3
    keys: list[str]  # manifest keys
    shard_of: dict[str, str]  # key -> shard name
    shard_files: dict[str, Path]  # shard name -> its file in the registry's workspace

    @property
    def release_dir(self) -> Path:
        return self.registry / "data" / "loadme"

    def md5(self, shard: str) -> str:
        return hashlib.md5(self.shard_files[shard].read_bytes()).hexdigest()

    def partition(self, shard: str) -> Path:
        """The shard's manifest partition: the loader caches it beside the shard (it checks it)."""
        return self.release_dir / manifest_record(shard)

    def partition_md5(self, shard: str) -> str:
        return hashlib.md5(self.partition(shard).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def published(s3: StorageConfig, prefect: None, tmp_path_factory: pytest.TempPathFactory):
    """One small release (8 shards × 20 samples of 16 px shapes) in S3 for the module;
    the S3 settings stay in the environment while the module runs."""
    from flows.release import run_release

    root = tmp_path_factory.mktemp("loader")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SYNTHFACTORY_S3_ENDPOINT", s3.endpoint_url)
        env.setenv("SYNTHFACTORY_S3_BUCKET", s3.bucket)
        env.setenv("SYNTHFACTORY_S3_PREFIX", "t-loader")
        env.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        recipe = write_recipe(
            root / "loadme.yaml",
            name="loadme",
            samples=SHARDS * SHARD_SIZE,
            shard_size=SHARD_SIZE,
            generator={"kind": "procedural-shapes", "params": {"image_size": 16, "classes": CLASSES}},
            validation={"caption_length": {"min": 10, "max": 200}, "min_accept_rate": 0.9},
            execution={"workers": 1, "retries": 0},
        )
        summary = run_release(str(recipe), str(root / "registry"))
        assert summary.tag == "loadme@v1"
        subprocess.run(["git", "clone", "--quiet", str(root / "registry"), str(root / "clone")], check=True)
        release_dir = root / "registry" / "data" / "loadme"
        manifest = read_manifest(release_dir, columns=["key", "shard"]).to_pylist()
        yield Published(
            root / "registry",
            root / "clone",
            [row["key"] for row in manifest],
            {row["key"]: row["shard"] for row in manifest},
            {p.name: p for p in sorted((release_dir / "shards").glob("*.tar"))},
        )


def cache_bytes_on_disk(cache_dir: Path) -> int:
    total = 0
    for path in cache_dir.iterdir() if cache_dir.exists() else ():
        with contextlib.suppress(FileNotFoundError):  # committed or evicted since the listing
            total += path.stat().st_size
    return total


def entries(cache_dir: Path) -> set[str]:
    """The cache's files, less the small listing of each release read (kept per tag commit)."""
    return {p.name for p in cache_dir.iterdir() if not p.name.startswith(".listing-")}


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["__key__"]]


# -- splitting ---------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3, 4, 7, 9])
def test_consumer_shares_cover_every_sample_once(shards: int) -> None:
    consumers, samples = 4, 10
    seen = Counter()
    for consumer in range(consumers):
        for position in range(shards):
            share = consumer_share(position, shards, consumer, consumers)
            if share is not None:
                stride, offset = share
                seen.update((position, i) for i in range(samples) if i % stride == offset)
    assert seen == Counter({(p, i): 1 for p in range(shards) for i in range(samples)})


@pytest.mark.parametrize("shards", range(6, 13))
def test_ranks_get_shard_counts_within_one(shards: int) -> None:
    world_size, workers = 3, 2
    per_rank = Counter()
    for rank in range(world_size):
        for worker in range(workers):
            consumer = consumer_index(rank, world_size, worker)
            per_rank[rank] += sum(consumer_share(p, shards, consumer, world_size * workers) == (1, 0) for p in range(shards))
    assert max(per_rank.values()) - min(per_rank.values()) <= 1
    assert sum(per_rank.values()) == shards


@pytest.mark.slow
def test_each_sample_once_per_epoch_across_workers_and_ranks_from_s3(published: Published, tmp_path: Path) -> None:
    datasets = [
        load("loadme", 1, published.clone, rank=rank, world_size=2, cache_dir=tmp_path / "cache", fields=["png", "label"])
        for rank in range(2)
    ]
    epochs = []
    for epoch in range(2):
        keys = []
        for dataset in datasets:
            dataset.set_epoch(epoch)
            for batch in DataLoader(dataset, batch_size=8, **WORKERS):
                assert batch["png"].shape[1:] == (3, 16, 16) and batch["png"].dtype.is_floating_point is False
                assert set(batch["label"].tolist()) <= {0, 1, 2}
                keys += batch["__key__"]
        assert Counter(keys) == Counter(published.keys)  # all, once each
        epochs.append(keys)
    assert epochs[0] != epochs[1]

    # Fewer shards (3) than consumers (2 ranks × 2 workers): they split samples within shards.
    few = sorted(published.shard_files)[:3]
    keys = [k for d in datasets for k in keys_of(DataLoader(d.select(few), batch_size=8, **WORKERS))]
    assert Counter(keys) == Counter(k for k in published.keys if published.shard_of[k] in few)


@pytest.mark.slow
def test_shard_order_is_seeded_by_epoch_and_seed(published: Published) -> None:
    def shard_order(epoch: int, seed: int, **options) -> list[str]:
        dataset = load("loadme", registry=published.release_dir, seed=seed, decode="raw", fields=["txt"], **options)
        dataset.set_epoch(epoch)
        return list(dict.fromkeys(sample["__shard__"] for sample in dataset))

    assert shard_order(0, 5) == shard_order(0, 5)
    assert shard_order(0, 5) != shard_order(1, 5)
    assert shard_order(0, 5) != shard_order(0, 6)
    assert sorted(shard_order(3, 5)) == sorted(published.shard_files)
    assert shard_order(0, 5, shuffle=False) == sorted(published.shard_files)

    # For code without torch tensors: PIL images, text, integer labels.
    first = next(iter_samples("loadme", registry=published.release_dir, decode="pil", fields=["png", "txt", "label"]))
    assert isinstance(first["png"], Image.Image) and first["png"].size == (16, 16) and first["png"].mode == "RGB"
    assert isinstance(first["txt"], str) and first["label"] in (0, 1, 2)

    # The shuffle buffer reorders samples, not which ones are read.
    plain = [s["__key__"] for s in iter_samples("loadme", registry=published.release_dir, decode="raw", fields=["txt"])]
    mixed = [s["__key__"] for s in iter_samples("loadme", registry=published.release_dir, decode="raw", fields=["txt"], shuffle_buffer=16)]
    assert plain != mixed and sorted(plain) == sorted(mixed) == sorted(published.keys)

    # Persistent workers see set_epoch too: same order as a fresh loader at that epoch.
    dataset = load("loadme", registry=published.release_dir, seed=5, decode="raw", fields=["txt"])
    persistent = DataLoader(dataset, batch_size=10, persistent_workers=True, **WORKERS)
    by_epoch = {}
    for epoch in range(2):
        dataset.set_epoch(epoch)
        by_epoch[epoch] = keys_of(persistent)
    assert by_epoch[0] != by_epoch[1]
    assert by_epoch[1] == keys_of(DataLoader(dataset, batch_size=10, **WORKERS))


# -- the shard cache and S3 --------------------------------------------------------------


@pytest.mark.slow
def test_cold_cache_streams_from_s3_then_warm_cache_needs_no_s3(published: Published, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cold = {s["__key__"]: s["png"] for s in iter_samples("loadme", "v1", published.clone, cache_dir=cache, decode="raw")}
    assert sorted(cold) == sorted(published.keys)
    assert entries(cache) == {".lock", *(md5(s) for s in published.shard_files for md5 in (published.md5, published.partition_md5))}

    # Credentials that S3 refuses: a fresh cache now fails, naming the variable and not the secret ...
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "garbage-secret")
    with pytest.raises(LoaderError, match="AWS_SECRET_ACCESS_KEY") as refused:
        list(iter_samples("loadme", 1, published.clone, cache_dir=tmp_path / "empty"))
    assert "garbage-secret" not in str(refused.value)

    # ... and the warm cache still serves every byte. (In this process: DataLoader workers
    # come from a forkserver whose environment is whatever it was when it first started.)
    dataset = load("loadme", "loadme@v1", published.clone, cache_dir=cache, decode="raw", fields=["png"])
    warm = {sample["__key__"]: sample["png"] for sample in dataset}
    assert warm == cold


@pytest.mark.slow
def test_cache_never_exceeds_its_bound_and_evicts_least_recently_read(published: Published, tmp_path: Path) -> None:
    sizes = {name: path.stat().st_size for name, path in published.shard_files.items()}
    bound = int(max(sizes.values()) * 2.5)
    cache = tmp_path / "cache"

    # Two ranks × two workers share one cache; check its size while they fill it.
    loaders = [
        DataLoader(load("loadme", registry=published.clone, rank=r, world_size=2, cache_dir=cache, cache_bytes=bound, fields=["label"]),
                   batch_size=4, **WORKERS)
        for r in range(2)
    ]
    keys, peak = [], 0
    for batches in itertools.zip_longest(*loaders):
        peak = max(peak, cache_bytes_on_disk(cache))
        assert peak <= bound
        keys += [k for batch in batches if batch is not None for k in batch["__key__"]]
    assert Counter(keys) == Counter(published.keys)
    assert 0 < peak <= bound
    assert not list(cache.glob(".*.part")), "a writer's temporary file was left behind"

    # LRU: read a, b; read a again; reading c evicts b and its partition, the least recently read
    # (room for the three shards and the partitions of a and c: each shard's is read before it).
    lru = tmp_path / "lru"
    a, b, c = sorted(sizes)[:3]
    partitions = published.partition(a).stat().st_size + published.partition(c).stat().st_size
    ordered = load("loadme", registry=published.clone, shuffle=False, cache_dir=lru,
                   cache_bytes=partitions + sizes[a] + sizes[b] + sizes[c] - 1, decode="raw", fields=["txt"])
    for names in ([a], [b], [a], [c]):
        assert len(list(ordered.select(names))) == SHARD_SIZE
        time.sleep(0.01)  # distinct mtimes
    assert entries(lru) == {".lock", published.partition_md5(a), published.md5(a), published.partition_md5(c), published.md5(c)}

    # A shard larger than the whole cache is streamed and not cached.
    tiny = tmp_path / "tiny"
    streamed = load("loadme", registry=published.clone, cache_dir=tiny, cache_bytes=min(sizes.values()) - 1, decode="raw", fields=["txt"])
    assert sorted(s["__key__"] for s in streamed) == sorted(published.keys)
    assert entries(tiny) <= {".lock", *map(published.partition_md5, sizes)}  # small partitions fit, no shard does


def test_cache_reservations_count_and_dead_writers_are_reclaimed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=100)
    first = cache.reserve("a", 60)
    assert first is not None and cache.used_bytes() == 60  # reserved before any byte is written
    assert cache.reserve("b", 60) is None  # a live writer is never evicted
    first.write(b"x" * 60)
    first.commit()
    with cache.open("a") as pinned:
        assert pinned.read() == b"x" * 60
        assert cache.reserve("b", 60) is None  # an entry being read is never evicted
    second = cache.reserve("b", 60)  # now "a" goes
    assert second is not None and cache.open("a") is None
    second.discard()
    assert cache.used_bytes() == 0
    # A temporary file whose writer died (no lock held) is reclaimed.
    (tmp_path / ".c.999.dead.part").write_bytes(b"y" * 90)
    assert cache.reserve("c", 50) is not None and not (tmp_path / ".c.999.dead.part").exists()


# -- interop ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_webdataset_and_hf_datasets_see_the_manifest_keys(published: Published, tmp_path: Path) -> None:
    import webdataset as wds
    from datasets import load_dataset

    shards = [str(p) for p in published.shard_files.values()]
    ours = [s["__key__"] for s in iter_samples("loadme", registry=published.release_dir, shuffle=False, decode="raw", fields=["json"])]
    by_webdataset = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    by_hf = load_dataset("webdataset", data_files={"train": shards}, split="train", cache_dir=str(tmp_path / "hf"))["__key__"]
    assert ours == by_webdataset == by_hf == sorted(published.keys)


# -- live runs -------------------------------------------------------------------------------


def shape_samples(start: int, stop: int) -> list[Sample]:
    generator = ShapesGenerator.from_params({"image_size": 16, "classes": CLASSES})
    return [s for s in generator.generate([slot_for(3, i) for i in range(start, stop)]) if isinstance(s, Sample)]


class Producer(threading.Thread):
    """A run's shard loop: each shard is first half-written in place (as a non-atomic
    writer would leave it), then written atomically and announced after `delay`."""

    def __init__(self, root: Path, shards: int, delay: float, max_unread: int | None = None,
                 wait_for_reader: bool = False, fail_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.root, self.delay, self.wait_for_reader, self.fail_after = root, delay, wait_for_reader, fail_after
        self.writer = FeedWriter(root, "feedy", shards, max_unread=max_unread)
        self.expected = {p.name: shape_samples(p.start, p.stop) for p in plan_shards("feedy", shards * 10, 10)}
        self.ready: dict[str, float] = {}  # shard -> when it was announced
        self.lags: list[int] = []  # shards the slowest reader was behind, at each announcement
        self.waits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.wait_for_reader and self.writer.slowest_reader() is None:
                time.sleep(0.01)
            for index, (name, samples) in enumerate(self.expected.items()):
                if index == self.fail_after:
                    self.writer.close("failed", f"shard {name} exploded")
                    return
                while self.writer.must_wait():
                    self.waits += 1
                    time.sleep(0.02)
                run = self.root / "run"
                path = run / "shards" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                data = tar_bytes((s.slot.key, s.files) for s in samples)
                path.write_bytes(data[: len(data) // 2])
                time.sleep(self.delay)
                write_shard(run, name, run, samples, [], "procedural-shapes", "1", manifest_schema(ShapesGenerator.columns))
                self.lags.append(len(self.writer.feed.shards) - (self.writer.slowest_reader() or 0))
                self.ready[name] = time.monotonic()
                self.writer.shard_ready(name, path, len(samples), fragment_path(run, name, "manifest"))
            self.writer.close("finished")
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def test_live_reads_every_durable_shard_across_ranks_and_workers_while_the_run_writes(tmp_path: Path) -> None:
    producer = Producer(tmp_path, shards=6, delay=0.15)
    bound = 2 * len(tar_bytes((s.slot.key, s.files) for s in producer.expected["feedy-000000.tar"])) + 4096
    cache = tmp_path / "cache"
    loaders = [
        iter(DataLoader(load("feedy", registry=tmp_path, live=True, poll_s=0.02, rank=r, world_size=2, classes=CLASSES,
                             cache_dir=cache, cache_bytes=bound, decode="raw", fields=["png", "label"]),
                        batch_size=None, **WORKERS))
        for r in range(2)
    ]  # workers start here, before any other thread runs
    arrivals: dict[str, float] = {}
    seen: list[tuple[str, bytes, int]] = []
    peak = [0]

    def consume(loader) -> None:
        for sample in loader:
            arrivals.setdefault(sample["__shard__"], time.monotonic())
            seen.append((sample["__key__"], sample["png"], sample["label"]))
            peak[0] = max(peak[0], cache_bytes_on_disk(cache))

    readers = [threading.Thread(target=consume, args=(loader,)) for loader in loaders]
    producer.start()
    for reader in readers:
        reader.start()
    for thread in (producer, *readers):
        thread.join(timeout=60)
    assert producer.error is None and not any(t.is_alive() for t in (producer, *readers))

    expected = {s.slot.key: (s.files["png"], CLASSES.index(s.columns["label"])) for ss in producer.expected.values() for s in ss}
    assert Counter(key for key, _, _ in seen) == Counter(list(expected))  # every sample once: no half-written shard
    assert all(expected[key] == (png, label) for key, png, label in seen)
    assert all(arrivals[name] >= producer.ready[name] for name in producer.ready)  # waited for each shard
    assert 0 < peak[0] <= bound
    assert not list((live_dir(tmp_path, "feedy") / CONSUMERS_DIR).glob("*.json"))  # readers left


def test_a_lagging_live_reader_holds_the_run_back(tmp_path: Path) -> None:
    producer = Producer(tmp_path, shards=6, delay=0.0, max_unread=2, wait_for_reader=True)
    dataset = load("feedy", registry=tmp_path, live=True, poll_s=0.02, cache_bytes=0, decode="raw", fields=["txt"])
    producer.start()
    keys = []
    for sample in dataset:
        keys.append(sample["__key__"])
        time.sleep(0.01)  # a slow trainer
    producer.join(timeout=30)
    assert producer.error is None
    assert len(keys) == 60
    assert producer.waits > 0, "must_wait() never engaged"
    assert max(producer.lags) < 2  # never max_unread shards ahead of the reader


def test_live_reader_fails_when_the_run_fails(tmp_path: Path) -> None:
    producer = Producer(tmp_path, shards=3, delay=0.0, fail_after=1)
    dataset = load("feedy", registry=tmp_path, live=True, poll_s=0.02, cache_bytes=0)
    producer.start()
    with pytest.raises(LoaderError, match=r"failed: shard feedy-000001.tar exploded"):
        for _ in dataset:
            pass
    producer.join(timeout=10)


# -- bad input -------------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    """One byte in the middle of `path` changed, its size kept (DVC's cache files are read-only)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_a_damaged_cached_shard_is_dropped_and_fetched_again(published: Published, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = {s["__key__"]: s["png"] for s in iter_samples("loadme", 1, published.clone, cache_dir=cache, decode="raw", shuffle=False)}
    shard = sorted(published.shard_files)[2]
    flip_a_byte(cache / published.md5(shard))

    dataset = load("loadme", 1, published.clone, cache_dir=cache, decode="raw", shuffle=False)
    warm = {s["__key__"]: s["png"] for s in dataset}
    assert warm == cold and dataset.refetched == 1
    assert hashlib.md5((cache / published.md5(shard)).read_bytes()).hexdigest() == published.md5(shard)


def test_a_damaged_object_in_dvcs_cache_is_fetched_again_from_s3(published: Published, tmp_path: Path) -> None:
    """The registry's own DVC cache (a copy of it, so other tests keep theirs) serves
    shards in place; a damaged object there is dropped and streamed from S3 instead."""
    import shutil

    registry = tmp_path / "registry"
    shutil.copytree(published.registry, registry, symlinks=True)
    shard = sorted(published.shard_files)[3]
    md5 = published.md5(shard)
    cached = registry / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert cached.is_file()
    flip_a_byte(cached)

    dataset = load("loadme", 1, registry, cache_dir=tmp_path / "cache", decode="raw", shuffle=False)
    keys = [s["__key__"] for s in dataset]
    assert keys == published.keys and dataset.refetched == 1
    assert not cached.exists() or hashlib.md5(cached.read_bytes()).hexdigest() == md5


def test_a_release_made_before_the_manifest_was_partitioned_still_loads(published: Published, tmp_path: Path, monkeypatch) -> None:
    """A tag whose manifest is one file, as releases had before it was partitioned (DVC out
    manifest.parquet): read through DVC at the tag, every sample checked against it."""
    import shutil

    import yaml

    from synthfactory import registry as registry_module
    from synthfactory.registry import DataRegistry
    from synthfactory.release.verify import verify_release

    root = tmp_path / "registry"
    shutil.copytree(published.registry, root, symlinks=True)
    release = root / "data" / "loadme"
    manifest = read_manifest(release)
    shutil.rmtree(release / MANIFEST_DIR)
    pq.write_table(manifest, release / LEGACY_MANIFEST)
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["loadme"]
    legacy_outs = tuple(LEGACY_MANIFEST if out == MANIFEST_DIR else out for out in registry_module.CACHED_OUTS)
    monkeypatch.setattr(registry_module, "CACHED_OUTS", legacy_outs)
    older = DataRegistry(root)
    older.record_stage("loadme", stage["cmd"], stage["deps"])
    older.dvc_commit("loadme")
    older.git("add", "--all")
    older.git("commit", "--quiet", "-m", "loadme as a release made before the manifest was partitioned")
    older.git("tag", "loadme@v2")

    dataset = load("loadme", 2, root, cache_dir=tmp_path / "cache", decode="raw", shuffle=False)
    assert [s["__key__"] for s in dataset] == published.keys
    assert verify_release(release) == (len(published.keys), [])


def test_a_fresh_clone_with_a_wrong_secret_is_told_about_credentials(published: Published, tmp_path: Path, monkeypatch) -> None:
    """No DVC index yet: listing the release needs S3, and S3 refuses the secret."""
    clone = tmp_path / "fresh"
    subprocess.run(["git", "clone", "--quiet", str(published.registry), str(clone)], check=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(LoaderError, match=r"S3 refused the credentials .*AWS_SECRET_ACCESS_KEY") as refused:
        load("loadme", 1, clone, cache_dir=tmp_path / "cache")
    assert "wrong-secret" not in str(refused.value) and "DataIndexDirError" not in str(refused.value)


@pytest.mark.slow
def test_bad_input_is_named(published: Published, tmp_path: Path, monkeypatch) -> None:
    registry = published.clone
    cases = [
        (dict(dataset="nope"), r"unknown dataset 'nope'.*loadme"),
        (dict(version=7), r"unknown version 7 of 'loadme'.*loadme@v1"),
        (dict(version="latest"), r"version='latest': give N, 'vN' or 'loadme@vN'"),
        (dict(version="other@v1"), r"version='other@v1'"),
        (dict(decode="numpy"), r"decode='numpy': choose one of torch, pil, raw"),
        (dict(fields="png"), r"fields='png'"),
        (dict(rank=2, world_size=2), r"rank=2 and world_size=2"),
        (dict(live=True, live_timeout_s=0.1, poll_s=0.02), r"no running live feed for dataset 'loadme'"),
        (dict(live=True, version=1), r"version=1 with live=True"),
        (dict(registry=tmp_path), r"registry=.*is not the top of a git repository"),
        (dict(registry=published.release_dir, version=1), r"version=1 with release directory"),
        (dict(registry=published.release_dir, dataset="other"), r"dataset 'other': release directory .* holds 'loadme'"),
    ]
    for arguments, message in cases:
        arguments = {"dataset": "loadme", "registry": registry, **arguments}
        with pytest.raises(LoaderError, match=message):
            load(arguments.pop("dataset"), cache_dir=tmp_path / "cache", **arguments)

    dataset = load("loadme", registry=registry, cache_dir=tmp_path / "cache", fields=["png", "depth"])
    with pytest.raises(LoaderError, match=r"has no field 'depth'; it has: json, png, txt, label"):
        next(iter(dataset))
    with pytest.raises(LoaderError, match=r"unknown shard 'loadme-000099.tar'"):
        dataset.select(["loadme-000099.tar"])
    train, held_out = dataset.split(1)
    assert held_out.shard_names == sorted(dataset.shard_names)[-1:]
    assert sorted(train.shard_names + held_out.shard_names) == sorted(dataset.shard_names)
    with pytest.raises(LoaderError, match=rf"holdout={len(dataset.shard_names)}: .* hold out 1 to"):
        dataset.split(len(dataset.shard_names))

    for name in ("SYNTHFACTORY_S3_ENDPOINT", "SYNTHFACTORY_S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(LoaderError, match=r"no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        next(iter(load("loadme", registry=registry, cache_dir=tmp_path / "cold")))
