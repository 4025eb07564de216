"""Stopping and continuing an epoch mid-way (`state_dict` / `load_state_dict`, with
torchdata's StatefulDataLoader too), load-time mixing and real-data source datasets, on
small release directories, a live feed and image folders written here (no S3, no Prefect)."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import synthfactory.loader.dataset as loader_dataset
from synthfactory.generators.procedural import ShapesGenerator
from synthfactory.live import FeedWriter
from synthfactory.loader import LoaderError, load, mix, source_dataset
from synthfactory.plugins import RECIPE_DIR
from synthfactory.samples import Sample, slot_for
from synthfactory.shards import MANIFEST_DIR, SHARDS_DIR, fragment_path, manifest_record, manifest_schema, plan_shards, write_shard
from synthfactory.sources import SOURCES, Source, build_source

CLASSES = ["circle", "square", "star"]
SHARD_SIZE = 10
#: see tests/test_loader.py: a process that ran a Prefect flow cannot fork DataLoader workers
WORKERS = {"num_workers": 2, "multiprocessing_context": "forkserver"}
multiprocessing.set_forkserver_preload(["synthfactory.loader"])
#: torchdata 0.11's StatefulDataLoader still calls torch.set_vital, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def own_forkserver() -> Iterator[None]:
    """DataLoader workers fork from one forkserver per process, which keeps the environment
    it started with: stop the one this module started, so that a later module (the S3
    tests of test_loader.py) starts one with its own credentials in the environment."""
    started_here = forkserver._forkserver._forkserver_pid is None
    yield
    if started_here:
        forkserver._forkserver._stop()  # CPython's own tests stop it this way


def write_shards(stage: Path, dataset: str, shards: int, seed: int) -> None:
    """`shards` shards of 16 px shapes in stage/shards/, each with its manifest fragment."""
    generator = ShapesGenerator.from_params({"image_size": 16, "classes": CLASSES})
    for plan in plan_shards(dataset, shards * SHARD_SIZE, SHARD_SIZE):
        samples = [s for s in generator.generate([slot_for(seed, i) for i in range(plan.start, plan.stop)]) if isinstance(s, Sample)]
        write_shard(stage, plan.name, stage, samples, [], "procedural-shapes", "1", manifest_schema(ShapesGenerator.columns))


def release_directory(root: Path, dataset: str, shards: int, seed: int) -> Path:
    """A release as staging leaves it: each shard's fragment is its manifest partition."""
    write_shards(root, dataset, shards, seed)
    (root / MANIFEST_DIR).mkdir()
    for shard in (root / SHARDS_DIR).glob("*.tar"):
        fragment_path(root, shard.name, "manifest").rename(root / manifest_record(shard.name))
    return root


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {"alpha": release_directory(root / "alpha", "alpha", 6, seed=1),
            "beta": release_directory(root / "beta", "beta", 4, seed=2)}


def keys(samples) -> list[str]:
    return [sample["__key__"] for sample in samples]


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Through JSON, as a checkpoint would keep it: the state must be plain values."""
    return json.loads(json.dumps(state))


class Spy:
    """Counts decoded members and opened shards while a restarted dataset runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dataset) -> None:
        self.decoded, self.opened = 0, []
        decode, open_shard = loader_dataset._decode_member, dataset.source.open

        def counting_decode(*args):
            self.decoded += 1
            return decode(*args)

        def recording_open(ref):
            if ref.name.endswith(".tar"):  # not the manifest
                self.opened.append(ref.name)
            return open_shard(ref)

        monkeypatch.setattr(loader_dataset, "_decode_member", counting_decode)
        monkeypatch.setattr(dataset.source, "open", recording_open)


# -- one consumer, restarted mid-epoch ---------------------------------------------------------


@pytest.mark.parametrize("shuffle, shuffle_buffer", [(True, 0), (False, 0), (True, 16)])
def test_a_restart_yields_exactly_the_rest_of_the_epoch(releases, monkeypatch, shuffle: bool, shuffle_buffer: int) -> None:
    def dataset():
        made = load("alpha", registry=releases["alpha"], shuffle=shuffle, shuffle_buffer=shuffle_buffer, seed=3,
                    classes=CLASSES, fields=["png", "label"], cache_bytes=0)
        made.set_epoch(1)
        return made

    whole = list(dataset())
    first = dataset()
    stream = iter(first)
    taken = [next(stream) for _ in range(23)]  # mid-shard
    state = roundtrip(first.state_dict())
    assert state["epoch"] == 1 and state["dataset"]["seed"] == 3 and state["dataset"]["shards"] == 6

    restarted = dataset()
    restarted.load_state_dict(state)
    spy = Spy(monkeypatch, restarted)
    rest = list(restarted)
    assert keys(taken) + keys(rest) == keys(whole)
    assert [s["label"] for s in taken + rest] == [s["label"] for s in whole]
    assert spy.decoded == len(rest)  # one png each: nothing skipped was decoded
    if not shuffle_buffer:  # shards finished before the restart are not read
        assert spy.opened == list(dict.fromkeys(s["__shard__"] for s in rest))
    assert restarted.state_dict()["finished"]

    # The following epoch proceeds as without a restart.
    restarted.set_epoch(2)
    fresh = dataset()
    fresh.set_epoch(2)
    assert keys(restarted) == keys(fresh)
    assert (keys(fresh) != keys(whole)) == shuffle


