"""`synthfactory` command line: run, regenerate, validate, releases, pull, server, demo, tiny-models, s3."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from synthfactory import settings

if TYPE_CHECKING:
    from synthfactory.release.summary import RunSummary

settings.apply_offline_defaults()

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
s3_app = typer.Typer(no_args_is_help=True, help="The embedded SeaweedFS S3 server (for local use and demos).")
app.add_typer(s3_app, name="s3")
console = Console(stderr=True, soft_wrap=True)  # messages stay whole lines (grep-able, copy-able)
out = Console(soft_wrap=True)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
Debug = Annotated[bool, typer.Option("--debug", help="show the tracebacks of failures (default: one line each)")]


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print one error message (as is: no rich markup in it, so `[label='hexagon' …]` stays)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _git_root(path: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(proc.stdout.strip()) if proc.returncode == 0 else None


def _default_registry() -> Path:
    root = _git_root(Path.cwd())
    if root is None:
        raise _fail("not inside a git repository: pass --registry PATH (a git repo, created if missing)", EXIT_BAD_INPUT)
    return root


def _existing_registry(path: Path | None):
    from synthfactory.registry import DataRegistry, RegistryError

    try:
        return DataRegistry.existing(path or _default_registry())
    except RegistryError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None


def _release(recipe: Path, registry: Path, debug: bool = False, **options: object) -> "RunSummary":
    """Run the release flow, turning failures into one clear message (bad input: exit 2).
    The shard workers start before Prefect is imported: they warm up meanwhile."""
    from synthfactory.files import disk_full
    from synthfactory.models import ModelError
    from synthfactory.recipe import RecipeError
    from synthfactory.registry import RegistryError, RegistryPathError
    from synthfactory.release.build import ShardFailedError
    from synthfactory.release.cost import BudgetExceededError
    from synthfactory.release.gate import GateFailedError
    from synthfactory.release.job import ReleaseRequest, prepare_started
    from synthfactory.storage import StorageError

    try:
        overrides = tuple(options.pop("overrides", None) or ())  # type: ignore[arg-type]
        job = prepare_started(ReleaseRequest(str(recipe), str(registry), overrides=overrides, **options))  # type: ignore[arg-type]
        from flows.release import quiet_console, run_prepared

        if not debug:
            quiet_console()
        return run_prepared(job)
    except Exception as exc:
        if disk_full(exc):  # however deep: a DVC command's output, a shard worker's error
            where = getattr(exc, "filename", None) or registry
            raise _fail(f"no space left on device (writing under {where}) while releasing {recipe}: free space there, "
                        "then rerun: finished shards are kept and the rerun resumes from them") from None
        if isinstance(exc, (RecipeError, ModelError, RegistryPathError)):
            raise _fail(str(exc), EXIT_BAD_INPUT) from None
        if isinstance(exc, PermissionError):  # a registry or recipe this user may not write or read
            raise _fail(f"permission denied: {exc.filename or exc}: check the owner and mode of that path",
                        EXIT_BAD_INPUT) from None
        if isinstance(exc, (StorageError, GateFailedError, ShardFailedError, RegistryError, BudgetExceededError)):
            raise _fail(str(exc)) from None
        # a crashed worker, a bug: its traceback is in the run's logs (and with --debug, here)
        raise _fail(f"release of {recipe} failed: {type(exc).__name__}: {exc}") from None


def _print_summary(summary: "RunSummary") -> None:
    if summary.up_to_date:
        out.print(f"[bold green]{escape(str(summary.tag))}[/] is current: it was made from these inputs "
                  "(recipe, files, code); nothing new tagged (--force releases again)", highlight=False)
        return
    out.print(
        f"[bold green]{escape(summary.tag or 'staged (not published)')}[/]: {summary.samples} samples, "
        f"{summary.rejected} rejected, {summary.retries} shard retries, "
        f"{summary.samples_per_s} samples/s ({summary.shards_generated} shards generated, "
        f"{summary.shards_reused} reused) -> {escape(summary.release_dir)}",
        highlight=False,
    )
    if summary.usage:
        out.print(f"cost and usage: {escape(summary.usage)}", highlight=False, soft_wrap=True)
    if summary.store and summary.tag:
        out.print(f"pushed to {escape(summary.store)}", highlight=False)
    if summary.report_url:
        out.print(f"report ({summary.report_expires}): {escape(summary.report_url)}", highlight=False, soft_wrap=True)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    samples: Annotated[Optional[int], typer.Option(help="override the recipe's sample count")] = None,
    seed: Annotated[Optional[int], typer.Option(help="override the recipe's seed")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="data registry repo (default: this git repo)")] = None,
    publish: Annotated[bool, typer.Option(help="push to S3, commit and tag (off: stage into data/ only)")] = True,
    workers: Annotated[Optional[int], typer.Option(min=1, help="parallel shard processes")] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="override a recipe field: FIELD.PATH=VALUE (YAML value), repeatable"),
    ] = None,
    dask_address: Annotated[
        Optional[str], typer.Option(help="run the shards on this Dask scheduler, e.g. tcp://10.0.0.5:8786")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="release even if the latest release has these inputs")] = False,
    debug: Debug = False,
) -> None:
    """Generate -> validate -> publish a release of RECIPE (a rerun resumes from finished shards;
    inputs equal to the latest release's report it as current and tag nothing)."""
    from synthfactory.validation import prefetch_gx

    prefetch_gx()  # GX imports on another core while the run starts and generates
    summary = _release(recipe, registry or _default_registry(), debug, samples=samples, seed=seed, publish=publish,
                       workers=workers, overrides=overrides, dask_address=dask_address, force=force)
    _print_summary(summary)


@app.command()
def validate(release_dir: Annotated[Path, typer.Argument(help="a release directory, e.g. data/shapes")]) -> None:
    """Re-check a release: shard bytes against the manifest hashes, then the GX gate."""
    from synthfactory.recipe import RecipeError, load_recipe
    from synthfactory.release.gate import gate_spec
    from synthfactory.release.verify import MANIFEST_DAMAGED, verify_release
    from synthfactory.shards import MANIFEST_DIR, has_manifest, read_manifest
    from synthfactory.validation import manifest_frame, validate_manifest

    try:
        recipe = load_recipe(release_dir / "recipe.yaml")
    except RecipeError as exc:
        raise _fail(f"{release_dir} is not a release directory: {exc}", EXIT_BAD_INPUT) from None
    if not has_manifest(release_dir):
        raise _fail(f"{release_dir} has no manifest ({MANIFEST_DIR}/)", EXIT_BAD_INPUT)
    checked, problems = verify_release(release_dir)
    damaged = [problem for problem in problems if problem.startswith(MANIFEST_DAMAGED)]
    if damaged:
        raise _fail(f"{release_dir}: {damaged[0]}; pull the release again", EXIT_FAILED)
    for problem in problems[:20]:
        console.print(f"[red]{escape(problem)}[/]", highlight=False)
    report_dir = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-validation-"))
    gate = validate_manifest(manifest_frame(read_manifest(release_dir)), gate_spec(recipe), report_dir)
    out.print(f"{checked} samples match the manifest, {len(problems)} problems; gate: {len(gate.outcomes)} expectations, "
              f"{len(gate.failures)} failed (report: {report_dir / 'index.html'})", highlight=False)
    if not gate.success:
        out.print(gate.summary(), highlight=False)
    if problems or not gate.success:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def releases(
    dataset: Annotated[Optional[str], typer.Argument(help="only this dataset")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="data registry repo (default: this git repo)")] = None,
) -> None:
    """List releases (tags) with sample counts and key metrics."""
    rows = _existing_registry(registry).releases(dataset)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  caption="rej.: rejected samples; label H: normalised label entropy; distinct: distinct-caption ratio")
    table.add_column("tag", no_wrap=True)
    table.add_column("date", no_wrap=True)
    for header in ("samples", "rej.", "accept", "label H", "distinct", "gate"):
        table.add_column(header, justify="right", min_width=len(header), no_wrap=True)
    for r in rows:
        m = r.metrics
        gate = m.get("validation", {})
        table.add_row(
            r.tag, r.date[:10], str(m.get("samples", "?")), str(m.get("rejected", "?")),
            str(m.get("accept_rate", "?")), str(m.get("label_entropy_norm", "-")),
            str(m.get("distinct_caption_ratio", "-")),
            {True: "passed", False: "failed"}.get(gate.get("success"), "?"),
        )
    out.print(table if rows else f"no releases{f' of {dataset}' if dataset else ''} yet")


