"""Release gate: validate a release manifest with Great Expectations and render Data Docs.

The gate runs real GX 1.x Checkpoints against in-memory tables: the manifest itself and,
per categorical column with target shares (labels; a mix's sources), `<column>_balance`,
a per-value summary derived from it (GX expectations work per row or per column, so
"every class holds ~1/k of the rows" needs a table with one row per class).

Shares are judged statistically, not with a fixed tolerance: each value's count gets an
exact two-sided binomial test against its target share, and fails below the recipe's
significance level (Bonferroni-corrected over the values). A fair generator passes at
any size; a skewed one fails once there are enough rows to show it (a fixed ± 0.05 fails
fair 100-sample runs by chance and lets a 4 % skew through at a million).
Everything GX writes goes to `report_dir`: the HTML Data Docs site (`index.html` at its
top) and `result.json` with the raw validation results.

GX is imported lazily: importing it takes seconds of CPU. A run calls `prefetch_gx()` at
its start, which starts a gate process that imports GX on another core while the run
generates; `validate_staged` then hands it the staged release's directory, whose
manifest it reads (or validates in this process when no gate process was started).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pyarrow as pa

from synthfactory.shards import read_manifest

MANIFEST_TABLE = "manifest"
QUALITY_TABLE = "quality_metrics"
DOCS_SITE = "release_gate"
_EXAMPLES_SHOWN = 3

# One lock for the GX import and for each validation run: the import must not race a
# prefetch thread, and get_context() sets a process-wide "current" context.
_GX_LOCK = threading.RLock()


@dataclass(frozen=True)
class GateSpec:
    """What a release must satisfy; built by the caller from the recipe."""

    expected_rows: tuple[int, int]
    caption_length: tuple[int, int]
    image_size: tuple[int, int] | None
    label_set: tuple[str, ...] | None
    required_columns: tuple[str, ...]
    #: categorical columns whose values must hold target shares (labels; a mix's sources)
    shares: tuple["ShareRule", ...] = ()
    #: significance level of the share tests; None checks only which values occur
    share_significance: float | None = 0.001
    unique_columns: tuple[str, ...] = ("key", "sha256")
    #: columns that may hold nulls (e.g. `relation` when the template has none)
    nullable_columns: tuple[str, ...] = ()
    #: (column, minimum) pairs: per-sample scores re-asserted on the release (clip_score ≥ min)
    column_minimums: tuple[tuple[str, float], ...] = ()
    #: (quality metric, min, max): dataset-level check figures the release must meet
    metric_limits: tuple[tuple[str, float | None, float | None], ...] = ()


@dataclass(frozen=True)
class ShareRule:
    """Column `column` should hold each value at its target share (the shares sum to 1)."""

    column: str
    targets: tuple[tuple[str, float], ...]

    @property
    def table(self) -> str:
        return f"{self.column}_balance"


@dataclass(frozen=True)
class ExpectationOutcome:
    """One GX expectation result, flattened for logs and summaries."""

    expectation: str
    table: str
    column: str | None
    success: bool
    unexpected_count: int | None
    element_count: int | None
    observed: str

    def describe(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        verdict = "passed" if self.success else "failed"
        return f"{where}: {self.expectation} {verdict} — {self.observed}"


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict and every outcome; report_dir holds index.html and result.json."""

    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    report_dir: Path

    @property
    def failures(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.success)

    def summary(self) -> str:
        """One line per failed expectation, with counts; says so when all passed."""
        if self.success:
            return f"all {len(self.outcomes)} expectations passed"
        return "\n".join(outcome.describe() for outcome in self.failures)


def _load_gx() -> ModuleType:
    """Import great_expectations with analytics off (GX must never phone home)."""
    with _GX_LOCK:
        os.environ["GX_ANALYTICS_ENABLED"] = "false"
        import great_expectations

        return great_expectations


