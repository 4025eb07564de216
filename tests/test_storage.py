"""Storage settings, bucket checks and the embedded S3 server, against a real server."""

import dataclasses
import io
import os
import secrets
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest

from synthfactory.daemons import free_ports
from synthfactory.s3server import ENV_FILE, PID_FILE, EmbeddedS3, daemon_config, start_daemon, stop_daemon
from synthfactory.storage import StorageConfig, StorageError, ensure_bucket, minio_client


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat_file = Path(f"/proc/{pid}/stat")
    return stat_file.exists() and stat_file.read_text().rpartition(")")[2].split()[0] == "Z"


def test_ensure_bucket_creates_missing_bucket_and_cleans_up_probe(s3: StorageConfig) -> None:
    cfg = dataclasses.replace(s3, bucket=f"fresh-{uuid.uuid4().hex[:12]}")
    client = minio_client(cfg)
    assert not client.bucket_exists(cfg.bucket)

    ensure_bucket(cfg)
    ensure_bucket(cfg)  # idempotent once the bucket exists

    assert client.bucket_exists(cfg.bucket)
    assert list(client.list_objects(cfg.bucket, recursive=True)) == []


def test_wrong_secret_key_names_the_variables_and_hides_the_secret(s3: StorageConfig) -> None:
    wrong_secret = "wrong-" + secrets.token_hex(16)
    cfg = dataclasses.replace(s3, secret_key=wrong_secret)

    with pytest.raises(StorageError) as caught:
        ensure_bucket(cfg)

    message = str(caught.value)
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert s3.endpoint_url in message and s3.bucket in message
    for secret in (wrong_secret, s3.secret_key):
        assert secret not in message
        assert secret not in repr(cfg)


def test_missing_credentials_fail_before_any_request() -> None:
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        ensure_bucket(cfg)


def test_unreachable_endpoint_fails_fast() -> None:
    (port,) = free_ports(1)
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key="key", secret_key="secret")

    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        ensure_bucket(cfg)

    assert time.monotonic() - started < 10
    assert "connection refused" in str(caught.value) and cfg.endpoint_url in str(caught.value)


def test_from_env_prefers_environment_over_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "storage.env"
    env_file.write_text(
        "# settings for the team bucket\n"
        "SYNTHFACTORY_S3_ENDPOINT=http://file-host:9000\n"
        "export SYNTHFACTORY_S3_BUCKET='file-bucket'\n"
        'AWS_ACCESS_KEY_ID="file-key"\n'
        "AWS_SECRET_ACCESS_KEY=file-secret\n"
        "AWS_REGION=eu-west-1\n"
    )
    environ = {
        "SYNTHFACTORY_ENV_FILE": str(env_file),
        "SYNTHFACTORY_S3_ENDPOINT": "https://env-host:8443/",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "SYNTHFACTORY_S3_BUCKET": "",  # empty counts as unset: the file's value applies
    }

    cfg = StorageConfig.from_env(environ)

    assert cfg == StorageConfig(
        endpoint_url="https://env-host:8443",
        bucket="file-bucket",
        prefix="dvcstore",
        access_key="env-key",
        secret_key="env-secret",
        region="eu-west-1",
    )
    assert cfg.remote_url == "s3://file-bucket/dvcstore"
    assert StorageConfig.from_env({}, env_file=env_file).access_key == "file-key"
    assert StorageConfig.from_env({}) == StorageConfig()
    assert cfg.subprocess_env()["AWS_SECRET_ACCESS_KEY"] == "env-secret"
    assert cfg.subprocess_env()["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNTHFACTORY_S3_ENDPOINT", "127.0.0.1:8333"),
        ("SYNTHFACTORY_S3_ENDPOINT", "http://host:9000/bucket"),
        ("SYNTHFACTORY_S3_BUCKET", "Bad_Bucket"),
        ("AWS_DEFAULT_REGION", "US East"),
    ],
)
def test_bad_value_names_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(StorageError) as caught:
        StorageConfig.from_env({variable: value})
    assert variable in str(caught.value) and repr(value) in str(caught.value)


def test_env_file_errors_never_echo_the_line(tmp_path: Path) -> None:
    env_file = tmp_path / "storage.env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY topsecret\n")
    with pytest.raises(StorageError, match="line 1") as caught:
        StorageConfig.from_env({}, env_file=env_file)
    assert "topsecret" not in str(caught.value)
    with pytest.raises(StorageError, match="does not exist"):
        StorageConfig.from_env({"SYNTHFACTORY_ENV_FILE": str(tmp_path / "missing.env")})
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
        StorageConfig.from_env({"AWS_ACCESS_KEY_ID": "key"})


@pytest.mark.slow
def test_restart_keeps_objects(tmp_path: Path) -> None:
    server = EmbeddedS3(tmp_path / "seaweedfs")
    try:
        cfg = server.start()
        minio_client(cfg).put_object(cfg.bucket, "dvcstore/kept", io.BytesIO(b"still here"), length=10)
        server.stop()
        server.stop()  # idempotent
        assert server.config is None

        cfg = server.start()
        assert minio_client(cfg).get_object(cfg.bucket, "dvcstore/kept").read() == b"still here"
    finally:
        server.stop()


@pytest.mark.slow
def test_daemon_round_trip_keeps_credentials(tmp_path: Path) -> None:
    data_dir = tmp_path / "seaweedfs"
    try:
        cfg = start_daemon(data_dir)
        pid = int((data_dir / PID_FILE).read_text())
        assert stat.S_IMODE((data_dir / ENV_FILE).stat().st_mode) == 0o600
        assert start_daemon(data_dir) == cfg  # already running: same server
        assert daemon_config(data_dir) == cfg
        ensure_bucket(StorageConfig.from_env({}, env_file=data_dir / ENV_FILE))

        assert stop_daemon(data_dir)
        assert _process_gone(pid)
        assert daemon_config(data_dir) is None
        assert not stop_daemon(data_dir)

        restarted = start_daemon(data_dir)
        assert (restarted.access_key, restarted.secret_key) == (cfg.access_key, cfg.secret_key)
    finally:
        stop_daemon(data_dir)


@pytest.mark.slow
def test_taken_port_fails_clearly_instead_of_moving(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(StorageError, match=f"port {port} for S3"):
            EmbeddedS3(tmp_path / "seaweedfs", s3_port=port).start()
