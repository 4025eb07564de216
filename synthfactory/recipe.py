"""Declarative recipes: YAML -> typed, validated model.

Every problem in a recipe is reported before any work starts, as one message with one
line per problem naming the field (``generator.params.image_size: must be ≥ 16, got 0``).
Generator params are validated by the generator's own `Params` model and stored with
their defaults filled in, so the recipe saved with a release states every setting used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from synthfactory.checks import CHECKS
from synthfactory.generators import GENERATORS, Generator
from synthfactory.generators.inputs import RECIPE_DIR
from synthfactory.plugins import PluginSpec, Registry, UnknownPluginError


class RecipeError(ValueError):
    """A recipe that cannot run; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthRange(_Strict):
    min: int = Field(1, ge=0)
    max: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "LengthRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ValidationSettings(_Strict):
    caption_length: LengthRange = LengthRange()
    share_significance: float | None = Field(
        0.001, gt=0, lt=0.5,
        description=("significance level of the test that each label (or mix source) holds its target share; "
                     "a fair generator passes at any size, a skew fails once the rows can show it; null disables"),
    )
    min_accept_rate: float = Field(
        0.95, ge=0, le=1, description="accepted / planned samples below this fails the gate"
    )


class Faults(_Strict):
    """Fault injection for tests and drills: shard attempts that fail with a transient error."""

    fail_attempts: int = Field(0, ge=0, le=100, description="the first N attempts of each chosen shard fail")
    fail_rate: float = Field(0.0, ge=0, lt=1, description="fraction of other attempts that fail (deterministic)")
    shards: tuple[int, ...] | None = Field(None, description="shard indices to fail; default all")


#: fields whose value may carry a credential (a URL with user:password@, a key pasted where
#: its variable's name belongs): errors name them but never echo the value
SECRET_BEARING_FIELDS = frozenset({"base_url", "api_key_env"})

#: bounds shared with the release flow's parameters (the deployment form checks them)
MAX_SAMPLES = 1_000_000_000
MAX_SEED = 2**63 - 1
MAX_WORKERS = 1024
DASK_ADDRESS_PATTERN = r"^(tcp|tls|inproc|ucx)://\S+$"


class Execution(_Strict):
    """How the flow runs shards: parallel workers and retries with exponential backoff."""

    runner: Literal["process", "thread", "dask"] = Field(
        "process", description="where shards run: a local process pool, threads, or a Dask cluster"
    )
    workers: int | None = Field(
        None, ge=1, le=MAX_WORKERS, description="parallel shards; default: CPU count (dask: local cluster size)"
    )
    dask_address: str | None = Field(
        None, pattern=DASK_ADDRESS_PATTERN,
        description="scheduler of an existing Dask cluster (runner: dask); default: a local cluster",
    )
    retries: int = Field(3, ge=0, le=20)
    retry_backoff_s: float = Field(1.0, ge=0, le=600, description="first retry delay; doubles each retry")
    max_unread_shards: int | None = Field(
        None, ge=1, description="pause generation while a live reader is this many shards behind"
    )

    def retry_delays(self) -> list[float]:
        return [self.retry_backoff_s * 2**attempt for attempt in range(self.retries)]


class Prices(_Strict):
    """What generating costs, for the release's cost figures and `budget_usd`: token prices
    of a served or hosted model, and the hourly price of a local accelerator."""

    usd_per_million_input_tokens: float = Field(0.0, ge=0, le=1e6)
    usd_per_million_output_tokens: float = Field(0.0, ge=0, le=1e6)
    usd_per_gpu_hour: float = Field(0.0, ge=0, le=1e6)


#: a generator kind, a model id or a local model path; a release tag or any dataset name
MAKER_OR_DATA = r"^\S{1,256}$"