class GateProcess:
    """The gate in a process of its own, started early: it imports GX while the run does
    other work, then validates one staged manifest. Requests and results are pickles:
    the request on its stdin, the result in a file next to the report."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            # -P: the installed code, never the copy a registry checkout in the cwd may hold
            [sys.executable, "-P", "-m", "synthfactory.validation"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        atexit.register(self.close)

    def validate(self, release_dir: Path, spec: GateSpec, report_dir: Path, quality: pd.DataFrame | None) -> GateResult:
        result_file = Path(report_dir) / ".gate-result.pickle"
        result_file.parent.mkdir(parents=True, exist_ok=True)
        _, errors = self._proc.communicate(pickle.dumps((release_dir, spec, report_dir, quality, result_file)))
        try:
            status, value = pickle.loads(result_file.read_bytes())
        except OSError:
            detail = errors.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the gate process exited ({self._proc.returncode}) without a verdict: {detail}") from None
        finally:
            result_file.unlink(missing_ok=True)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


_prefetched: GateProcess | None = None
_PREFETCH_LOCK = threading.Lock()


def prefetch_gx() -> None:
    """Start the gate process now, so GX's import overlaps the run's other work."""
    global _prefetched
    with _PREFETCH_LOCK:
        if _prefetched is None:
            _prefetched = GateProcess()


def validate_staged(release_dir: Path, spec: GateSpec, report_dir: Path, quality: pd.DataFrame | None = None) -> GateResult:
    """Run the gate on the manifest of release directory `release_dir`: in the prefetched
    gate process (handed the path, not the table), else here."""
    global _prefetched
    with _PREFETCH_LOCK:
        worker, _prefetched = _prefetched, None
    if worker is not None:
        try:
            return worker.validate(release_dir, spec, report_dir, quality)
        except RuntimeError as exc:  # it died (killed, out of memory): validate here instead
            logging.getLogger("synthfactory.validation").warning("%s; validating in this process", exc)
    return validate_manifest(manifest_frame(read_manifest(release_dir)), spec, report_dir, quality)


def _serve_one() -> None:
    """The gate process: import GX, then validate the one manifest asked for."""
    _load_gx()
    release_dir, spec, report_dir, quality, result_file = pickle.load(sys.stdin.buffer)
    try:
        result: tuple[str, Any] = ("ok", validate_manifest(manifest_frame(read_manifest(release_dir)), spec, report_dir, quality))
    except Exception as exc:
        result = ("error", exc)
    Path(result_file).write_bytes(pickle.dumps(result))


def manifest_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow manifest -> the DataFrame the gate validates.

    List columns (labels, bboxes) stay Arrow-backed: GX pickles the frame to identify the
    batch, and pickling 20k rows of Python lists costs ~1 s, Arrow buffers almost nothing.
    """
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


def share_table(manifest: pd.DataFrame, rule: ShareRule) -> pd.DataFrame:
    """One row per value observed or expected: its count and share of the manifest, its
    target share, and the p-value of an exact binomial test of the count against it. An
    expected value that is absent is judged the same way: at 20 rows a 10 % value is absent
    by chance one run in eight, at 300 rows it cannot be."""
    from scipy.stats import binomtest

    values = manifest[rule.column].astype(str) if rule.column in manifest.columns else pd.Series(dtype=str)
    counts = values.value_counts().to_dict()
    targets = dict(rule.targets)
    rows, total = len(manifest), max(len(manifest), 1)
    table = []
    for value in sorted(set(counts) | {value for value, share in rule.targets if share > 0}):
        count, target = int(counts.get(value, 0)), targets.get(value, 0.0)
        p_value = binomtest(count, rows, target).pvalue if rows and 0 < target < 1 else float(count == round(target * rows))
        table.append({rule.column: value, "count": count, "share": count / total, "target": target,
                      "p_value": float(p_value)})
    return pd.DataFrame(table, columns=[rule.column, "count", "share", "target", "p_value"])


