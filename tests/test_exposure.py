"""Network exposure and secrets: the compose stack (infra/docker-compose.yml, read as YAML and
interpolated here as `docker compose` would, since Docker does not run in the tests) and
`synthfactory server --host`. Nothing here starts a server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthfactory import server as server_module
from synthfactory.server import ServerInputError, Stack, serve

SERVER_AUTH_VAR = "PREFECT_SERVER_API_AUTH_STRING"  # Prefect's names: the server's, and its clients'
CLIENT_AUTH_VAR = "PREFECT_API_AUTH_STRING"

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE = REPO_ROOT / "infra" / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / "infra" / "stack.env.example"
CLI = str(Path(sys.executable).with_name("synthfactory"))
SECRET = "admin:6f0c1b2e9d8a7c6b5a4f3e2d"
#: a filled-in stack.env
REAL_ENV = {
    "S3_ACCESS_KEY": "factory-root",
    "S3_SECRET_KEY": "9b1f0e2d3c4b5a69788796a5b4c3d2e1",
    "S3_WORKER_ACCESS_KEY": "factory-worker",
    "S3_WORKER_SECRET_KEY": "1e2d3c4b5a6978879a6b5c4d3e2f1a0b",
    "S3_BUCKET": "synthfactory",
    "POSTGRES_PASSWORD": "5a4b3c2d1e0f9a8b7c6d",
    SERVER_AUTH_VAR: SECRET,
}
ROOT_KEYS = ("S3_ACCESS_KEY", "S3_SECRET_KEY")
LOOPBACK_BINDINGS = ("127.0.0.1", "localhost", "::1", "[::1]")


# --- `docker compose` interpolation, enough for this file ------------------------------------

class MissingVariable(Exception):
    pass


_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's substitution: `$$` is a literal `$`; ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}; raises MissingVariable for a required one that is unset."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        dollar, name, operator, argument, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        current = env.get(name)
        missing = current is None or (operator is not None and operator.startswith(":") and current == "")
        if operator in (":-", "-") and missing:
            return argument
        if operator in (":?", "?") and missing:
            raise MissingVariable(f"{name}: {argument}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def published_host_ips(port: object) -> str:
    """The host address of one `ports:` entry (short "[IP:]HOST:CONTAINER" or long syntax);
    "" when none is given, which Docker publishes on every interface."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    spec = str(port).split("/")[0]
    if spec.startswith("["):  # [::1]:4200:4200
        return spec[1:spec.index("]")]
    parts = spec.split(":")
    return ":".join(parts[:-2]) if len(parts) > 2 else ""


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def preflight(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the preflight service's check here, as its container would: the command compose
    derives from stack.env `env`, in a shell whose environment is the service's."""
    service = compose(env)["services"]["preflight"]
    command = [*(service.get("entrypoint") or []), *service["command"]]
    assert command[:2] == ["sh", "-c"], command
    container_env = {"PATH": os.environ["PATH"], **environment(service)}
    return subprocess.run(["sh", "-c", command[2]], env=container_env, capture_output=True, text=True, timeout=30)


# --- the compose stack -----------------------------------------------------------------------

def test_every_published_port_is_loopback_unless_bind_address_says_otherwise():
    services = compose(REAL_ENV)["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}

    assert {"prefect-server", "minio", "postgres"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert published_host_ips(port) in LOOPBACK_BINDINGS, f"{name} publishes {port} beyond loopback"

    chosen = compose({**REAL_ENV, "BIND_ADDRESS": "10.1.2.3"})["services"]
    assert {published_host_ips(port) for name in ("prefect-server", "minio") for port in chosen[name]["ports"]} == {"10.1.2.3"}
    assert [published_host_ips(port) for port in chosen["postgres"]["ports"]] == ["127.0.0.1"]  # never exposed


@pytest.mark.parametrize("service", ["prefect-server", "worker", "preflight"])
def test_the_stack_refuses_to_start_without_the_prefect_auth_string(service):
    without_auth = {name: value for name, value in REAL_ENV.items() if name != SERVER_AUTH_VAR}
    document = yaml.safe_load(COMPOSE.read_text())

    with pytest.raises(MissingVariable, match=SERVER_AUTH_VAR):
        interpolate(document["services"][service], without_auth)

    services = compose(REAL_ENV)["services"]
    assert environment(services["prefect-server"])[SERVER_AUTH_VAR] == SECRET
    assert environment(services["worker"])[CLIENT_AUTH_VAR] == SECRET
    assert SECRET not in json.dumps(services["worker"]["command"]) + json.dumps(services["prefect-server"]["command"])


def test_prefect_image_matches_the_pinned_prefect():
    pinned = re.search(r"^prefect==(\S+)$", (REPO_ROOT / "requirements.lock").read_text(), re.MULTILINE).group(1)
    image = compose(REAL_ENV)["services"]["prefect-server"]["image"]

    assert image.startswith(f"prefecthq/prefect:{pinned}-")


def test_the_worker_gets_a_scoped_minio_user_never_the_root_keys():
    services = compose(REAL_ENV)["services"]
    worker = environment(services["worker"])

    assert worker["AWS_ACCESS_KEY_ID"] == REAL_ENV["S3_WORKER_ACCESS_KEY"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == REAL_ENV["S3_WORKER_SECRET_KEY"]
    for root in ROOT_KEYS:
        assert REAL_ENV[root] not in worker.values(), f"the worker holds {root}"
    # the root keys reach only MinIO itself, the one-shot setup and the preflight check
    holders = {name for name, service in services.items() if {REAL_ENV[key] for key in ROOT_KEYS} & set(environment(service).values())}
    assert holders == {"minio", "minio-setup", "preflight"}
    assert services["worker"]["depends_on"]["minio-setup"] == {"condition": "service_completed_successfully"}


def test_minio_setup_creates_the_worker_user_with_a_policy_on_its_bucket_only():
    setup = compose(REAL_ENV)["services"]["minio-setup"]
    script = "\n".join([*(setup.get("entrypoint") or []), *setup["command"]])
    bucket = environment(setup)["S3_BUCKET"]
    policy_text = re.search(r"<<EOF\n(.*?)\nEOF", script, re.DOTALL).group(1).replace("$S3_BUCKET", bucket)
    policy = json.loads(policy_text)

    resources = {resource for statement in policy["Statement"] for resource in statement["Resource"]}
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= actions
    assert not any("*" in action for action in actions)
    assert not actions & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketVersioning"}
    assert 'mc admin user add stack "$S3_WORKER_ACCESS_KEY" "$S3_WORKER_SECRET_KEY"' in script
    assert "mc admin policy attach stack synthfactory-worker --user" in script


def test_the_worker_mounts_the_checkout_read_only_and_keeps_its_state_in_volumes():
    worker = compose(REAL_ENV)["services"]["worker"]
    mounts = {volume.split(":")[1]: volume for volume in worker["volumes"]}

    assert mounts["/factory"] == "..:/factory:ro"
    state = environment(worker)["SYNTHFACTORY_DATA_DIR"]
    assert state in mounts and not mounts[state].startswith((".", "/"))  # a named volume, not the host
    assert "make install" not in " ".join(worker["command"])  # `pip install -e .` would write into /factory


def test_every_service_waits_for_the_preflight_check():
    services = compose(REAL_ENV)["services"]
    for name in ("minio", "postgres", "prefect-server"):
        assert services[name]["depends_on"]["preflight"] == {"condition": "service_completed_successfully"}, name


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("printenv") is None, reason="needs sh and printenv")
def test_preflight_refuses_the_example_placeholders_and_accepts_real_secrets():
    example = read_env_file(ENV_EXAMPLE)
    assert set(REAL_ENV) <= set(example)  # the example names every secret the stack needs

    refused = preflight(example)
    assert refused.returncode != 0
    for name in ("S3_SECRET_KEY", "S3_WORKER_SECRET_KEY", "POSTGRES_PASSWORD", SERVER_AUTH_VAR):
        assert name in refused.stderr
    assert "change-me" in refused.stderr and example["S3_SECRET_KEY"] not in refused.stderr  # names, never values

    accepted = preflight(REAL_ENV)
    assert accepted.returncode == 0, accepted.stderr

    one_left = preflight({**REAL_ENV, SERVER_AUTH_VAR: "admin:Change-Me-please"})
    assert one_left.returncode != 0 and SERVER_AUTH_VAR in one_left.stderr
    root_for_worker = preflight({**REAL_ENV, "S3_WORKER_ACCESS_KEY": REAL_ENV["S3_ACCESS_KEY"],
                                 "S3_WORKER_SECRET_KEY": REAL_ENV["S3_SECRET_KEY"]})
    assert root_for_worker.returncode != 0 and "must differ from the MinIO root keys" in root_for_worker.stderr


# --- `synthfactory server --host` --------------------------------------------------------------

def stack(host: str = "127.0.0.1", remote_api: str | None = None) -> Stack:
    return Stack(checkout=REPO_ROOT, prefect_file=REPO_ROOT / "prefect.yaml", registry=REPO_ROOT / ".data" / "registry",
                 host=host, remote_api=remote_api)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_hosts_need_no_auth(host):
    assert server_module.is_loopback(host)
    server_module.check_exposure(stack(host), {})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "factory.example.internal"])
def test_a_host_beyond_loopback_needs_the_auth_string(host):
    assert not server_module.is_loopback(host)
    with pytest.raises(ServerInputError, match=rf"--host {re.escape(host)} .*set {SERVER_AUTH_VAR}"):
        server_module.check_exposure(stack(host), {})

    server_module.check_exposure(stack(host), {SERVER_AUTH_VAR: SECRET})  # passes
    server_module.check_exposure(stack(host, remote_api="http://prefect:4200/api"), {})  # no server starts here


@pytest.mark.parametrize(("name", "value"), [
    (SERVER_AUTH_VAR, "admin:change-me-to-a-long-random-password"),
    (CLIENT_AUTH_VAR, "change-me-client-secret"),
    ("AWS_SECRET_ACCESS_KEY", "change-me-to-another-long-random-secret"),
    ("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect:change-me-too@127.0.0.1:5432/prefect"),
])
def test_placeholder_secrets_are_refused_by_name(name, value):
    with pytest.raises(ServerInputError, match=rf"^{name}.* placeholder") as refused:
        server_module.check_exposure(stack(), {name: value})
    assert value not in str(refused.value)


def test_the_auth_string_reaches_children_through_the_environment_only(tmp_path):
    local = stack("0.0.0.0")
    server_env, deploy_env, worker_env = server_module.child_environments(local, {SERVER_AUTH_VAR: SECRET}, tmp_path)

    assert server_env[SERVER_AUTH_VAR] == SECRET
    for env in (deploy_env, worker_env):  # clients of the server started here authenticate with its secret
        assert SERVER_AUTH_VAR not in env and env[CLIENT_AUTH_VAR] == SECRET
    ready = server_module._ready_message(local, "release/shapes", None, auth=True)
    assert SECRET not in ready and CLIENT_AUTH_VAR in ready
    with pytest.raises(ServerInputError, match=f"{CLIENT_AUTH_VAR} differs"):
        server_module.check_exposure(local, {SERVER_AUTH_VAR: SECRET, CLIENT_AUTH_VAR: "admin:another-secret-entirely"})


def test_serve_refuses_an_exposed_host_before_starting_or_writing_anything(tmp_path, monkeypatch):
    spawned = []

    def no_processes(*args, **kwargs):
        spawned.append(args)
        raise AssertionError(f"started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_processes)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("SYNTHFACTORY_DATA_DIR", str(tmp_path / "data"))
    for name in (SERVER_AUTH_VAR, CLIENT_AUTH_VAR):
        monkeypatch.delenv(name, raising=False)
    said = []

    with pytest.raises(ServerInputError, match=f"--host 0.0.0.0 .*{SERVER_AUTH_VAR}"):
        serve(Stack(checkout=REPO_ROOT, prefect_file=REPO_ROOT / "prefect.yaml", registry=tmp_path / "registry",
                    host="0.0.0.0", port=free_port()), said.append)

    assert spawned == [] and said == [] and list(tmp_path.iterdir()) == []


def free_port() -> int:
    from synthfactory.daemons import free_ports

    return free_ports(1)[0]


def test_cli_refuses_host_0000_without_auth_in_one_line_and_starts_nothing(tmp_path):
    env = {name: value for name, value in os.environ.items() if name not in (SERVER_AUTH_VAR, CLIENT_AUTH_VAR, "PREFECT_API_URL")}
    env.update(SYNTHFACTORY_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"))
    # a prefect file that does not exist: should the check be missing, the command fails on it
    # (exit 2 as well, but another message) instead of starting a server
    missing = tmp_path / "absent-prefect.yaml"

    result = subprocess.run([CLI, "server", "--host", "0.0.0.0", "--port", str(free_port()), "--prefect-file", str(missing)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 0.0.0.0 ") and SERVER_AUTH_VAR in lines[0], result.stderr
    assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == []
