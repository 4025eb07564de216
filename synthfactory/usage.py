"""What generating used: requests, tokens, retries, cache hits, seconds. Plain dicts of
numbers, so they cross process boundaries and land in a shard's cache record and the
release's metrics.json as they are, and survive a resumed run with the shards they paid for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def add_usage(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The counts summed key by key (seconds rounded to ms)."""
    total: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return {name: round(value, 3) if isinstance(value, float) else value for name, value in sorted(total.items())}
