"""Process-wide defaults: where runtime state lives, offline switches, which S3 to use."""

from __future__ import annotations

import os
from pathlib import Path

#: no telemetry or update checks from any of the tools we drive (no network at run time)
OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the UI reads it too: no analytics calls from browsers
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",  # no upgrade prompts or marketing banners
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # per-file load bars; the shard progress bar is ours
    "PREFECT_LOGGING_EXTRA_LOGGERS": "synthfactory",  # our warnings (e.g. push retries) reach the run's logs
}


def apply_offline_defaults() -> None:
    """Set the defaults unless the user chose otherwise."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def data_dir() -> Path:
    """Git-ignored runtime state (embedded S3, scratch registry); $SYNTHFACTORY_DATA_DIR or ./.data."""
    return Path(os.environ.get("SYNTHFACTORY_DATA_DIR", ".data")).resolve()


def default_registry() -> str:
    """The data registry a deployment releases into: $SYNTHFACTORY_REGISTRY, else the working directory."""
    return os.environ.get("SYNTHFACTORY_REGISTRY") or "."


def embedded_s3_dir() -> Path:
    return data_dir() / "seaweedfs"


def storage_configured() -> bool:
    """Has the user pointed us at an S3 of their own (env vars or env file)?"""
    from synthfactory.storage import EXPLICIT_VARS

    return any(os.environ.get(name) for name in EXPLICIT_VARS)


def resolve_storage():  # -> StorageConfig
    """S3 settings from the environment / env file, else the running embedded server."""
    from synthfactory.s3server import daemon_config
    from synthfactory.storage import StorageConfig, StorageError

    if storage_configured():
        return StorageConfig.from_env()
    embedded = daemon_config(embedded_s3_dir())
    if embedded is not None:
        return embedded
    raise StorageError(
        "no S3 storage configured: set SYNTHFACTORY_S3_ENDPOINT, SYNTHFACTORY_S3_BUCKET, "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or SYNTHFACTORY_ENV_FILE), "
        "or start the embedded server with `synthfactory s3 start`"
    )


def dvc_remote_config() -> dict[str, str]:
    """The DVC remote settings of this environment's S3 (endpoint, region, credentials), for
    reading this registry's releases; empty when none is configured (DVC's cache may
    still hold every object). Never for another party's repository: they are our keys."""
    from synthfactory.storage import StorageError

    try:
        storage = resolve_storage()
    except StorageError:
        return {}
    config = {"url": storage.remote_url, "region": storage.region}  # the url too: never the one a commit names
    if storage.endpoint_url:
        config["endpointurl"] = storage.endpoint_url
    if storage.access_key and storage.secret_key:
        config.update(access_key_id=storage.access_key, secret_access_key=storage.secret_key)
    return config