def _manifest_expectations(gx: ModuleType, spec: GateSpec) -> list[Any]:
    E = gx.expectations
    expectations: list[Any] = [
        E.ExpectTableColumnsToMatchSet(column_set=list(spec.required_columns), exact_match=False),
        E.ExpectTableRowCountToBeBetween(min_value=spec.expected_rows[0], max_value=spec.expected_rows[1]),
    ]
    expectations += [E.ExpectColumnValuesToNotBeNull(column=column)
                     for column in spec.required_columns if column not in spec.nullable_columns]
    expectations += [E.ExpectColumnValuesToBeBetween(column=column, min_value=minimum)
                     for column, minimum in spec.column_minimums]
    expectations += [E.ExpectColumnValuesToBeUnique(column=column) for column in spec.unique_columns]
    expectations.append(E.ExpectColumnValueLengthsToBeBetween(
        column="caption", min_value=spec.caption_length[0], max_value=spec.caption_length[1]))
    if spec.image_size is not None:
        width, height = spec.image_size
        expectations += [E.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
                         E.ExpectColumnValuesToBeInSet(column="height", value_set=[height])]
    if spec.label_set is not None:
        expectations.append(E.ExpectColumnValuesToBeInSet(column="label", value_set=list(spec.label_set)))
    return expectations


def _share_expectations(gx: ModuleType, rule: ShareRule, significance: float | None) -> list[Any]:
    """No values outside the targets, and each value's count (absent ones included)
    consistent with its target share."""
    E = gx.expectations
    expected = [value for value, share in rule.targets if share > 0]
    expectations: list[Any] = [E.ExpectColumnValuesToBeInSet(column=rule.column, value_set=expected)]
    if significance is not None:
        per_value = significance / max(len(rule.targets), 1)
        expectations.append(E.ExpectColumnValuesToBeBetween(
            column="p_value",
            min_value=per_value,
            description=(f"each {rule.column}'s count is consistent with its target share "
                         f"(exact binomial test, significance {significance:g} over {len(rule.targets)} values)"),
        ))
    return expectations


def quality_row(quality: dict[str, dict[str, float]]) -> pd.DataFrame:
    """The dataset-level figures as a one-row table, one column per `<check>_<metric>`."""
    return pd.DataFrame([{f"{check}_{metric}": value for check, figures in quality.items()
                          for metric, value in figures.items()}])


def _quality_expectations(gx: ModuleType, limits: tuple[tuple[str, float | None, float | None], ...]) -> list[Any]:
    return [gx.expectations.ExpectColumnValuesToBeBetween(column=metric, min_value=low, max_value=high)
            for metric, low, high in limits]


