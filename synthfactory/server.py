"""`synthfactory server`: a local Prefect server, the embedded S3 and a process worker, with
every recipe deployed from prefect.yaml, so releases can be scheduled and triggered from the
Prefect UI. Against an existing Prefect server (`--api-url`) it deploys and runs a worker only.

Plain process supervision: the children are Prefect's own commands (`prefect server start`,
`prefect deploy`, `prefect worker start`) and the embedded SeaweedFS, started in order and
stopped in reverse. Each child runs in its own session, so a terminal's Ctrl-C reaches only
the supervisor, which then stops the worker before the server it reports to. Secrets reach
the children through the environment or the S3 env file, never their command lines.

Exposure: the Prefect API runs any deployment with any parameters for whoever reaches it, so
a server listening beyond loopback needs basic auth (PREFECT_SERVER_API_AUTH_STRING); this is
checked, with the placeholder secrets of infra/stack.env.example, before anything starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from synthfactory import settings
from synthfactory.daemons import port_is_free
from synthfactory.local_api import LocalApiError, prefect_home, record, stop_local_api, ui_url, wait_until_healthy
from synthfactory.release.links import REPORTS_URL_VAR, kept_reports_dir
from synthfactory.report_site import ReportSite
from synthfactory.s3server import ENV_FILE, daemon_config, start_daemon, stop_daemon
from synthfactory.storage import ENV_FILE_VAR, StorageError

#: once it has run a flow, Prefect's worker logs SIGTERM but may not exit (seen: > 30 s)
WORKER_GRACE_S = 5.0
SERVER_GRACE_S = 15.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the server's database settings; only the server needs them (the URL may hold a password)
DATABASE_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_PASSWORD")
#: basic auth ("user:password"): what the server requires, and what its clients send
SERVER_AUTH_VAR = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_VAR = "PREFECT_API_AUTH_STRING"
#: settings only the server process gets; deploys, workers and flow runs never see them
SERVER_ONLY_VARS = (*DATABASE_VARS, SERVER_AUTH_VAR)
#: secrets that must not hold infra/stack.env.example's placeholders (values starting so)
SECRET_VARS = (SERVER_AUTH_VAR, CLIENT_AUTH_VAR, "PREFECT_API_DATABASE_PASSWORD", "AWS_SECRET_ACCESS_KEY")
PLACEHOLDER_PREFIX = "change-me"
#: where a worker's checkout is; prefect.yaml's pull step changes into it
CHECKOUT_VAR = "SYNTHFACTORY_CHECKOUT"
WILDCARD_HOSTS = ("0.0.0.0", "::")

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class ServerError(Exception):
    """Starting or running the stack failed; the message says what happened and what to do."""


class ServerInputError(ServerError):
    """Bad input (prefect.yaml, port, checkout): nothing was started."""


class _Shutdown(Exception):
    """Ctrl-C or SIGTERM: stop everything and exit normally."""


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    work_pool: str


def read_prefect_file(path: Path) -> list[DeploymentSpec]:
    """The deployments a prefect.yaml declares, checked for what `prefect deploy --all` needs
    without prompting, so a broken file fails in a second instead of after the server start."""
    if not path.is_file():
        raise ServerInputError(f"{path} not found: the deployments to serve come from a prefect.yaml (see --prefect-file)")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ServerInputError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    deployments = document.get("deployments") if isinstance(document, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise ServerInputError(f"{path} declares no deployments: expected a non-empty `deployments:` list")
    specs = []
    for number, deployment in enumerate(deployments, 1):
        entry = deployment if isinstance(deployment, dict) else {}
        pool = entry.get("work_pool") if isinstance(entry.get("work_pool"), dict) else {}
        missing = [field for field, value in (("name", entry.get("name")), ("entrypoint", entry.get("entrypoint")),
                                              ("work_pool.name", pool.get("name"))) if not value]
        if missing:
            raise ServerInputError(f"{path}: deployment #{number} has no {', '.join(missing)}")
        specs.append(DeploymentSpec(str(entry["name"]), str(pool["name"])))
    return specs


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the API on this machine: localhost, 127.0.0.0/8, ::1.
    Any other name or address (0.0.0.0, a LAN address, a host name) may be reachable."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def is_placeholder(value: str) -> bool:
    """A secret still as infra/stack.env.example ships it: `change-me...`, or `user:change-me...`."""
    value = value.strip().lower()
    return value.startswith(PLACEHOLDER_PREFIX) or value.partition(":")[2].startswith(PLACEHOLDER_PREFIX)


def check_secrets(environ: Mapping[str, str]) -> None:
    """Refuse placeholder secrets (by name; a value is never printed)."""
    placeholders = [name for name in SECRET_VARS if is_placeholder(environ.get(name, ""))]
    url = environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    if url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        with contextlib.suppress(ArgumentError, ValueError):
            if is_placeholder(make_url(url).password or ""):
                placeholders.append("PREFECT_API_DATABASE_CONNECTION_URL (its password)")
    if placeholders:
        raise ServerInputError(
            f"{', '.join(placeholders)} still {'holds a placeholder' if len(placeholders) == 1 else 'hold placeholders'} "
            f"({PLACEHOLDER_PREFIX}...): set real secrets (e.g. `openssl rand -hex 24`) before starting"
        )


def check_exposure(stack: "Stack", environ: Mapping[str, str]) -> None:
    """A Prefect server this command starts listens beyond loopback only with basic auth, and
    with secrets that are not placeholders. Raises ServerInputError before anything starts."""
    check_secrets(environ)
    if stack.remote_api:
        return
    server_auth, client_auth = environ.get(SERVER_AUTH_VAR), environ.get(CLIENT_AUTH_VAR)
    if not is_loopback(stack.host) and not server_auth:
        raise ServerInputError(
            f"--host {stack.host} would expose the Prefect API, which runs any deployment with any parameters, "
            f"without authentication: set {SERVER_AUTH_VAR} (basic auth, user:password) or use --host 127.0.0.1"
        )
    if server_auth and client_auth and client_auth != server_auth:
        raise ServerInputError(
            f"{CLIENT_AUTH_VAR} differs from {SERVER_AUTH_VAR}: the deploy and the worker here could not "
            f"authenticate to the server this command starts; unset {CLIENT_AUTH_VAR} or make them equal"
        )


def child_environments(stack: "Stack", environ: Mapping[str, str], home: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The environments of the Prefect server, of `prefect deploy` and of the workers (and so
    of flow runs). Only the server gets the database settings and the auth it requires; the
    others get the client auth (the server's, when it starts here) from the environment,
    never on a command line."""
    server_env = {**environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": stack.api_url, "PREFECT_CLI_PROMPT": "false"}
    if not stack.remote_api:  # links in logs ("View at ...") open the current UI, not the old one
        server_env["PREFECT_UI_URL"] = ui_url(stack.api_url)
    # Deploying without SYNTHFACTORY_CHECKOUT keeps prefect.yaml's pull step a template that
    # each worker resolves to its own checkout at run time.
    deploy_env = {name: value for name, value in server_env.items() if name not in (*SERVER_ONLY_VARS, CHECKOUT_VAR)}
    if not stack.remote_api and environ.get(SERVER_AUTH_VAR) and not environ.get(CLIENT_AUTH_VAR):
        deploy_env[CLIENT_AUTH_VAR] = environ[SERVER_AUTH_VAR]
    worker_env = {
        **deploy_env,
        CHECKOUT_VAR: str(stack.checkout),
        "SYNTHFACTORY_DATA_DIR": str(settings.data_dir()),
        "SYNTHFACTORY_REGISTRY": str(stack.registry),
        REPORTS_URL_VAR: stack.reports_url,
    }
    return server_env, deploy_env, worker_env


def _client_settings(api_url: str, auth_string: str | None) -> dict:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    return {PREFECT_API_URL: api_url, **({PREFECT_API_AUTH_STRING: auth_string} if auth_string else {})}


def check_port_free(host: str, port: int, role: str = "the Prefect API and UI") -> None:
    if not port_is_free(port, host):
        raise ServerInputError(
            f"cannot listen on {host}:{port} for {role}: another server (a Prefect server?) uses it; pass --port"
        )


def describe_database(home: Path) -> str:
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    if not url:
        return f"SQLite {home / 'prefect.db'}"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def ensure_registry(registry: Path, checkout: Path) -> None:
    """A registry that does not exist yet starts as a clone of the checkout (as `demo` does),
    so scheduled releases commit there, never into the working copy."""
    if not registry.exists():
        registry.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["git", "clone", "--quiet", str(checkout), str(registry)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServerError(f"could not clone {checkout} into the registry {registry}: {proc.stderr.strip()}")


class Child:
    """One supervised process, in its own session so terminal signals reach only the supervisor.
    On Linux the kernel SIGKILLs it should the supervisor die without cleaning up."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log: Path | None = None) -> None:
        self.name = name
        self.log = log
        output = open(log, "ab") if log else None  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(
                argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output else None,
                start_new_session=True, preexec_fn=_die_with_parent if _LIBC else None,
            )
        finally:
            if output:
                output.close()

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def exit_reason(self) -> str | None:
        """Why it stopped (exit code and log tail), or None while it runs."""
        code = self.exit_code()
        if code is None:
            return None
        return f"exit {code}; log {self.log}:\n{self.log_tail()}" if self.log else f"exit {code}"

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL to its process group after `grace` s. (A worker stops its
        flow runs, which Prefect starts in sessions of their own, when it exits normally.)"""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _die_with_parent() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prefect(*args: str) -> list[str]:
    """A Prefect CLI command on this interpreter, never prompting."""
    return [sys.executable, "-m", "prefect", "--no-prompt", *args]


def ensure_process_pool(api_url: str, name: str, auth_string: str | None = None) -> None:
    """Create the work pool the deployments name, as a process pool, unless it exists
    (the CLI's `work-pool create` would ask the internet which pool types exist)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(_client_settings(api_url, auth_string)), get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template(),
            ))
            return
    if pool.type != ProcessWorker.type:
        raise ServerInputError(f"work pool {name!r} exists with type {pool.type!r}; the worker here needs a process pool")


def deploy(prefect_file: Path, checkout: Path, env: Mapping[str, str]) -> None:
    """`prefect deploy --all` from the checkout (entrypoints and recipes are relative to it)."""
    proc = subprocess.run(
        _prefect("deploy", "--all", "--prefect-file", str(prefect_file)),
        cwd=checkout, env=dict(env), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ServerError(f"`prefect deploy --all --prefect-file {prefect_file}` failed (exit {proc.returncode}):\n{tail}")


def deployed(api_url: str, specs: list[DeploymentSpec], auth_string: str | None = None) -> dict[str, str]:
    """What the API now holds, in prefect.yaml's order: `flow/deployment` -> its schedules
    and whether each is on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import DeploymentSort
    from prefect.settings import temporary_settings

    with temporary_settings(_client_settings(api_url, auth_string)), get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[s.name for s in specs])),
            sort=DeploymentSort.NAME_ASC,
        )
        flows = {flow_id: client.read_flow(flow_id).name for flow_id in {d.flow_id for d in deployments}}
    order = [spec.name for spec in specs]
    return {
        f"{flows[d.flow_id]}/{d.name}": ", ".join(
            f"{_schedule_text(s.schedule)} {'on' if s.active else 'off'}" for s in d.schedules
        ) or "no schedule"
        for d in sorted(deployments, key=lambda d: order.index(d.name))
    }


