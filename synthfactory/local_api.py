"""The local Prefect API a run reports to when no `PREFECT_API_URL` is configured.

Starting a Prefect server costs seconds (imports, and migrating a fresh database), so a
run does not start a temporary one each time: it reuses the local server that
`synthfactory server` or an earlier run left running, and otherwise starts one in the
background. That server keeps its SQLite database in the Prefect home (the data dir's
`prefect/`, or $PREFECT_HOME), serves the UI (every run can be looked at afterwards),
listens on loopback only and exits by itself after `IDLE_EXIT_S` without a request.

``<prefect home>/local-api.json`` records the running server (url, pid); a file lock
makes concurrent runs agree on one server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from synthfactory import settings
from synthfactory.daemons import free_ports, log_tail, pid_alive, spawn_detached, terminate
from synthfactory.files import atomic_write_json

RECORD, LOCK, LOG = "local-api.json", "local-api.lock", "local-api.log"
#: how long a fresh server may take to migrate its database and answer /health on a busy
#: 2-core machine (Prefect's own default for its temporary server, 20 s, is too short)
STARTUP_TIMEOUT_S = float(os.environ.get("SYNTHFACTORY_PREFECT_STARTUP_TIMEOUT_S", 300))
#: a background server started by a run exits after this long without a request
IDLE_EXIT_S = float(os.environ.get("SYNTHFACTORY_PREFECT_IDLE_EXIT_S", 1800))
HOST = "127.0.0.1"


def ui_url(api_url: str) -> str:
    """The current (v2) UI of the server at `api_url`; its root-level paths are the old UI's."""
    return api_url.removesuffix("/api") + "/v2"


class LocalApiError(RuntimeError):
    """The local Prefect server could not be started; the message says why and where its log is."""


def prefect_home() -> Path:
    """$PREFECT_HOME if the user set one, else <data dir>/prefect: the server's SQLite database,
    profiles and logs stay with the factory's other runtime state."""
    return Path(os.environ.get("PREFECT_HOME") or settings.data_dir() / "prefect").resolve()


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_healthy(api_url: str, exited: Callable[[], str | None], timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /health until it answers; `exited` returns why the server died (None while it
    runs), which ends the wait at once."""
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        reason = exited()
        if reason is not None:
            raise LocalApiError(f"the Prefect server exited during startup: {reason}")
        if time.monotonic() > deadline:
            raise LocalApiError(f"the Prefect API at {api_url} did not answer /health within {timeout:g} s")
        time.sleep(0.3)


def _recorded(home: Path) -> dict[str, Any] | None:
    """The recorded server if its process still runs (a Prefect server, not a reused pid)."""
    try:
        found = json.loads((home / RECORD).read_text())
        pid = int(found["pid"])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    is_server = b"local_api" in command or b"prefect" in command
    return found if pid_alive(pid) and is_server else None


def running(home: Path | None = None) -> dict[str, Any] | None:
    """The recorded local server if it is alive and answering, else None."""
    found = _recorded(home or prefect_home())
    return found if found is not None and healthy(found["url"]) else None


def record(api_url: str, pid: int, owner: str, home: Path | None = None) -> None:
    """Say where the local server is (`synthfactory server` records its own)."""
    home = home or prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_json(home / RECORD, {"url": api_url, "pid": pid, "owner": owner})


def ensure_local_api() -> tuple[str, bool]:
    """(API URL, started now): the running local server, or a new background one."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / LOCK)):
        found = _recorded(home)
        if found is not None:  # alive: maybe busy or still starting, so wait for it rather than start another
            pid = found["pid"]
            wait_until_healthy(found["url"], lambda: None if pid_alive(pid) else "it stopped")
            return found["url"], False
        (port,) = free_ports(1)
        api_url = f"http://{HOST}:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api_url,
            "PREFECT_UI_API_URL": api_url,  # the UI's own calls go to this port, not 4200
            "PREFECT_UI_URL": ui_url(api_url),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        log = home / LOG
        offset = log.stat().st_size if log.exists() else 0
        pid = spawn_detached(
            [sys.executable, "-P", "-m", "synthfactory.local_api", "--port", str(port), "--idle-exit", str(IDLE_EXIT_S)],
            log, env, home,
        )
        record(api_url, pid, "run", home)
        try:
            wait_until_healthy(api_url, lambda: None if pid_alive(pid) else f"log {log}:\n{log_tail(log, offset)}")
        except LocalApiError:
            terminate(pid, 5)
            (home / RECORD).unlink(missing_ok=True)
            raise
        return api_url, True


def stop_local_api(home: Path | None = None) -> bool:
    """Stop the recorded background server; False if none was running."""
    home = home or prefect_home()
    with FileLock(str(home / LOCK)):
        try:
            pid = json.loads((home / RECORD).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return False
        (home / RECORD).unlink(missing_ok=True)
        if not pid_alive(pid):
            return False
        terminate(pid, 15)
        return True


class _IdleExit:
    """ASGI middleware: counts open requests and connections, and tells the server to exit
    once none has been open for `idle_s`."""

    def __init__(self, app: Any, idle_s: float) -> None:
        self.app, self.idle_s = app, idle_s
        self.open, self.last = 0, time.monotonic()
        self.server: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.idle_s / 4))
            if self.open == 0 and time.monotonic() - self.last > self.idle_s:
                self.server.should_exit = True
                return


def _serve(port: int, idle_s: float) -> None:
    """The background server: Prefect's app (API, UI, services) under uvicorn on loopback."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = _IdleExit(create_app(final=True), idle_s)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    app.server = server

    async def main() -> None:
        watcher = asyncio.ensure_future(app.watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S)
    arguments = parser.parse_args()
    _serve(arguments.port, arguments.idle_exit)
