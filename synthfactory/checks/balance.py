"""Balance and bias: the label (or concept) distribution against the recipe's target,
and the balance of declared attribute columns (colour, background, template).

Generators amplify the biases of their prompts and models; this check measures the KL
divergence from the target distribution, each class's share, and the normalised entropy
of each attribute, and fails the gate outside the recipe's limits.

The KL limit is statistical by default: 2·n·KL is the G-test statistic, χ² with k − 1
degrees of freedom when the labels follow the target, so the largest KL a fair generator
reaches by chance at significance α is χ²₍₁₋α₎(k − 1) / 2n. It shrinks with the rows:
small runs are not failed by noise, and large ones cannot hide a skew.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from synthfactory.checks.base import CHECKS, CheckParams, DatasetCheck, DatasetView, Findings, PreviousRelease
from synthfactory.quality import diversity as dv


class BalanceParams(CheckParams):
    column: str = Field("label", description="the categorical column whose distribution is judged")
    target: dict[str, float] | None = Field(None, description="target shares; default: uniform over the labels")
    significance: float | None = Field(
        0.001, gt=0, lt=0.5, description="G-test level: fail when the KL is larger than chance allows at this many rows"
    )
    max_kl: float | None = Field(None, ge=0, description="also fail above this KL(observed || target) in nats, at any size")
    min_share: float | None = Field(None, ge=0, le=1)
    max_share: float | None = Field(None, ge=0, le=1)
    attributes: tuple[str, ...] = Field((), description="categorical columns (or list columns) to measure")
    min_attribute_balance: float | None = Field(0.8, ge=0, le=1, description="normalised entropy floor per attribute")


def _values(column: list[Any]) -> list[Any]:
    """A list column counts each element (a scene's colours); None is not a value."""
    flat: list[Any] = []
    for value in column:
        if isinstance(value, list):
            flat.extend(value)
        elif value is not None:
            flat.append(value)
    return flat


def counts(column: pa.ChunkedArray | pa.Array, keep_null: bool = False) -> Counter:
    """`Counter(_values(column.to_pylist()))`, the same counts in the same (first-seen)
    order, counted by Arrow: a million rows would otherwise be a million Python objects
    (and lists, for a list column) at once. Types where Arrow's equality could differ from
    Python's (floats: NaN, -0.0), and list columns with null elements, take the Python way.
    `keep_null` counts None too, as `Counter(column.to_pylist())` does (flat columns)."""
    values, kind = column, column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values, kind = pc.list_flatten(column), kind.value_type
        if values.null_count:  # None inside a list is counted as a value: keep Python's order for it
            return Counter(_values(column.to_pylist()))
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_boolean(kind)):
        return Counter(column.to_pylist() if keep_null else _values(column.to_pylist()))
    tally = pc.value_counts(values if keep_null else pc.drop_null(values))
    return Counter(dict(zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist())))


@CHECKS.register("balance")
class Balance(DatasetCheck):
    Params = BalanceParams
    version = "1"
    code = ("synthfactory.quality.diversity",)
    params: BalanceParams

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        p = self.params
        manifest = data.manifest
        metrics: dict[str, float] = {}
        limits: dict[str, tuple[float | None, float | None]] = {}
        notes: list[str] = []
        tally = counts(manifest.column(p.column)) if p.column in manifest.column_names else None
        if tally:
            expected = p.target or dict.fromkeys(data.labels or sorted(tally), 1.0)
            unexpected = [label for label in tally if expected.get(label, 0) <= 0]
            metrics["unexpected_labels"] = len(unexpected)
            limits["unexpected_labels"] = (None, 0)
            if unexpected:
                notes.append(f"{p.column} values outside the target: {', '.join(map(str, sorted(unexpected)[:5]))}")
            judged = {label: n for label, n in tally.items() if label not in unexpected}
            for label in expected:
                judged.setdefault(label, 0)
            if any(judged.values()):
                metrics["kl_divergence"] = float(f"{dv.kl_divergence(judged, expected):.4g}")  # significant digits:
                # at a million rows the chance limit is ~1e-5, which fixed decimals would round away
            metrics["share_min"], metrics["share_max"] = (round(s, 4) for s in dv.share_extremes(judged))
            bounds = [p.max_kl] if p.max_kl is not None else []
            if p.significance is not None and len(judged) > 1:
                bounds.append(float(f"{dv.chance_kl(p.significance, len(judged), sum(judged.values())):.4g}"))
            if bounds and "kl_divergence" in metrics:
                limits["kl_divergence"] = (None, min(bounds))
            if p.min_share is not None:
                limits["share_min"] = (p.min_share, None)
            if p.max_share is not None:
                limits["share_max"] = (None, p.max_share)
        else:
            notes.append(f"no {p.column!r} values to balance")
        for attribute in p.attributes:
            if attribute not in manifest.column_names:
                notes.append(f"no attribute column {attribute!r}")
                continue
            name = f"balance_{attribute}"
            metrics[name] = round(dv.balance_of_counts(counts(manifest.column(attribute))), 4)
            if p.min_attribute_balance is not None:
                limits[name] = (p.min_attribute_balance, None)
        return Findings(metrics=metrics, limits=limits, notes=notes)