def test_a_finished_or_fresh_state_and_set_epoch(releases) -> None:
    dataset = load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0)
    assert dataset.state_dict()["taken"] == 0  # before any iteration: the start of the epoch
    list(dataset)
    done = dataset.state_dict()
    assert done["finished"]
    again = load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0)
    again.load_state_dict(done)
    assert list(again) == []  # nothing left of that epoch
    assert len(list(again)) == 60  # the next iteration is a whole epoch

    # A loaded state is dropped by set_epoch to another epoch, kept by its own.
    stream = iter(dataset)
    next(stream)
    state = dataset.state_dict()
    for epoch, expected in ((0, 59), (1, 60)):
        resumed = load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0)
        resumed.load_state_dict(state)
        resumed.set_epoch(epoch)
        assert len(list(resumed)) == expected


# -- through torchdata's StatefulDataLoader ----------------------------------------------------


@pytest.mark.parametrize("workers", [{"num_workers": 0}, WORKERS], ids=["in-process", "2-workers"])
def test_stateful_dataloader_continues_where_it_stopped(releases, workers: dict[str, Any]) -> None:
    def loader():
        dataset = load("alpha", registry=releases["alpha"], seed=5, decode="raw", fields=["txt"], cache_bytes=0)
        dataset.set_epoch(3)
        return dataset, StatefulDataLoader(dataset, batch_size=3, **workers)

    whole = [key for batch in loader()[1] for key in batch["__key__"]]
    _, first = loader()
    batches = iter(first)
    taken = [key for _, batch in zip(range(7), batches, strict=False) for key in batch["__key__"]]  # mid-shard in each worker
    state = roundtrip(first.state_dict())
    del batches

    dataset, restarted = loader()
    restarted.load_state_dict(state)
    rest = [key for batch in restarted for key in batch["__key__"]]
    assert taken + rest == whole
    assert Counter(taken + rest) == Counter(keys(load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"])))

    dataset.set_epoch(4)
    fresh, fresh_loader = loader()
    fresh.set_epoch(4)
    assert [k for b in restarted for k in b["__key__"]] == [k for b in fresh_loader for k in b["__key__"]]


# -- a live run ----------------------------------------------------------------------------------


def test_a_live_reader_restarted_skips_the_shards_it_consumed(tmp_path: Path) -> None:
    writer = FeedWriter(tmp_path, "feedy", 4)
    run = tmp_path / "run"
    write_shards(run, "feedy", 4, seed=4)
    for plan in plan_shards("feedy", 4 * SHARD_SIZE, SHARD_SIZE):
        writer.shard_ready(plan.name, run / SHARDS_DIR / plan.name, SHARD_SIZE, fragment_path(run, plan.name, "manifest"))

    def reader():
        return load("feedy", registry=tmp_path, live=True, poll_s=0.01, cache_bytes=0, decode="raw", fields=["txt"])

    first = reader()
    stream = iter(first)
    taken = [next(stream) for _ in range(25)]
    state = roundtrip(first.state_dict())
    stream.close()
    assert (state["shard"], state["taken"]) == (2, 5)

    restarted = reader()  # while the run is still going
    writer.close("finished")
    restarted.load_state_dict(state)
    opened = []
    open_shard = restarted.source.open
    restarted.source.open = lambda ref: opened.append(ref.name) or open_shard(ref)
    rest = list(restarted)
    assert keys(taken) + keys(rest) == [slot_for(4, i).key for i in range(40)]  # feed order
    assert opened == ["feedy-000002.tar", "feedy-000003.tar"]


# -- refusals --------------------------------------------------------------------------------------


def test_a_state_of_another_dataset_seed_or_world_size_is_refused(releases, monkeypatch) -> None:
    def dataset(name="alpha", **options):
        return load(name, registry=releases[name], cache_bytes=0, decode="raw", **options)

    state = dataset(seed=1).state_dict()
    cases = [
        (dataset("beta", seed=1), r"state of another dataset: its source is '.*alpha', this one's is '.*beta'"),
        (dataset(seed=2), r"its seed is 1, this one's is 2"),
        (dataset(seed=1, shuffle_buffer=8), r"its shuffle_buffer is 0, this one's is 8"),
        (dataset(seed=1).select(["alpha-000000.tar"]), r"its shards is 6, this one's is 1"),
        (dataset(seed=1, rank=1, world_size=2), r"state of consumer 0 of 1 .*this is consumer 1 of 2: resume with the same"),
        (mix([dataset(seed=1)]), r"its kind is 'shards', this one's is 'mix'"),
    ]
    for target, message in cases:
        with pytest.raises(LoaderError, match=message):
            target.load_state_dict(state)
    with pytest.raises(LoaderError, match=r"state version 7: ShardDataset reads version 1"):
        dataset(seed=1).load_state_dict({**state, "version": 7})
    with pytest.raises(LoaderError, match=r"state version 'list'"):
        dataset(seed=1).load_state_dict([])  # type: ignore[arg-type]

    # A state loaded in the main process is one consumer's: a DataLoader worker (here
    # pretended: a worker that raises takes torch 5 s to stop) refuses it.
    loaded = dataset(seed=1)
    loaded.load_state_dict(state)
    monkeypatch.setattr(loader_dataset, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=2))
    with pytest.raises(LoaderError, match=r"this is consumer 0 of 2"):
        iter(loaded)


# -- real-data sources -------------------------------------------------------------------------


def image_folder(recipe_dir: Path, count: int) -> Source:
    """The real `image-folder` source over `count` 4 px PNGs in cat/ and dog/, built as a
    resolved recipe builds it (revision pinned)."""
    for index in range(count):
        path = recipe_dir / "images" / ("cat", "dog")[index % 2] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (index % 256, 0, 0)).save(path)
    params = SOURCES.get("image-folder").Params.model_validate(
        {"path": "images", "license": "CC0-1.0"}, context={RECIPE_DIR: recipe_dir}
    )
    return build_source({"kind": "image-folder", "params": params.model_dump(mode="json")}, recipe_dir)