@app.command()
def pull(
    release: Annotated[str, typer.Argument(help="DATASET or DATASET@vN (default: latest)")],
    to: Annotated[Optional[Path], typer.Option(help="target directory (default: ./<dataset>)")] = None,
    registry: Annotated[Optional[str], typer.Option(help="registry path or git URL (default: this git repo)")] = None,
) -> None:
    """Download a release with `dvc get` (no clone needed), using the configured S3 credentials."""
    from synthfactory.registry import RegistryError, dvc_get
    from synthfactory.storage import StorageError
    from synthfactory.tags import ReleaseTag

    tag = ReleaseTag.parse(release)
    dataset = tag.dataset if tag else release
    local = registry is None or Path(registry).exists()
    source = str(_existing_registry(Path(registry) if registry else None).root) if local else registry
    if tag is None:
        known = _existing_registry(Path(source)).release_tags(dataset) if local else []
        if not known:
            raise _fail(f"no releases of {dataset!r} in {source}; give DATASET@vN", EXIT_BAD_INPUT)
        tag = known[-1]
    target = to or Path(dataset)
    if target.exists():
        raise _fail(f"{target} already exists: choose another --to", EXIT_BAD_INPUT)
    try:
        dvc_get(source, f"data/{dataset}", str(tag), target, settings.resolve_storage())
    except (StorageError, RegistryError) as exc:
        raise _fail(str(exc)) from None
    out.print(f"pulled {tag} into {target}")


