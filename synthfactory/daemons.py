"""Background servers the CLI leaves running between commands (the embedded S3, the local
Prefect API): started detached, found again by pid, stopped politely."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Starts the daemon in its own session and exits at once, so the daemon is nobody's
# child: it outlives the CLI and never lingers as our zombie. Prints the daemon's pid.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "print(subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,"
    " stderr=subprocess.STDOUT, start_new_session=True, umask=0o077).pid)\n"
)


def spawn_detached(argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> int:
    """Start `argv` as a daemon writing to `log` (files and sockets it creates are private
    to this user); returns its pid."""
    launched = subprocess.run(
        [sys.executable, "-I", "-c", _LAUNCHER, str(log), *argv],
        cwd=cwd, env=dict(env), capture_output=True, text=True, check=False,
    )
    if launched.returncode != 0:
        raise OSError(f"could not launch {Path(argv[0]).name}: {launched.stderr.strip()[-500:]}")
    return int(launched.stdout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); its state in /proc says it is gone
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to `timeout` s, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on every interface."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a server could listen on `host`:`port` now. SO_REUSEADDR, as Go's and
    uvicorn's listeners set it, so TIME_WAIT connections a just-stopped server leaves do
    not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, offset: int = 0, lines: int = 25) -> str:
    """The last lines a daemon logged since `offset` (this start), for error messages."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(log is empty)"