def test_a_source_dataset_is_shaped_like_a_release_and_resumes(tmp_path: Path, monkeypatch) -> None:
    source = image_folder(tmp_path / "a", 150)
    first = next(iter(source_dataset(source, shuffle=False)))
    assert first["__key__"] == "cat__0000" and first["png"].shape == (3, 4, 4)
    assert first["label"] == 0  # classes: the source's labels, sorted
    assert first["__origin__"] == str(source.origin()) and first["__origin__"].startswith("image-folder:images@sha256:")

    def dataset(**options):
        made = source_dataset(source, decode="raw", seed=9, **options)
        made.set_epoch(2)
        return made

    whole = keys(dataset())
    assert sorted(whole) == sorted(r.key for r in source.records()) and whole != sorted(whole)
    halves = [keys(dataset(rank=r, world_size=2)) for r in range(2)]
    assert Counter(halves[0] + halves[1]) == Counter(whole)

    started = dataset()
    stream = iter(started)
    taken = [next(stream) for _ in range(70)]
    restarted = dataset()
    restarted.load_state_dict(roundtrip(started.state_dict()))
    reads = []
    read = source.read
    monkeypatch.setattr(source, "read", lambda indices: reads.extend(indices) or read(indices))
    assert keys(taken) + keys(restarted) == whole
    assert len(reads) == 80  # only the rest was read

    with pytest.raises(LoaderError, match=r"state of another dataset: its source is 'image-folder:images@sha256:"):
        source_dataset(image_folder(tmp_path / "b", 149), seed=9).load_state_dict(started.state_dict())
    with pytest.raises(LoaderError, match=r"source=.*give a real-data source"):
        source_dataset(object())
    with pytest.raises(LoaderError, match=r"record \w+ of image-folder:images@sha256:\w+ has no field 'jpg'; it has: png, label"):
        next(iter(source_dataset(source, fields=["jpg"])))


# -- mixing ------------------------------------------------------------------------------------