@app.command()
def regenerate(
    recipes: Annotated[Optional[list[Path]], typer.Argument(help="recipes to consider (default: recipes/*.yaml)")] = None,
    since: Annotated[Optional[str], typer.Option(help="only recipes whose inputs changed since this git ref")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="data registry repo (default: this git repo)")] = None,
    dry_run: Annotated[bool, typer.Option(help="list what would be released, release nothing")] = False,
    push: Annotated[bool, typer.Option(help="push the branch and new tags when the registry has the remote")] = True,
    remote: Annotated[str, typer.Option(help="git remote to push to")] = "origin",
    debug: Debug = False,
) -> None:
    """Release the recipes whose inputs (recipe, files it reads, plug-in code) changed since
    their latest release, then push commits and tags: what CI runs on a push to main."""
    from synthfactory.recipe import RecipeError
    from synthfactory.registry import RegistryError
    from synthfactory.release.regenerate import decide, recipe_paths

    repo = _existing_registry(registry)
    try:
        decisions = decide(repo, [p.resolve() for p in recipes] if recipes else recipe_paths(repo), since)
    except (RecipeError, RegistryError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("recipe", "dataset", "action", "why"):
        table.add_column(header)
    for d in decisions:
        table.add_row(str(d.recipe.relative_to(repo.root) if d.recipe.is_relative_to(repo.root) else d.recipe),
                      d.dataset, "release" if d.stale else "skip", d.reason)
    out.print(table)
    if dry_run:
        return
    tags, failures = [], []
    for d in (d for d in decisions if d.stale):
        try:
            summary = _release(d.recipe, repo.root, debug)
        except typer.Exit:  # _release printed why; go on with the other recipes
            failures.append(d.dataset)
            continue
        _print_summary(summary)
        tags.append(summary.tag)
    if tags and push and remote in repo.remotes():
        try:
            repo.push(remote, tags)
        except RegistryError as exc:
            raise _fail(f"released {', '.join(tags)} but could not push them: {exc}") from None
        out.print(f"pushed {', '.join(tags)} to {remote}")
    if failures:
        raise _fail(f"{len(failures)} of {len(failures) + len(tags)} releases failed: {', '.join(failures)}")


@app.command("tiny-models")
def tiny_models(
    target: Annotated[Path, typer.Argument(help="directory to write llm/, clip/, sd/ and svd/ into")],
) -> None:
    """Write tiny random-weight LLM, CLIP, Stable Diffusion and Stable Video Diffusion models
    (no download), to try the model recipes offline on CPU; prints the --set flags that point
    recipes/synclr.yaml and recipes/worldmodel.yaml at them."""
    from synthfactory.tinymodels import write_all

    paths = write_all(target)
    out.print(f"wrote tiny models to {target.resolve()}; try:", highlight=False)
    flags = [
        f"--set generator.params.model={paths['sd'].resolve()}",
        f"--set generator.params.captions.params.model={paths['llm'].resolve()}",
        f"--set checks.0.params.model={paths['clip'].resolve()}",
        "--set generator.params.height=64 --set generator.params.width=64 --set generator.params.steps=4",
        "--set validation.caption_length.min=1 --set validation.min_accept_rate=0.1",
    ]
    out.print("  synthfactory run recipes/synclr.yaml --samples 16 --no-publish \\\n    " + " \\\n    ".join(flags),
              highlight=False, soft_wrap=True)
    world = [
        f"--set generator.params.model={paths['svd'].resolve()}",
        "--set generator.params.num_frames=4 --set generator.params.steps=2",
        "--set 'generator.params.clips.params.env_kwargs.config={screen_width: 128, screen_height: 64}'",
        "--set checks.0.params.max_flicker=null --set checks.0.params.max_frozen_fraction=1.0",
        "--set validation.min_accept_rate=0.3",
    ]
    out.print("  synthfactory run recipes/worldmodel.yaml --samples 8 --no-publish \\\n    " + " \\\n    ".join(world),
              highlight=False, soft_wrap=True)


@app.command()
def demo(
    samples: Annotated[Optional[int], typer.Option(help="override the demo recipe's sample count")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="scratch registry (default: <data dir>/registry)")] = None,
    debug: Debug = False,
) -> None:
    """The main job on embedded defaults: local S3 + local Prefect -> a release in a scratch clone.

    The release goes into a scratch clone of this repo, never into the checkout itself,
    then is pulled back from S3 into a fresh clone and re-hashed to prove the round trip.
    """
    import shutil

    import synthfactory
    from synthfactory.registry import dvc_executable
    from synthfactory.release.verify import verify_release
    from synthfactory.s3server import daemon_config, start_daemon, stop_daemon
    from synthfactory.storage import StorageError

    factory = Path(synthfactory.__file__).resolve().parent.parent
    recipe = factory / "recipes" / "shapes.yaml"
    if not (factory / ".git").exists() or not recipe.exists():
        raise _fail(f"the demo runs from a synthfactory checkout; {factory} is not one", EXIT_BAD_INPUT)
    registry = registry or settings.data_dir() / "registry"
    s3_dir = settings.embedded_s3_dir()
    started_here = False
    if not settings.storage_configured():
        started_here = daemon_config(s3_dir) is None
        try:
            config = start_daemon(s3_dir)
        except StorageError as exc:
            raise _fail(str(exc)) from None
        console.print(f"embedded S3 (SeaweedFS) at {config.endpoint_url}, bucket {config.bucket}; data in {s3_dir}")
    if not registry.exists():
        subprocess.run(["git", "clone", "--quiet", str(factory), str(registry)], check=True)
    check_dir = Path(tempfile.mkdtemp(prefix="synthfactory-pull-"))
    try:
        summary = _release(recipe, registry, debug, samples=samples)
        _print_summary(summary)
        tag, dataset = summary.tag, summary.dataset
        env = {**os.environ, **settings.resolve_storage().subprocess_env()}
        subprocess.run(["git", "clone", "--quiet", "--branch", tag, str(registry), str(check_dir / "clone")], check=True, capture_output=True)
        subprocess.run([dvc_executable(), "pull", "--quiet"], cwd=check_dir / "clone", env=env, check=True)
        checked, problems = verify_release(check_dir / "clone" / "data" / dataset)
        if problems:
            raise _fail(f"pulled release does not match its manifest: {problems[:3]}")
        out.print(f"verified: fresh clone at {tag} + dvc pull restored {checked} samples, byte-identical to the manifest")
    finally:
        shutil.rmtree(check_dir, ignore_errors=True)
        if started_here:
            stop_daemon(s3_dir)
    out.print(
        "\n[bold]Pull it yourself[/] (start the embedded S3 again first):\n"
        f"  make s3-start\n"
        f"  set -a; . {s3_dir / 's3.env'}; set +a\n"
        f"  git clone {registry} {dataset}-release && cd {dataset}-release && git checkout {tag} && dvc pull\n"
        f"  # or: dvc get {registry} data/{dataset} --rev {tag}\n"
        f"  # or: synthfactory pull {tag} --registry {registry}",
        highlight=False,
    )


