"""Load-time mixing: several datasets interleaved into one stream, none of them
materialised, like Hugging Face's `interleave_datasets`, and resumable mid-epoch."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from synthfactory.loader.dataset import ResumableDataset, distributed_rank
from synthfactory.loader.errors import LoaderError

STOPPING = ("first_exhausted", "all_exhausted")
#: what `next` gives for a dataset that has no sample left
_END = object()


def _stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


class MixedDataset(ResumableDataset):
    """Samples drawn from several datasets; see `mix`.

    Each consumer (rank × DataLoader worker) draws with its own RNG, seeded by (seed,
    epoch, consumer), while every dataset splits its own shards or records across the
    workers as usual. Like Hugging Face's, the mix reads one sample ahead in a dataset
    it draws from, to know at once that the dataset ran out. The state is the number of
    draws (the RNG is replayed to there), the samples taken from each dataset in its
    current pass, which datasets ran out, and each dataset's own state as of its last
    sample yielded (before the one read ahead); a dataset without state is skipped
    forward by its count.
    """

    def __init__(
        self,
        datasets: Sequence[Iterable[Any]],
        names: Sequence[str | int],
        probabilities: list[float] | None,
        *,
        seed: int,
        stopping: str,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(rank, world_size)
        self.datasets, self.names = list(datasets), list(names)
        self.probabilities, self.seed, self.stopping = probabilities, seed, stopping
        self._cumulative = list(itertools.accumulate(probabilities)) if probabilities else None
        self._behind: list[dict[str, Any] | None] = [None] * len(self.datasets)  # a dataset's state before its read-ahead

    def __repr__(self) -> str:
        return f"MixedDataset({', '.join(map(str, self.names))}, stopping={self.stopping!r}, rank {self.rank}/{self.world_size})"

    def set_epoch(self, epoch: int) -> None:
        """The mix and every dataset in it that has epochs (their saved read-ahead states
        belong to the epoch before)."""
        super().set_epoch(epoch)
        self._behind = [None] * len(self.datasets)
        for dataset in self.datasets:
            if callable(getattr(dataset, "set_epoch", None)):
                dataset.set_epoch(epoch)

    def identity(self) -> dict[str, Any]:
        return {"kind": "mix", "sources": self.names, "weights": self.probabilities, "seed": self.seed, "stopping": self.stopping}

    def _start_of(self, epoch: int) -> dict[str, Any]:
        count = len(self.datasets)
        return {**super()._start_of(epoch), "draws": 0, "taken": [0] * count, "exhausted": [False] * count}

    def state_dict(self) -> dict[str, Any]:
        """The mix's own state and each dataset's (None for one without state)."""
        state = super().state_dict()
        if self._loaded is None:
            state["datasets"] = [behind if behind is not None else self._state_of(index)
                                 for index, behind in enumerate(self._behind)]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("datasets")
        if not isinstance(saved, list) or len(saved) != len(self.datasets):
            raise LoaderError(f"state of a mix: needs 'datasets', one state per dataset ({len(self.datasets)})")
        for name, dataset, dataset_state in zip(self.names, self.datasets, saved, strict=True):
            if _stateful(dataset):
                if dataset_state is None:
                    raise LoaderError(f"state of a mix: dataset {name!r} has a state now but none was saved")
                dataset.load_state_dict(dataset_state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._mixed(*self._start())

    def _state_of(self, index: int) -> dict[str, Any] | None:
        dataset = self.datasets[index]
        return dataset.state_dict() if _stateful(dataset) else None

    def _draw(self, rng: random.Random, draws: int) -> int:
        if self._cumulative is None:
            return draws % len(self.datasets)  # round robin
        return rng.choices(range(len(self.datasets)), cum_weights=self._cumulative)[0]

    def _stream(self, index: int, taken: int) -> Iterator[Any]:
        """Dataset `index` from where this consumer is in it: its own state says so, else
        its first `taken` samples are skipped."""
        dataset = self.datasets[index]
        return iter(dataset) if _stateful(dataset) else itertools.islice(iter(dataset), taken, None)

    def _mixed(self, consumer: int, consumers: int, progress: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}:{progress['epoch']}:{consumer}")
        for draw in range(progress["draws"]):  # replays the draws made before a restart
            self._draw(rng, draw)
        streams = [self._stream(index, taken) for index, taken in enumerate(progress["taken"])]
        ahead: list[Any] = [None] * len(streams)  # the sample read ahead in each dataset (None: none yet)
        self._behind = [None] * len(streams)
        stop = all if self.stopping == "all_exhausted" else any
        while not progress["finished"]:
            if stop(progress["exhausted"]):
                progress["finished"] = True
                break
            index = self._draw(rng, progress["draws"])
            progress["draws"] += 1
            sample = ahead[index] if ahead[index] is not None else next(streams[index], _END)
            if sample is not _END:
                progress["taken"][index] += 1
            self._behind[index] = self._state_of(index)
            ahead[index] = next(streams[index], _END)
            if ahead[index] is _END:  # ran out: started again in case the mix goes on
                progress["exhausted"][index] = True
                streams[index], ahead[index], self._behind[index] = self._stream(index, 0), None, None
                progress["taken"][index] = 0
            if sample is _END:
                continue  # this consumer has no sample of it at all
            if not isinstance(sample, dict):
                raise LoaderError(f"dataset {self.names[index]!r} yields {type(sample).__name__}: mix() needs dict samples")
            yield {**sample, "__source__": self.names[index]}


def mix(
    datasets: Sequence[Iterable[Any]] | Mapping[str, Iterable[Any]],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    stopping: str = "first_exhausted",
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> MixedDataset:
    """One `IterableDataset` interleaving `datasets` (`load` / `source_dataset` datasets,
    any iterable dataset of dict samples) without materialising them, like Hugging
    Face's ``interleave_datasets``.

    Each sample is drawn from dataset i with probability ``weights[i] / sum(weights)``;
    `weights` None takes them in turn (round robin). Each sample gets ``__source__``: the
    dataset's index, or its name when `datasets` is a dict name -> dataset. `stopping`:
    "first_exhausted" ends right after one dataset gave its last sample; "all_exhausted"
    starts a dataset that ran out again (oversampling it) and ends right after every one
    gave its last sample at least once.
    Draws are seeded by (`seed`, epoch, consumer): call `set_epoch` on the mix (it
    passes it on). `rank`/`world_size` default like `load`'s.
    """
    members = list(datasets.values()) if isinstance(datasets, Mapping) else list(datasets)
    names: list[str | int] = list(datasets) if isinstance(datasets, Mapping) else list(range(len(members)))
    if not members:
        raise LoaderError("datasets: give at least one dataset to mix")
    not_iterable = [name for name, dataset in zip(names, members, strict=True) if not isinstance(dataset, Iterable)]
    if not_iterable:
        raise LoaderError(f"dataset {not_iterable[0]!r} is not an iterable dataset")
    if stopping not in STOPPING:
        raise LoaderError(f"stopping={stopping!r}: choose one of {', '.join(STOPPING)}")
    probabilities = None
    if weights is not None:
        try:
            numbers = [float(weight) for weight in weights]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != len(members) or not all(math.isfinite(n) and n > 0 for n in numbers):
            raise LoaderError(f"weights={weights!r}: give one positive number per dataset ({len(members)})")
        probabilities = [n / sum(numbers) for n in numbers]
    rank, world_size = distributed_rank(rank, world_size)
    return MixedDataset(members, names, probabilities, seed=seed, stopping=stopping, rank=rank, world_size=world_size)
