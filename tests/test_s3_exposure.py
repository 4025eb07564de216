"""No side door into the embedded S3 server: besides the S3 port (S3 keys), every port
`weed mini` listens on refuses a client that lacks the server's own credentials (a JWT
signed with the data dir's keys, or the data dir's client certificate).

Each probe is a request that succeeded against the server before it was locked down:
anonymous filer GET/PUT/POST of bucket files, volume reads and writes by file id, the
master's /dir/assign handing out write tokens, plaintext gRPC on every gRPC port. Where a
request is refused, a control request with the server's own credentials shows the port is
alive and the refusal is about credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import io
import json
import os
import socket
import ssl
import stat
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import psutil
import pytest
from minio.error import S3Error

from synthfactory.s3server import PORT_FLAGS, EmbeddedS3
from synthfactory.storage import StorageConfig, minio_client

pytestmark = pytest.mark.slow  # every test here talks to a server of its own

HOST = "127.0.0.1"
TIMEOUT = 5.0  # per probe; a refusal is immediate, this only bounds a hanging server
#: answers that refuse: unauthorized, forbidden, not served (HTTP API off), method not allowed
REFUSALS = frozenset({401, 403, 404, 405})
OBJECT_KEY = "exposure/probe.bin"
BOUNDARY = "synthfactory-probe-boundary"
GRPC_FLAGS = [flag for flag in PORT_FLAGS if flag.endswith(".grpc")]
#: a real method of each gRPC port's service, with a valid request message
GRPC_CALLS = {
    "master.port.grpc": ("/master_pb.Seaweed/Assign", b"\x08\x01"),  # count=1: a fid and its write JWT
    "filer.port.grpc": ("/filer_pb.SeaweedFiler/GetFilerConfiguration", b""),
    "volume.port.grpc": ("/volume_server_pb.VolumeServer/VolumeServerStatus", b""),
    "s3.port.grpc": ("/messaging_pb.SeaweedS3IamCache/ListPolicies", b""),
    "admin.port.grpc": ("/worker_pb.WorkerService/WorkerStream", b""),
}


@dataclass
class Exposed:
    server: EmbeddedS3
    config: StorageConfig
    body: bytes

    @property
    def ports(self) -> dict[str, int]:
        return getattr(self.server, "ports", None) or self.server._ports  # noqa: SLF001 (before the ports property)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposed]:
    """A server holding one object, with every port it was given listening."""
    with EmbeddedS3(tmp_path_factory.mktemp("exposure")) as server:
        config = server.config
        body = os.urandom(70_000)  # over weed's inline limit: stored on the volume server
        minio_client(config).put_object(config.bucket, OBJECT_KEY, io.BytesIO(body), length=len(body))
        found = Exposed(server, config, body)
        expected = set(found.ports.values())
        deadline = time.monotonic() + 30  # S3 answers first; admin and gRPC ports may follow
        while not expected <= _listening_ports(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield found


# ---------------------------------------------------------------- every socket is known


def test_weed_listens_only_on_the_ports_it_was_given(exposed: Exposed) -> None:
    connections = psutil.Process(exposed.server.pid).net_connections(kind="inet")
    listening = {(conn.laddr.ip, conn.laddr.port) for conn in connections if conn.status == psutil.CONN_LISTEN}

    assert {port for _, port in listening} == set(exposed.ports.values()), "a port the probes below do not cover"
    assert {ip for ip, _ in listening} == {HOST}


def test_unix_sockets_are_the_owners_only(exposed: Exposed) -> None:
    """weed serves gRPC (and filer/S3 HTTP) on unix sockets in /tmp too: only their owner
    may connect, and the gRPC ones want the certificate all the same."""
    paths = {conn.laddr for conn in psutil.Process(exposed.server.pid).net_connections(kind="unix") if conn.laddr}
    assert paths, "weed opens local sockets next to its gRPC ports; psutil saw none"
    for path in paths:
        assert not path.startswith(("\0", "@")), f"abstract socket {path!r}: no file permissions guard it"
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(info.st_mode))}"
    grpc_sockets = [path for path in paths if "-grpc-" in path]
    assert grpc_sockets
    for path in grpc_sockets:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            answer = _grpc_on(sock, "unix", "/grpc.health.v1.Health/Check")
        assert not answer.spoke_http2, f"{path} served plaintext gRPC: {answer}"


# ---------------------------------------------------------------- HTTP ports


def test_s3_refuses_unsigned_requests(exposed: Exposed) -> None:
    port, bucket = exposed.ports["s3.port"], exposed.config.bucket
    new_key = f"exposure/s3-{uuid.uuid4().hex}"

    answers = {
        "GET object": _http(port, "GET", f"/{bucket}/{OBJECT_KEY}"),
        "list bucket": _http(port, "GET", f"/{bucket}?list-type=2"),
        "PUT object": _http(port, "PUT", f"/{bucket}/{new_key}", b"anonymous"),
    }

    _assert_refused(answers, exposed.body)
    assert not _object_exists(exposed, new_key)


def test_filer_http_refuses_anonymous_reads_and_writes(exposed: Exposed) -> None:
    port, bucket = exposed.ports["filer.port"], exposed.config.bucket
    put_key, post_key = (f"exposure/filer-{uuid.uuid4().hex}" for _ in range(2))

    answers = {
        "GET object": _http(port, "GET", f"/buckets/{bucket}/{OBJECT_KEY}"),
        "GET metadata": _http(port, "GET", f"/buckets/{bucket}/{OBJECT_KEY}?metadata=true"),
        "list directory": _http(port, "GET", f"/buckets/{bucket}/exposure/", headers={"Accept": "application/json"}),
        "PUT file": _http(port, "PUT", f"/buckets/{bucket}/{put_key}", b"anonymous"),
        "POST form": _http(port, "POST", f"/buckets/{bucket}/{post_key}", *_form(b"anonymous")),
    }

    _assert_refused(answers, exposed.body)
    assert not _object_exists(exposed, put_key) and not _object_exists(exposed, post_key)


def test_volume_http_refuses_requests_without_a_jwt(exposed: Exposed) -> None:
    port = exposed.ports["volume.port"]
    fid = _object_fid(exposed)
    volume = fid.split(",")[0]
    forged = f"{volume},{_random_hex(4)}{_random_hex(4)}"  # needle key + cookie in an existing volume

    answers = {
        "GET by fid": _http(port, "GET", f"/{fid}"),
        "POST to a new fid": _http(port, "POST", f"/{forged}", *_form(b"anonymous")),
        "PUT over the object": _http(port, "PUT", f"/{fid}", *_form(b"overwritten")),
        "DELETE the object": _http(port, "DELETE", f"/{fid}"),
    }

    _assert_refused(answers, exposed.body)
    assert _read_object(exposed) == exposed.body, "an anonymous volume request changed the object"
    read_key = _saved_setting(exposed, "jwt.signing.read.key")
    if read_key:  # control: the same read with a JWT signed by the data dir's key is served
        status, body = _http(port, "GET", f"/{fid}", headers={"Authorization": f"Bearer {_jwt(read_key, fid)}"})
        assert (status, body) == (200, exposed.body)


def test_master_http_hands_out_no_write_tokens(exposed: Exposed) -> None:
    port = exposed.ports["master.port"]
    volume = _object_fid(exposed).split(",")[0]

    answers = {
        "GET /dir/assign": _http(port, "GET", "/dir/assign"),
        "POST /dir/assign": _http(port, "POST", "/dir/assign?count=1"),
        "GET /dir/lookup": _http(port, "GET", f"/dir/lookup?volumeId={volume}"),
        "GET /vol/status": _http(port, "GET", "/vol/status"),
        "POST /submit": _http(port, "POST", "/submit", *_form(b"anonymous")),
    }

    _assert_refused(answers, exposed.body)
    for name, (_, body) in answers.items():
        assert b'"fid"' not in body and b'"auth"' not in body, f"{name} answered {body[:200]!r}"


def test_admin_http_serves_no_ui_or_api(exposed: Exposed) -> None:
    port = exposed.ports["admin.port"]
    answers = {path: _http(port, "GET", path) for path in ("/", "/files", "/api/s3/buckets", "/api/cluster/topology")}
    _assert_refused(answers, exposed.body)


# ---------------------------------------------------------------- gRPC ports


@pytest.mark.parametrize("flag", GRPC_FLAGS)
def test_grpc_port_refuses_clients_without_the_data_dirs_certificate(
    exposed: Exposed, flag: str, tmp_path: Path
) -> None:
    port = exposed.ports[flag]
    method, message = GRPC_CALLS[flag]

    attempts = {
        "plaintext": _grpc(port, method, message),
        "TLS without a client certificate": _grpc(port, method, message, tls=_tls_context()),
        "TLS with a certificate of another CA": _grpc(port, method, message, tls=_tls_context(_foreign_cert(tmp_path))),
    }

    served = {name: answer for name, answer in attempts.items() if answer.spoke_http2}
    assert not served, f"{flag} {port} served gRPC to: {served}"
    files = _security_files(exposed)
    if files is not None:  # control: the data dir's certificate gets an answer from this port
        ctx = _tls_context((files.cert, files.key), ca=files.ca)
        answer = _grpc(port, method, message, tls=ctx)
        assert answer.spoke_http2 and answer.status is not None, f"{flag} with the server's certificate: {answer}"


def test_filer_grpc_lookup_needs_the_certificate(exposed: Exposed) -> None:
    """The call that found the object's file id (and so its bytes) for anyone before."""
    port, bucket = exposed.ports["filer.port.grpc"], exposed.config.bucket
    directory, _, name = f"/buckets/{bucket}/{OBJECT_KEY}".rpartition("/")

    answer = _grpc(port, "/filer_pb.SeaweedFiler/LookupDirectoryEntry", _pb(1, directory) + _pb(2, name))

    assert not answer.spoke_http2, f"anonymous LookupDirectoryEntry answered: {answer}"