def _schedule_text(schedule: object) -> str:
    cron = getattr(schedule, "cron", None)
    return f"cron '{cron}' {schedule.timezone}" if cron else str(schedule)


@dataclass(frozen=True)
class Stack:
    """What `synthfactory server` runs: a Prefect server on host:port (or an existing one at
    `remote_api`), prefect.yaml's deployments, and a worker per work pool unless `run_worker`
    is off. Flow runs execute in `checkout` and release into `registry`."""

    checkout: Path
    prefect_file: Path
    registry: Path
    host: str = "127.0.0.1"
    port: int = 4200
    remote_api: str | None = None
    run_worker: bool = True

    @property
    def api_url(self) -> str:
        """Where this machine reaches the API (loopback when listening on every interface)."""
        if self.remote_api:
            return self.remote_api
        return f"http://{'127.0.0.1' if self.host in WILDCARD_HOSTS else self.host}:{self.port}/api"

    @property
    def reports_port(self) -> int:
        """The kept-reports site listens next to the UI (see `synthfactory.report_site`)."""
        return self.port + 1 if self.port < 65535 else self.port - 1

    @property
    def reports_url(self) -> str:
        """Where a browser opens the kept reports: the UI's host, on `reports_port`."""
        host = self.host if self.host not in WILDCARD_HOSTS else socket.gethostname()
        return f"http://{f'[{host}]' if ':' in host else host}:{self.reports_port}"


