"""Where releases are stored: S3 settings, and a check that the bucket is usable.

Settings come from environment variables, falling back to a git-ignored KEY=VALUE env
file, so that credentials never appear in recipes, git history or command lines. Every
failure is a StorageError with one actionable sentence, and no message ever contains the
secret key.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

ENDPOINT_VAR = "SYNTHFACTORY_S3_ENDPOINT"
BUCKET_VAR = "SYNTHFACTORY_S3_BUCKET"
PREFIX_VAR = "SYNTHFACTORY_S3_PREFIX"
ENV_FILE_VAR = "SYNTHFACTORY_ENV_FILE"
ACCESS_KEY_VAR = "AWS_ACCESS_KEY_ID"
SECRET_KEY_VAR = "AWS_SECRET_ACCESS_KEY"
#: setting any of these means "use this S3", never the embedded fallback
#: any of these set means "my own S3": AWS keys alone mean AWS (no endpoint), never the
#: embedded server, whose loopback endpoint would go into the release's .dvc/config
EXPLICIT_VARS = (ENDPOINT_VAR, BUCKET_VAR, ENV_FILE_VAR, ACCESS_KEY_VAR)
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")

DEFAULT_BUCKET = "synthfactory"
DEFAULT_PREFIX = "dvcstore"
DEFAULT_REGION = "us-east-1"
AWS_HOST = "s3.amazonaws.com"

#: S3 error codes meaning "these credentials are not accepted here"
CREDENTIAL_ERRORS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"})

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StorageError(Exception):
    """Storage is misconfigured or unusable; the message says what to change."""


@dataclass(frozen=True)
class StorageConfig:
    """Everything needed to reach the release bucket. ``endpoint_url=None`` means AWS."""

    endpoint_url: str | None = None
    bucket: str = DEFAULT_BUCKET
    prefix: str = DEFAULT_PREFIX
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str = DEFAULT_REGION

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: Path | None = None
    ) -> StorageConfig:
        """Read settings from `environ` (default: os.environ), then from the env file
        (`env_file`, else $SYNTHFACTORY_ENV_FILE) for anything the environment leaves
        unset or empty. Raises StorageError naming the variable of any bad value."""
        env = os.environ if environ is None else environ
        if env_file is None and env.get(ENV_FILE_VAR, "").strip():
            env_file = Path(env[ENV_FILE_VAR].strip())
        file_values = read_env_file(env_file) if env_file is not None else {}

        def lookup(*names: str) -> tuple[str, str] | None:
            for source in (env, file_values):
                for name in names:
                    value = source.get(name, "").strip()
                    if value:
                        return name, value
            return None

        endpoint = lookup(ENDPOINT_VAR)
        bucket = lookup(BUCKET_VAR)
        prefix = lookup(PREFIX_VAR)
        access = lookup(ACCESS_KEY_VAR)
        secret = lookup(SECRET_KEY_VAR)
        region = lookup(*REGION_VARS)
        if bool(access) != bool(secret):
            present, missing = (ACCESS_KEY_VAR, SECRET_KEY_VAR) if access else (SECRET_KEY_VAR, ACCESS_KEY_VAR)
            raise StorageError(f"{present} is set but {missing} is not: set both or neither")
        return cls(
            endpoint_url=_check_endpoint(*endpoint) if endpoint else None,
            bucket=check_bucket_name(bucket[1], bucket[0]) if bucket else DEFAULT_BUCKET,
            prefix=_check_prefix(*prefix) if prefix else DEFAULT_PREFIX,
            access_key=access[1] if access else None,
            secret_key=secret[1] if secret else None,
            region=_check_region(*region) if region else DEFAULT_REGION,
        )

    @property
    def remote_url(self) -> str:
        """The DVC remote URL: ``s3://<bucket>/<prefix>``."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def location(self) -> str:
        """Human-readable endpoint for messages."""
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def subprocess_env(self) -> dict[str, str]:
        """Variables to add to a `dvc` subprocess's environment so boto3 uses these
        settings. The checksum settings stop botocore >= 1.36 from sending CRC checksums
        by default, which several S3-compatible servers reject."""
        env = {
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
        if self.access_key and self.secret_key:
            env[ACCESS_KEY_VAR] = self.access_key
            env[SECRET_KEY_VAR] = self.secret_key
        return env


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines (blank lines, ``#`` comments, ``export `` and matching
    quotes allowed). Errors cite the line number only, as lines may hold secrets."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StorageError(f"env file {path} does not exist (given as {ENV_FILE_VAR} or env_file)") from None
    except OSError as exc:
        raise StorageError(f"cannot read env file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise StorageError(f"env file {path}, line {number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def _check_endpoint(name: str, value: str) -> str:
    """An S3 endpoint is scheme://host[:port] only: a path would be taken as a bucket."""
    url = urllib.parse.urlsplit(value)
    problem = None
    if url.scheme not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif not url.hostname:
        problem = "has no host name"
    elif url.username or url.password:
        problem = "must not contain credentials; use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif url.path not in ("", "/") or url.query or url.fragment:
        problem = "must be scheme://host[:port] with no path"
    else:
        try:
            url.port
        except ValueError:
            problem = "has an invalid port"
    if problem:
        shown = value if not (url.username or url.password) else "<redacted>"
        raise StorageError(f"invalid {name}={shown!r}: {problem}")
    return f"{url.scheme}://{url.netloc}"


def check_bucket_name(value: str, name: str = BUCKET_VAR) -> str:
    """S3 bucket naming rules, so a typo fails here rather than as an opaque S3 error;
    `name` is the setting the value came from, for the message."""
    problem = None
    if not _BUCKET_RE.match(value):
        problem = "use 3-63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit"
    elif ".." in value:
        problem = "must not contain '..'"
    else:
        try:
            ipaddress.ip_address(value)
            problem = "must not look like an IP address"
        except ValueError:
            pass
    if problem:
        raise StorageError(f"invalid {name}={value!r}: {problem}")
    return value


def _check_prefix(name: str, value: str) -> str:
    """Prefix without surrounding slashes; empty segments would make odd S3 keys."""
    prefix = value.strip("/")
    if not prefix or "//" in prefix or any(ch.isspace() or ch == "\\" for ch in prefix):
        raise StorageError(f"invalid {name}={value!r}: use a key prefix such as 'dvcstore' or 'team/dvcstore'")
    return prefix


def _check_region(name: str, value: str) -> str:
    if not _REGION_RE.match(value):
        raise StorageError(f"invalid {name}={value!r}: expected a region such as 'us-east-1'")
    return value


def minio_client(
    cfg: StorageConfig, *, connect_timeout: float = 3.0, read_timeout: float = 10.0, retries: int = 1
) -> Minio:
    """A minio client that fails fast: short timeouts, and at most `retries` retries of a
    failed connection or 5xx answer, none of a read timeout (minio's own defaults wait
    5 minutes per try, 6 tries, on an unreachable or hung host)."""
    url = urllib.parse.urlsplit(cfg.endpoint_url) if cfg.endpoint_url else None
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        retries=urllib3.Retry(
            total=retries,
            read=0,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=False,  # let minio turn the last 5xx into an S3Error
        ),
        maxsize=10,
    )
    try:
        return Minio(
            url.netloc if url else AWS_HOST,
            access_key=cfg.access_key,
            secret_key=cfg.secret_key,
            secure=url.scheme == "https" if url else True,
            region=cfg.region,
            http_client=http,
        )
    except ValueError as exc:
        raise StorageError(f"invalid S3 settings for {cfg.location}: {exc}") from None


def dvc_object_key(cfg: StorageConfig, md5: str) -> str:
    """Where DVC 3 keeps a file of this md5 under the remote (files/md5/<2>/<30>)."""
    return "/".join(filter(None, (cfg.prefix, "files", "md5", md5[:2], md5[2:])))


def ensure_bucket(cfg: StorageConfig) -> None:
    """Create the bucket if missing, then prove write access by putting and removing a
    tiny probe object under the prefix, so a release fails before any work is done."""
    if not (cfg.access_key and cfg.secret_key):
        raise StorageError(
            f"no S3 credentials for bucket '{cfg.bucket}' at {cfg.location}: set {ACCESS_KEY_VAR} and "
            f"{SECRET_KEY_VAR} in the environment or in the env file named by {ENV_FILE_VAR}"
        )
    client = minio_client(cfg, read_timeout=5.0)
    probe = "/".join(filter(None, (cfg.prefix, f".synthfactory-probe-{uuid.uuid4().hex}")))
    try:
        if not client.bucket_exists(cfg.bucket):
            try:
                client.make_bucket(cfg.bucket)
            except S3Error as exc:
                if exc.code != "BucketAlreadyOwnedByYou":  # lost a creation race: fine
                    raise
        client.put_object(cfg.bucket, probe, io.BytesIO(b"ok"), length=2)
        client.remove_object(cfg.bucket, probe)
    except S3Error as exc:
        raise _s3_error(cfg, exc) from None
    except ValueError as exc:  # minio's client-side checks, e.g. of a hand-made config's bucket name
        raise StorageError(f"invalid S3 settings for {cfg.location}: {exc}") from None
    except MinioException as exc:
        raise StorageError(
            f"S3 endpoint {cfg.location} gave an unexpected answer for bucket '{cfg.bucket}' ({exc}); "
            f"check that {ENDPOINT_VAR} points at an S3 server"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise StorageError(
            f"cannot reach S3 endpoint {cfg.location} for bucket '{cfg.bucket}': {describe_network_error(exc)}. "
            f"Is the server running? Start the embedded one with `synthfactory s3 start`, or fix {ENDPOINT_VAR}"
        ) from None


def _s3_error(cfg: StorageConfig, exc: S3Error) -> StorageError:
    where = f"S3 at {cfg.location}, bucket '{cfg.bucket}'"
    if exc.code in CREDENTIAL_ERRORS:
        return StorageError(
            f"{where} rejected the credentials ({exc.code}): check {ACCESS_KEY_VAR} and {SECRET_KEY_VAR} "
            f"(environment or the env file named by {ENV_FILE_VAR}), and that this key may read and write the bucket"
        )
    if exc.code == "BucketAlreadyExists":
        return StorageError(f"{where}: that bucket name belongs to another account; choose another {BUCKET_VAR}")
    return StorageError(f"{where} failed: {exc.code}: {exc.message}")


def describe_network_error(exc: Exception) -> str:
    """One short phrase for a urllib3 failure (its own text embeds object reprs)."""
    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
    # most specific first: urllib3 2 derives NewConnectionError from ConnectTimeoutError
    if isinstance(reason, NameResolutionError):
        return "host name not found"
    if isinstance(reason, NewConnectionError):
        return "connection refused" if "refused" in str(reason).lower() else "cannot connect"
    if isinstance(reason, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(reason, ReadTimeoutError):
        return "no response in time"
    if isinstance(reason, SSLError):
        return "TLS handshake failed (is the scheme right: http vs https?)"
    if isinstance(reason, ProtocolError):
        return "connection dropped"
    return type(reason).__name__