@app.command()
def server(
    host: Annotated[
        str, typer.Option(help="interface the Prefect server listens on; beyond loopback only with PREFECT_SERVER_API_AUTH_STRING set (basic auth)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port of the Prefect API and UI")] = 4200,
    api_url: Annotated[
        Optional[str], typer.Option(help="use this running Prefect API (e.g. http://host:4200/api) instead of starting a server")
    ] = None,
    registry: Annotated[
        Optional[Path],
        typer.Option(envvar="SYNTHFACTORY_REGISTRY", help="registry the worker releases into (default: <data dir>/registry, a scratch clone of this repo)"),
    ] = None,
    prefect_file: Annotated[Optional[Path], typer.Option(help="deployments to apply (default: this checkout's prefect.yaml)")] = None,
    worker: Annotated[bool, typer.Option(help="run a process worker here (off: workers run elsewhere)")] = True,
) -> None:
    """A local Prefect server with every recipe deployed from prefect.yaml (schedules and
    parameters in the UI), the embedded S3 and a worker; Ctrl-C stops them all."""
    import synthfactory
    from synthfactory.server import ServerError, ServerInputError, Stack, serve

    factory = Path(synthfactory.__file__).resolve().parent.parent
    if not (factory / ".git").exists():
        raise _fail(f"the server runs flows from a synthfactory checkout; {factory} is not one", EXIT_BAD_INPUT)
    here = _git_root(Path.cwd())
    if here is not None and here.resolve() != factory and (here / "prefect.yaml").is_file() and (here / "synthfactory").is_dir():
        raise _fail(
            f"started in the synthfactory checkout {here.resolve()}, but this synthfactory is installed from {factory}: "
            f"its worker would run {factory}'s code and recipes. Start {here.resolve()}'s own "
            f"(`make server` there), or start this one in {factory}", EXIT_BAD_INPUT)
    stack = Stack(
        checkout=factory,
        prefect_file=(prefect_file or factory / "prefect.yaml").resolve(),
        registry=(registry or settings.data_dir() / "registry").resolve(),
        host=host, port=port, remote_api=api_url, run_worker=worker,
    )
    try:
        serve(stack, say=lambda line: out.print(line, highlight=False, markup=False))
    except ServerInputError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    except ServerError as exc:
        raise _fail(str(exc)) from None


@s3_app.command("start")
def s3_start() -> None:
    """Start the embedded S3 server in the background (data and credentials in the data dir)."""
    from synthfactory.s3server import start_daemon
    from synthfactory.storage import StorageError

    try:
        config = start_daemon(settings.embedded_s3_dir())
    except StorageError as exc:
        raise _fail(str(exc)) from None
    out.print(f"S3 at {config.endpoint_url}, bucket {config.bucket}; credentials in {settings.embedded_s3_dir() / 's3.env'}")


@s3_app.command("stop")
def s3_stop() -> None:
    """Stop the embedded S3 server (its data stays)."""
    from synthfactory.s3server import stop_daemon

    out.print("stopped" if stop_daemon(settings.embedded_s3_dir()) else "not running")


@s3_app.command("status")
def s3_status() -> None:
    from synthfactory.s3server import daemon_config

    config = daemon_config(settings.embedded_s3_dir())
    out.print(f"running at {config.endpoint_url}, bucket {config.bucket}" if config else "not running")
    if config is None:
        raise typer.Exit(EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