def serve(stack: Stack, say: Callable[[str], None]) -> None:
    """Start S3, server, deployments and workers; run until SIGINT/SIGTERM or until a child
    dies (then ServerError). Everything started here is stopped on the way out, in reverse
    order. With an existing server and no worker, it only deploys. Exposure and secrets are
    checked first: a refusal (ServerInputError) leaves nothing started or written."""
    check_exposure(stack, os.environ)
    specs = read_prefect_file(stack.prefect_file)
    if not stack.remote_api:
        check_port_free(stack.host, stack.port)
    if stack.run_worker:
        check_port_free(stack.host, stack.reports_port, "the failed-gate reports site (next to the UI's port)")
    pools = sorted({spec.work_pool for spec in specs})
    home = prefect_home()
    env, deploy_env, worker_env = child_environments(stack, os.environ, home)
    auth_string = deploy_env.get(CLIENT_AUTH_VAR)
    previous_handlers = {signum: signal.signal(signum, _shut_down) for signum in STOP_SIGNALS}
    try:
        with contextlib.ExitStack() as running:
            s3_env_file = _start_storage(running, worker_env, say) if stack.run_worker else None
            server = None
            if not stack.remote_api:
                home.mkdir(parents=True, exist_ok=True)
                if stop_local_api(home):  # a run's background server: this one takes over its database
                    say("stopped the background Prefect server that earlier runs used")
                server = Child("Prefect server", _prefect("server", "start", "--host", stack.host, "--port", str(stack.port)),
                               env, stack.checkout, log=home / "server.log")
                running.callback(server.stop, SERVER_GRACE_S)
                record(stack.api_url, server.proc.pid, "server", home)  # `synthfactory run` reports here meanwhile
                say(f"Prefect server starting at {stack.api_url.removesuffix('/api')} "
                    f"(database: {describe_database(home)}; log {server.log})")
            try:
                wait_until_healthy(stack.api_url, lambda: server.exit_reason() if server else None)
            except LocalApiError as exc:
                raise ServerError(str(exc)) from None
            for pool in pools:
                ensure_process_pool(stack.api_url, pool, auth_string)
            deploy(stack.prefect_file, stack.checkout, deploy_env)
            deployments = deployed(stack.api_url, specs, auth_string)
            say(f"deployed from {stack.prefect_file} to work pool {', '.join(pools)}:")
            for full_name, schedules in deployments.items():
                say(f"  {full_name:<24} {schedules}")
            children = [server] if server else []
            if stack.run_worker:
                ensure_registry(stack.registry, stack.checkout)
                reports = ReportSite(kept_reports_dir(), stack.host, stack.reports_port, worker_env.get(CLIENT_AUTH_VAR)).start()
                running.callback(reports.stop)
                for pool in pools:
                    worker = Child(f"worker for pool {pool!r}", _prefect("worker", "start", "--pool", pool, "--type", "process"),
                                   worker_env, stack.checkout)
                    running.callback(worker.stop, WORKER_GRACE_S)
                    children.append(worker)
            if not children:
                return
            say(_ready_message(stack, next(iter(deployments)), s3_env_file, auth=bool(auth_string)))
            supervise(children)
    except _Shutdown:
        say("stopped")
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _start_storage(running: contextlib.ExitStack, env: dict[str, str], say: Callable[[str], None]) -> str | None:
    """The embedded S3 unless the user configured storage; points `env` at its settings file.
    Returns that file, for the instructions."""
    if settings.storage_configured():
        say("S3: the storage configured in your environment")
        return None
    s3_dir = settings.embedded_s3_dir()
    started_here = daemon_config(s3_dir) is None
    if started_here:  # before starting, so that a Ctrl-C during the start stops it too
        running.callback(stop_daemon, s3_dir)
    try:
        config = start_daemon(s3_dir)
    except StorageError as exc:
        raise ServerError(str(exc)) from None
    env[ENV_FILE_VAR] = str(s3_dir / ENV_FILE)
    say(f"S3: embedded SeaweedFS at {config.endpoint_url}, bucket {config.bucket} "
        f"({'started' if started_here else 'already running'}; settings in {s3_dir / ENV_FILE})")
    return str(s3_dir / ENV_FILE)