class Counting(IterableDataset):
    """A plain iterable dataset without state: {"n": 0 .. count-1}."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[dict[str, int]]:
        return ({"n": n} for n in range(self.count))


def test_mix_ratios_follow_the_weights_and_the_seed() -> None:
    mixed = list(mix({"common": Counting(4000), "rare": Counting(4000)}, weights=[3, 1], seed=7))
    share = Counter(sample["__source__"] for sample in mixed[:3000])
    assert abs(share["rare"] / 3000 - 0.25) < 0.03
    assert len(mixed) < 8000 and Counter(s["__source__"] for s in mixed)["common"] == 4000  # stops at the first exhausted

    def order(seed: int, epoch: int = 0) -> list[tuple[str, int]]:
        mixed = mix({"common": Counting(50), "rare": Counting(50)}, weights=[3, 1], seed=seed)
        mixed.set_epoch(epoch)
        return [(s["__source__"], s["n"]) for s in mixed]

    assert order(7) == order(7) != order(8)
    assert order(7) != order(7, epoch=1)
    assert [s["__source__"] for s in mix([Counting(3), Counting(5)])] == [0, 1, 0, 1, 0]  # round robin, as HF's
    oversampled = Counter(s["__source__"] for s in mix([Counting(3), Counting(5)], stopping="all_exhausted"))
    assert oversampled == {0: 5, 1: 5}  # the short one started again until the long one ran out

    for bad, message in [(dict(weights=[1]), r"weights=\[1\]: give one positive number per dataset \(2\)"),
                         (dict(weights=[1, 0]), r"weights=\[1, 0\]"),
                         (dict(stopping="never"), r"stopping='never': choose one of first_exhausted, all_exhausted")]:
        with pytest.raises(LoaderError, match=message):
            mix([Counting(1), Counting(1)], **bad)


def test_a_restarted_mix_continues_exactly(releases, tmp_path: Path) -> None:
    real = image_folder(tmp_path, 30)

    def mixed(stopping: str = "first_exhausted"):
        made = mix(
            {"alpha": load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0, shuffle_buffer=8),
             "beta": load("beta", registry=releases["beta"], decode="raw", fields=["txt"], cache_bytes=0),
             "real": source_dataset(real, decode="raw"),
             "plain": Counting(25)},
            weights=[2, 1, 1, 1], seed=11, stopping=stopping,
        )
        made.set_epoch(1)
        return made

    def tagged(samples) -> list[tuple[str, str]]:
        return [(s["__source__"], s.get("__key__", s.get("n"))) for s in samples]

    sizes = {"alpha": 60, "beta": 40, "real": 30, "plain": 25}
    for stopping in ("first_exhausted", "all_exhausted"):
        whole = tagged(mixed(stopping))
        counts = Counter(source for source, _ in whole)
        if stopping == "all_exhausted":  # every dataset in full at least once; the short ones again
            assert all(counts[source] >= size for source, size in sizes.items()) and counts["plain"] > sizes["plain"]
        else:
            assert any(counts[source] == size for source, size in sizes.items()) and len(whole) < sum(sizes.values())
        for stop_after in range(0, len(whole) + 1, 17):
            first = mixed(stopping)
            stream = iter(first)
            taken = tagged(next(stream) for _ in range(stop_after))
            restarted = mixed(stopping)
            restarted.load_state_dict(roundtrip(first.state_dict()))
            assert taken + tagged(restarted) == whole, (stopping, stop_after)


def test_a_mix_with_stateful_dataloader_workers_continues_exactly(releases) -> None:
    def loader():
        made = mix([load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0),
                    load("beta", registry=releases["beta"], decode="raw", fields=["txt"], cache_bytes=0)], weights=[1, 1], seed=2)
        return StatefulDataLoader(made, batch_size=3, **WORKERS)

    def tagged(batches) -> list[tuple[int, str]]:
        return [(int(source), key) for batch in batches for source, key in zip(batch["__source__"], batch["__key__"], strict=True)]

    whole = tagged(loader())
    first = loader()
    batches = iter(first)
    taken = tagged(next(batches) for _ in range(4))
    state = first.state_dict()
    del batches
    restarted = loader()
    restarted.load_state_dict(state)
    assert taken + tagged(restarted) == whole
    assert len(set(whole)) == len(whole)  # the workers split each dataset: no sample twice


def test_a_checkpoint_at_an_epoch_end_resumes_with_the_next_epoch_whole(releases) -> None:
    # StatefulDataLoader applies the checkpoint's state when iteration starts, after the
    # training loop's set_epoch(next): that state must not carry into the new epoch.
    def loader():
        made = mix([load("alpha", registry=releases["alpha"], decode="raw", fields=["txt"], cache_bytes=0),
                    load("beta", registry=releases["beta"], decode="raw", fields=["txt"], cache_bytes=0)],
                   weights=[1, 1], seed=2)
        return made, StatefulDataLoader(made, batch_size=4)

    def keys(batches) -> list[str]:
        return [key for batch in batches for key in batch["__key__"]]

    made, first = loader()
    made.set_epoch(0)
    keys(first)  # epoch 0 in full, then the checkpoint
    state = first.state_dict()
    fresh_dataset, fresh = loader()
    fresh_dataset.set_epoch(1)
    made, restarted = loader()
    restarted.load_state_dict(state)
    made.set_epoch(1)
    expected = keys(fresh)
    assert keys(restarted) == expected and len(expected) > 50