class LineageModel(_Strict):
    """A model (or generator) that made this release, and what it was trained on."""

    name: str = Field(pattern=MAKER_OR_DATA, description="a generator kind or model id the recipe runs")
    trained_on: tuple[Annotated[str, Field(pattern=MAKER_OR_DATA)], ...] = Field(
        (), max_length=64,
        description="releases of this registry (digits@v1: their depth counts) or other datasets (real: depth 0)",
    )


class Lineage(_Strict):
    """Where the data's makers came from: a model trained on a synthetic release makes the
    next generation (depth 2); diversity tends to fall generation after generation."""

    models: tuple[LineageModel, ...] = Field((), max_length=64)
    warn_depth: int | None = Field(2, ge=1, le=100, description="warn from this synthetic generation depth on")
    max_depth: int | None = Field(None, ge=0, le=100, description="refuse a release deeper than this")
    max_diversity_drop: float | None = Field(
        None, ge=0, le=1, description="refuse a diversity figure more than this fraction below a parent release's"
    )


#: the most shards one recipe may plan: every shard has a plan and a cache key held in
#: memory for the run (about 270 bytes each), and one task run
MAX_SHARDS = 100_000


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="dataset name, used in paths and tags")
    description: str = ""
    generator: PluginSpec
    checks: tuple[PluginSpec, ...] = Field((), description="per-sample checks run right after generation")
    samples: int = Field(ge=1, le=MAX_SAMPLES)
    shard_size: int = Field(1000, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    validation: ValidationSettings = ValidationSettings()
    execution: Execution = Execution()
    faults: Faults = Faults()
    cost: Prices = Prices()
    budget_usd: float | None = Field(
        None, gt=0, le=1e9, description="stop generating (finished shards kept) once the release has cost this much"
    )
    lineage: Lineage = Lineage()
    #: where the recipe was read from: real-data paths in its params resolve against it.
    #: Private, so it is in no dump, fingerprint or released recipe (those stay portable)
    _recipe_dir: Path | None = PrivateAttr(None)

    @property
    def recipe_dir(self) -> Path | None:
        return self._recipe_dir

    @property
    def shard_count(self) -> int:
        return -(-self.samples // self.shard_size)

    @model_validator(mode="after")
    def _bounded(self) -> "Recipe":
        if self.shard_count > MAX_SHARDS:
            raise ValueError(
                f"samples {self.samples} in shards of shard_size {self.shard_size} make {self.shard_count} shards, "
                f"more than {MAX_SHARDS}: raise shard_size"
            )
        return self

    def input_files(self) -> list[str]:
        """Files the recipe's plug-ins read, relative to the recipe (params `file` / `*_file`)."""
        found: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if (key == "file" or key.endswith("_file")) and isinstance(value, str):
                        found.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list | tuple):
                for item in node:
                    walk(item)

        walk([self.generator.params, *(check.params for check in self.checks)])
        return sorted(set(found))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(error: dict[str, Any]) -> str:
    """Pydantic error -> 'must be ≥ 16, got 0' style text."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    phrases = {
        "greater_than_equal": lambda: f"must be ≥ {ctx['ge']}",
        "greater_than": lambda: f"must be > {ctx['gt']}",
        "less_than_equal": lambda: f"must be ≤ {ctx['le']}",
        "less_than": lambda: f"must be < {ctx['lt']}",
        "missing": lambda: "is required",
        "extra_forbidden": lambda: "is not a known field",
        "string_pattern_mismatch": lambda: f"must match {ctx['pattern']}",
    }
    if kind in phrases:
        text = phrases[kind]()
    else:
        text = error["msg"].removeprefix("Value error, ")
    secret_bearing = any(str(part) in SECRET_BEARING_FIELDS for part in error.get("loc", ()))
    if kind not in ("missing", "extra_forbidden") and not isinstance(value, dict) and not secret_bearing:
        text += f", got {value!r}"
    return text


def _field_lines(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in (*prefix, *item["loc"])) or "recipe"
        lines.append(f"{location}: {_describe(item)}")
    return lines


def _plugin_spec(
    registry: Registry[Any], spec: Any, loc: tuple[str | int, ...], context: dict[str, Any]
) -> tuple[PluginSpec | None, list[str]]:
    """Validate a {kind, params} spec with the plug-in's own Params model: (resolved spec, error lines).

    A chained generator's upstream spec (e.g. text-to-image's `captions`) is resolved the
    same way, so its errors name the full path.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        return None, []  # the Recipe model reports the missing/ill-typed kind
    try:
        cls = registry.get(spec["kind"])
    except UnknownPluginError as exc:
        return None, [f"{'.'.join(map(str, loc))}.kind: {exc}"]
    raw = dict(spec.get("params") or {})
    lines: list[str] = []
    upstream = getattr(cls, "upstream", None)
    if upstream and upstream in raw:
        resolved, lines = _plugin_spec(registry, raw[upstream], (*loc, "params", upstream), context)
        raw[upstream] = resolved.model_dump() if resolved else raw[upstream]
    try:
        params = cls.Params.model_validate(raw, context=context)
    except ValidationError as exc:
        return None, lines + _field_lines(exc, (*loc, "params"))
    if lines:
        return None, lines
    return PluginSpec(kind=spec["kind"], params=params.model_dump(mode="json")), []