def _ephemeral_context(gx: ModuleType, report_dir: Path) -> Any:
    """In-memory stores; the only thing written to disk is the Data Docs site in report_dir."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={DOCS_SITE: {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_checkpoint(gx: ModuleType, context: Any, table: str, frame: pd.DataFrame,
                    expectations: list[Any], result_format: dict[str, Any], run_id: Any) -> Any:
    """Validate one in-memory table through its own Checkpoint.

    One Checkpoint per table because a Checkpoint passes the same batch parameters (and a
    pandas dataframe asset takes its dataframe from them) to every validation it runs.
    """
    asset = context.data_sources.add_pandas(table).add_dataframe_asset(table)
    suite = context.suites.add(gx.ExpectationSuite(name=f"{table}_gate", expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(
        name=table, data=asset.add_batch_definition_whole_dataframe(table), suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{table}_gate",
        validation_definitions=[definition],
        result_format=result_format,
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    (validation,) = result.run_results.values()
    return validation


def _short(value: Any) -> str:
    """One example value as short text: trimmed repr, plain numbers, rows as key=value."""
    if isinstance(value, dict):  # a row of unexpected_index_list, e.g. {"label": "cat", "share": 0.8}
        return " ".join(f"{name}={_short(value[name])}" for name in sorted(value))
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    text = f"{value:.4g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _examples(values: list[Any]) -> str:
    return "[" + ", ".join(_short(value) for value in values[:_EXAMPLES_SHOWN]) + "]"


def _error(exception_info: dict[str, Any]) -> str | None:
    """The first error message; GX reports errors flat or keyed by the failing metric."""
    entries = [exception_info] if "raised_exception" in exception_info else exception_info.values()
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _observed(result: dict[str, Any]) -> str:
    """Short human text for one GX result dict: counts first, then a few examples."""
    if "element_count" in result and result.get("unexpected_count") is not None:
        text = f"{result['unexpected_count']} of {result['element_count']} rows unexpected"
        # unexpected_index_list (COMPLETE format) names rows by their index columns.
        examples = result.get("unexpected_index_list") or result.get("partial_unexpected_list")
        return text + f"; e.g. {_examples(examples)}" if examples else text
    if "partial_missing_list" in result:  # expect_column_distinct_values_to_equal_set
        return (f"{result['missing_count']} missing {_examples(result['partial_missing_list'])}, "
                f"{result['unexpected_count']} unexpected {_examples(result['partial_unexpected_list'])}")
    missing_columns = (result.get("details") or {}).get("mismatched", {}).get("missing")
    if missing_columns:  # expect_table_columns_to_match_set
        return f"{len(missing_columns)} missing {missing_columns}"
    return f"observed {_short(result.get('observed_value'))}"


def _outcomes(table: str, validation: Any) -> list[ExpectationOutcome]:
    outcomes = []
    for result in validation.results:
        config = result.expectation_config
        details = result.result or {}
        error = _error(result.exception_info or {})
        observed = f"error: {error}" if error else _observed(details)
        low, high = config.kwargs.get("min_value"), config.kwargs.get("max_value")
        if not error and not result.success and (low is not None or high is not None):
            allowed = " and ".join(f"{sign} {bound:g}" for sign, bound in (("≥", low), ("≤", high)) if bound is not None)
            observed += f" (allowed {allowed})"
        outcomes.append(ExpectationOutcome(
            expectation=config.type,
            table=table,
            column=config.kwargs.get("column"),
            success=bool(result.success),
            unexpected_count=details.get("unexpected_count"),
            element_count=details.get("element_count"),
            observed=observed,
        ))
    return outcomes


def validate_manifest(
    manifest: pd.DataFrame, spec: GateSpec, report_dir: Path, quality: pd.DataFrame | None = None
) -> GateResult:
    """Run the release gate; writes Data Docs (index.html) and result.json into report_dir.

    `quality` is the one-row table of dataset-level figures (`quality_row`) that
    `spec.metric_limits` apply to, so one GX report shows every check.
    """
    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    with _GX_LOCK:
        gx = _load_gx()
        from great_expectations.core.run_identifier import RunIdentifier

        context = _ephemeral_context(gx, report_dir)
        run_id = RunIdentifier(run_name=DOCS_SITE, run_time=dt.datetime.now(dt.timezone.utc))
        validations = {MANIFEST_TABLE: _run_checkpoint(
            gx, context, MANIFEST_TABLE, manifest, _manifest_expectations(gx, spec),
            {"result_format": "SUMMARY"}, run_id)}
        for rule in spec.shares:
            # A balance table has one row per value; index rows by value so a failure
            # names the skewed class (or source), not just its p-value.
            validations[rule.table] = _run_checkpoint(
                gx, context, rule.table, share_table(manifest, rule),
                _share_expectations(gx, rule, spec.share_significance),
                {"result_format": "COMPLETE", "unexpected_index_column_names": [rule.column, "share", "target"]}, run_id)
        if spec.metric_limits:
            validations[QUALITY_TABLE] = _run_checkpoint(
                gx, context, QUALITY_TABLE, quality if quality is not None else pd.DataFrame([{}]),
                _quality_expectations(gx, spec.metric_limits), {"result_format": "SUMMARY"}, run_id)
        # One site build renders every suite and both results, and the index that links them.
        context.build_data_docs(site_names=[DOCS_SITE])
        # get_context() made this context the process-wide current one, and its datasources
        # cache the batch: drop them so the manifest is not kept alive after the gate.
        for table in validations:
            context.data_sources.delete(table)

    outcomes = tuple(outcome for table, validation in validations.items()
                     for outcome in _outcomes(table, validation))
    success = all(validation.success for validation in validations.values())
    (report_dir / "result.json").write_text(json.dumps({
        "success": success,
        "validations": {table: validation.to_json_dict() for table, validation in validations.items()},
    }, indent=2))
    return GateResult(success=success, outcomes=outcomes, report_dir=report_dir)


if __name__ == "__main__":  # the gate process; run under the module's own name so its results unpickle
    from synthfactory.validation import _serve_one as serve

    serve()
