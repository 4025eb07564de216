"""Shared fixtures: a real SeaweedFS S3 server and a real Prefect API for the session.

The offline defaults are applied before anything imports Prefect, DVC, Great
Expectations or Hugging Face, so test runs stay offline and send no telemetry.
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synthfactory.settings import apply_offline_defaults

apply_offline_defaults()

import pytest  # noqa: E402
import yaml  # noqa: E402

from synthfactory.s3server import EmbeddedS3  # noqa: E402
from synthfactory.storage import EXPLICIT_VARS, PREFIX_VAR, REGION_VARS, SECRET_KEY_VAR, StorageConfig  # noqa: E402


#: fixtures that start servers (S3, Prefect): a test using one is slow, and `make test-fast` leaves it out
SERVER_FIXTURES = frozenset({"s3", "storage_env", "prefect", "own_s3"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep Prefect's database and any tool state out of the user's home and checkout;
    at the end, stop the local Prefect server the session's runs started there."""
    from synthfactory.local_api import stop_local_api

    home = tmp_path_factory.mktemp("home")
    storage = (*EXPLICIT_VARS, SECRET_KEY_VAR, PREFIX_VAR, *REGION_VARS)  # a developer's own S3 stays out
    saved = {name: os.environ.get(name) for name in ("PREFECT_HOME", "SYNTHFACTORY_DATA_DIR", "PREFECT_API_URL", *storage)}
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["SYNTHFACTORY_DATA_DIR"] = str(home / "data")
    for name in ("PREFECT_API_URL", *storage):
        os.environ.pop(name, None)
    yield
    stop_local_api(home / "prefect")
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageConfig]:
    """One embedded SeaweedFS S3 server on free ports for the whole session, so tests never
    touch a user's running server; yields its settings (fresh random credentials)."""
    with EmbeddedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server.config


@pytest.fixture
def storage_env(s3: StorageConfig, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> StorageConfig:
    """Point the factory at the session's S3 through the environment, as a user would,
    with a key prefix of the test's own so tests never see each other's objects."""
    prefix = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:60].strip("-")
    monkeypatch.setenv("SYNTHFACTORY_S3_ENDPOINT", s3.endpoint_url)
    monkeypatch.setenv("SYNTHFACTORY_S3_BUCKET", s3.bucket)
    monkeypatch.setenv("SYNTHFACTORY_S3_PREFIX", prefix)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return StorageConfig.from_env()


@pytest.fixture(scope="session")
def prefect() -> Iterator[str]:
    """A real Prefect API: the local server a `synthfactory run` uses (its own SQLite
    database, migrated once per session), also for the CLI processes tests start; yields its URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.release import drain_prefect_workers
    from synthfactory.local_api import ensure_local_api

    api_url, _ = ensure_local_api()
    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings({PREFECT_API_URL: api_url}):
        yield api_url
        drain_prefect_workers()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def shapes_recipe(name: str = "tiny", **fields: Any) -> dict[str, Any]:
    """A small procedural-shapes recipe; `fields` replace its top-level fields."""
    return {
        "name": name,
        "samples": 240,
        "shard_size": 60,
        "seed": 7,
        "generator": {"kind": "procedural-shapes", "params": {"image_size": 32, "classes": ["circle", "square", "star"]}},
        "validation": {"caption_length": {"min": 10, "max": 200}, "min_accept_rate": 0.9},
        # threads: tests that are not about worker processes skip their start-up
        "execution": {"runner": "thread", "workers": 2, "retries": 2, "retry_backoff_s": 0.1},
        **fields,
    }


def write_recipe(path: Path, **fields: Any) -> Path:
    """Write `shapes_recipe` (named after the file unless `name` is given) to `path`."""
    path.write_text(yaml.safe_dump(shapes_recipe(**{"name": path.stem, **fields}), sort_keys=False))
    return path