def parse_recipe(data: Any, source: str = "recipe", recipe_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; raise RecipeError listing every bad field.

    Files named in plug-in params are read relative to `recipe_dir` (default: cwd).
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    context = {RECIPE_DIR: recipe_dir or Path.cwd()}
    generator, lines = _plugin_spec(GENERATORS, data.get("generator"), ("generator",), context)
    checks = []
    for i, spec in enumerate(data.get("checks") or []):
        check, check_lines = _plugin_spec(CHECKS, spec, ("checks", i), context)
        checks.append(check)
        lines += check_lines
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = _field_lines(exc) + lines
    if generator is not None and recipe is not None and not lines:
        try:  # a source the plan counts may be unreadable: that too is the recipe's problem (exit 2)
            built = GENERATORS.get(generator.kind).from_params(generator.params)
            built.recipe_dir = context[RECIPE_DIR]
            lines += _needs_images(built, checks) + built.plan_problems(recipe.samples)
        except ValueError as exc:
            lines.append(f"generator.params: {exc}")
    if lines or recipe is None or generator is None:
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines))
    resolved = recipe.model_copy(update={"generator": generator, "checks": tuple(checks)})
    resolved._recipe_dir = context[RECIPE_DIR]
    return resolved


def _needs_images(generator: Generator, checks: list[PluginSpec | None]) -> list[str]:
    if generator.image_size() is not None:
        return []
    return [
        f"checks.{i}.kind: {spec.kind} scores images, but generator {generator.plugin_name} makes none"
        for i, spec in enumerate(checks)
        if spec is not None and CHECKS.get(spec.kind).needs_images
    ]


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`a.b.0.c=value` (value parsed as YAML) sets a nested recipe field, as `--set` does."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r}: expected FIELD.PATH=VALUE")
    keys = path.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"--set {path}: {'.'.join(keys[:depth]) or 'recipe'} has no item {key}")
            key = int(key)  # type: ignore[assignment]
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {path}: {'.'.join(keys[:depth])} is not a mapping")
        if last:
            try:
                node[key] = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise RecipeError(f"--set {path}: the value {text!r} is not valid YAML: {problem}") from None
        else:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})


def load_recipe(
    path: str | Path,
    *,
    samples: int | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
) -> Recipe:
    """Read a YAML recipe, apply CLI overrides (`--samples`, `--seed`, `--set`), validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}:{where}: not valid YAML: {problem}") from None
    if isinstance(data, dict):
        if samples is not None:
            data["samples"] = samples
        if seed is not None:
            data["seed"] = seed
        for assignment in overrides:
            apply_override(data, assignment)
    return parse_recipe(data, str(path), path.resolve().parent)