# ---------------------------------------------------------------- secrets


def test_keys_are_private_and_stay_off_the_command_line_and_logs(exposed: Exposed) -> None:
    files = _security_files(exposed)
    assert files is not None, "the server wrote no security.toml: weed runs without JWT keys or mTLS"
    assert stat.S_IMODE(files.config.parent.stat().st_mode) == 0o700
    for path in (files.config, files.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    saved = tomllib.loads(files.config.read_text())
    secrets_ = [saved["jwt"]["signing"]["key"], saved["jwt"]["signing"]["read"]["key"],
                saved["jwt"]["filer_signing"]["key"], saved["jwt"]["filer_signing"]["read"]["key"],
                saved["admin"]["password"], exposed.config.secret_key]
    assert len(set(secrets_)) == len(secrets_) and all(len(secret) >= 32 for secret in secrets_[:5])
    argv = Path(f"/proc/{exposed.server.pid}/cmdline").read_bytes()
    data_dir = exposed.server.data_dir
    logs = [data_dir / "weed.log", *(data_dir / "logs").rglob("*")]
    texts = [path.read_bytes() for path in logs if path.is_file()]
    for secret in secrets_:
        assert secret.encode() not in argv
        assert not any(secret.encode() in text for text in texts), "a secret reached weed's logs"


def test_restart_reuses_the_keys_and_stays_closed(tmp_path: Path) -> None:
    server = EmbeddedS3(tmp_path / "s3")
    try:
        config = server.start()
        minio_client(config).put_object(config.bucket, "kept", io.BytesIO(b"kept"), length=4)
        files = _security_files(Exposed(server, config, b""))
        assert files is not None, "the server wrote no security.toml"
        before = [path.read_bytes() for path in (files.config, files.ca, files.cert, files.key)]
        server.stop()

        config = server.start()
        assert [path.read_bytes() for path in (files.config, files.ca, files.cert, files.key)] == before
        assert minio_client(config).get_object(config.bucket, "kept").read() == b"kept"
        ports = server.ports
        assert not _grpc(ports["filer.port.grpc"], *GRPC_CALLS["filer.port.grpc"]).spoke_http2
        assert _http(ports["filer.port"], "GET", f"/buckets/{config.bucket}/kept")[0] in REFUSALS
    finally:
        server.stop()


# ---------------------------------------------------------------- helpers


def _listening_ports(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    connections = psutil.Process(pid).net_connections(kind="inet")
    return {conn.laddr.port for conn in connections if conn.status == psutil.CONN_LISTEN}


def _http(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int | None, bytes]:
    """(status, start of the body); status None when the connection failed or was reset."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(1_000_000)
    except (OSError, http.client.HTTPException) as exc:
        return None, repr(exc).encode()
    finally:
        conn.close()


def _form(content: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart upload as weed's filer, volume and master take it: body and headers."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="probe.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n"
    ).encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _assert_refused(answers: dict[str, tuple[int | None, bytes]], secret_body: bytes) -> None:
    served = {
        name: (status, body[:120])
        for name, (status, body) in answers.items()
        if not (status is None or status in REFUSALS) or secret_body[:4096] in body
    }
    assert not served, f"served without credentials: {served}"


def _object_exists(exposed: Exposed, key: str) -> bool:
    try:
        minio_client(exposed.config).stat_object(exposed.config.bucket, key)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return False
        raise
    return True


def _read_object(exposed: Exposed) -> bytes:
    response = minio_client(exposed.config).get_object(exposed.config.bucket, OBJECT_KEY)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _security_files(exposed: Exposed):  # -> SecurityFiles | None
    files = getattr(exposed.server, "security", None)
    return files if files is not None and files.config.exists() else None


def _saved_setting(exposed: Exposed, dotted: str) -> str | None:
    files = _security_files(exposed)
    if files is None:
        return None
    value: object = tomllib.loads(files.config.read_text())
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def _object_fid(exposed: Exposed) -> str:
    """The volume file id of the object's first chunk, asked of the filer over gRPC as a
    trusted client (the data dir's certificate) or, on a server without one, in plaintext."""
    files = _security_files(exposed)
    tls = _tls_context((files.cert, files.key), ca=files.ca) if files else None
    directory, _, name = f"/buckets/{exposed.config.bucket}/{OBJECT_KEY}".rpartition("/")
    answer = _grpc(exposed.ports["filer.port.grpc"], "/filer_pb.SeaweedFiler/LookupDirectoryEntry",
                   _pb(1, directory) + _pb(2, name), tls=tls)
    assert answer.status == 0, f"the filer did not look the object up: {answer}"
    entry = dict(_pb_fields(answer.message))[1]
    chunk = dict(_pb_fields(next(value for number, value in _pb_fields(entry) if number == 3)))
    if chunk.get(1):
        return chunk[1].decode()
    fid = dict(_pb_fields(chunk[7]))  # FileId{volume_id, file_key, cookie}
    return f"{fid[1]},{fid[2]:x}{fid[3]:08x}"


def _jwt(key: str, fid: str) -> str:
    """A volume server JWT (HS256, claims fid and exp) as weed's master and filer mint it."""
    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = encode(json.dumps({"fid": fid, "exp": int(time.time()) + 60}).encode())
    signature = hmac.new(key.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{encode(signature)}"


def _random_hex(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


# gRPC without grpcio: a unary call over HTTP/2 (h2), plaintext or TLS


@dataclass
class GrpcAnswer:
    spoke_http2: bool  # the server answered the HTTP/2 handshake: it serves this client gRPC
    status: int | None  # grpc-status, when the call got that far
    message: bytes
    note: str


def _grpc(port: int, method: str, message: bytes = b"", tls: ssl.SSLContext | None = None) -> GrpcAnswer:
    try:
        sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        if tls is not None:  # a failed handshake closes the socket
            sock = tls.wrap_socket(sock, server_hostname=HOST)
    except OSError as exc:  # ssl.SSLError is an OSError
        return GrpcAnswer(False, None, b"", repr(exc))
    with sock:
        return _grpc_on(sock, f"{HOST}:{port}", method, message, "https" if tls else "http")


def _grpc_on(
    sock: socket.socket, authority: str, method: str, message: bytes = b"", scheme: str = "http"
) -> GrpcAnswer:
    """One unary gRPC call over a connected socket; never raises for what the server does."""
    spoke, status, data = False, None, b""
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [
            (":method", "POST"), (":scheme", scheme), (":path", method), (":authority", authority),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        conn.send_data(stream, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            received = sock.recv(65536)
            if not received:
                return GrpcAnswer(spoke, status, data[5:], "connection closed")
            for event in conn.receive_data(received):
                spoke = True
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers = dict(event.headers)
                    status = int(headers["grpc-status"]) if "grpc-status" in headers else status
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    return GrpcAnswer(spoke, status, data[5:], type(event).__name__)
            sock.sendall(conn.data_to_send())
        return GrpcAnswer(spoke, status, data[5:], "timed out")
    except (OSError, h2.exceptions.ProtocolError) as exc:  # ssl.SSLError is an OSError
        return GrpcAnswer(spoke, status, data[5:], repr(exc))


def _tls_context(client_cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """TLS for h2; verifies the server against `ca` when given (else accepts any server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _foreign_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed client certificate, as anyone can make one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synthfactory-weed")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "foreign.crt", directory / "foreign.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_path, key_path


# protobuf, the little needed here


def _pb(number: int, value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    fields: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            length, i = _read_varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = int.from_bytes(buf[i:i + size], "little"), i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