def supervise(children: list[Child]) -> None:
    """Return never; raise ServerError naming the first child that exits."""
    while True:
        for child in children:
            code = child.exit_code()
            if code is not None:
                hint = f"; its log {child.log}:\n{child.log_tail()}" if child.log else " (its output is above)"
                raise ServerError(f"the {child.name} exited unexpectedly (exit {code}); stopping the rest{hint}")
        time.sleep(0.5)


def _shut_down(signum: int, frame: object) -> None:
    """The first Ctrl-C or SIGTERM starts the shutdown; later ones are ignored so that it
    finishes (every child gets SIGKILL after its grace period, so it stays bounded)."""
    for ignored in STOP_SIGNALS:
        signal.signal(ignored, signal.SIG_IGN)
    raise _Shutdown()


def _ready_message(stack: Stack, example: str, s3_env_file: str | None, auth: bool = False) -> str:
    load_s3 = f"set -a; . {s3_env_file}; set +a; " if s3_env_file else ""
    lines = [
        "",
        f"Ready. Prefect UI: {ui_url(stack.api_url)}  (Deployments: schedules, parameters, Run > Custom run)",
    ]
    if stack.run_worker:
        lines.append(f"Failed-gate reports and Data Docs: {stack.reports_url} (linked from each run's artifacts)")
    if auth:  # the variable's name only: the secret itself is never printed
        lines.append(f"The API requires basic auth: the UI asks for the user:password; clients read {CLIENT_AUTH_VAR}.")
    lines += [
        "Trigger a release from a shell" + (f" (with {CLIENT_AUTH_VAR} exported):" if auth else ":"),
        f"  PREFECT_API_URL={stack.api_url} prefect deployment run '{example}'",
    ]
    if stack.run_worker:
        lines += [
            f"Releases go to the registry {stack.registry}; list and pull them:",
            f"  synthfactory releases --registry {stack.registry}",
            f"  {load_s3}synthfactory pull DATASET[@vN] --registry {stack.registry}",
            f"  # or: git clone {stack.registry} release && cd release && git checkout DATASET@vN && dvc pull",
        ]
    else:
        lines += [
            "No worker here (--no-worker). Start one where the flows should run, in a checkout of this repo:",
            f"  synthfactory server --api-url {stack.api_url}",
        ]
    lines.append("Ctrl-C stops what was started here.")
    return "\n".join(lines)
