"""What a release cost: its tokens at the recipe's prices plus its accelerator time at the
hourly price, from the usage each shard recorded (a resumed run counts the shards it
reused at what they cost when they were made)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from synthfactory.recipe import Prices
from synthfactory.release.build import ShardResult
from synthfactory.usage import add_usage


class BudgetExceededError(RuntimeError):
    """The recipe's budget_usd is spent: generation stopped, finished shards are kept."""


def cost_usd(prices: Prices, usage: Mapping[str, float]) -> dict[str, float]:
    """The bill by line, and its total, in USD (accelerator time is usage's `device_s`)."""
    lines = {
        "input_tokens": usage.get("prompt_tokens", 0) * prices.usd_per_million_input_tokens / 1e6,
        "output_tokens": usage.get("completion_tokens", 0) * prices.usd_per_million_output_tokens / 1e6,
        "gpu_hours": usage.get("device_s", 0.0) / 3600 * prices.usd_per_gpu_hour,
    }
    return {**{name: round(value, 6) for name, value in lines.items()}, "total": round(sum(lines.values()), 6)}


def shards_cost(prices: Prices, results: Iterable[ShardResult]) -> dict[str, float]:
    """The cost of these shards, as each recorded it."""
    return cost_usd(prices, add_usage(result.usage for result in results))


def describe_usage(metrics: Mapping[str, object]) -> str | None:
    """One sentence of what the release used and cost (metrics.json's usage and cost_usd),
    for the card, the report and the run summary; None when it called no model."""
    usage, cost = metrics.get("usage"), metrics.get("cost_usd")
    if not isinstance(usage, Mapping) or not isinstance(cost, Mapping):
        return None
    count = lambda name: f"{int(usage.get(name, 0)):,}"  # noqa: E731
    parts = [f"${cost['total']:.4f} (input tokens ${cost['input_tokens']:.4f}, output tokens "
             f"${cost['output_tokens']:.4f}, accelerator time ${cost['gpu_hours']:.4f})"]
    parts.append(f"{count('prompt_tokens')} prompt + {count('completion_tokens')} completion tokens")
    if usage.get("requests") or usage.get("cache_hits"):
        parts.append(f"{count('requests')} requests ({count('retries')} retries, {count('backoffs')} back-offs, "
                     f"{count('failures')} failed), {count('cache_hits')} answered from the response cache")
    if usage.get("device_s"):
        parts.append(f"{usage['device_s']:.1f} accelerator seconds")
    return "; ".join(parts)
