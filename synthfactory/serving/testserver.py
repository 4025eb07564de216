"""A real served model and a fault-injecting proxy in front of it, for tests and benchmarks.

`start_transformers_serve` runs `transformers serve` on a loopback port with a local model
directory. That server lists (GET /v1/models) only models in the Hugging Face hub cache,
never one pinned from a local path, so the directory is linked into a private hub cache
under a hub-style name (`synthfactory/<dir name>`), which is then the model's served name,
as `Qwen/Qwen2.5-0.5B-Instruct` would be.

`FaultProxy` forwards to it, answering some requests itself by a script (429 with
Retry-After, 500, a stall past the client's timeout) and counting what reached the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
from aiohttp import ClientSession, web

from synthfactory.daemons import free_ports, log_tail, terminate

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # loading a model on a busy 2-core CI machine takes a while
POLL_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 10.0


class ServedModel:
    """A running `transformers serve` process; stop it (or leave the `with` block) to end it."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, model_id: str, work_dir: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.model_id = model_id
        self.work_dir = work_dir  # the private hub cache and the server's log

    @property
    def log_path(self) -> Path:
        return self.work_dir / "serve.log"

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process.pid, STOP_TIMEOUT_S)
            self.process.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _link_into_hub_cache(model_dir: Path, model_id: str, hub: Path) -> None:
    """Make `model_dir` the `main` revision of `model_id` in the hub cache at `hub` (symlinks, no copies)."""
    repo = hub / f"models--{model_id.replace('/', '--')}"
    commit = hashlib.sha1(str(model_dir).encode()).hexdigest()  # any 40 hex digits name a snapshot
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for entry in model_dir.iterdir():
        (snapshot / entry.name).symlink_to(entry)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _serves(base_url: str, model_id: str) -> bool:
    try:
        response = httpx.get(f"{base_url}/models", timeout=5)
        return response.status_code == 200 and model_id in {entry["id"] for entry in response.json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


def start_transformers_serve(
    model_dir: Path,
    port: int | None = None,
    *,
    model_id: str | None = None,
    device: str = "auto",
    timeout_s: float = START_TIMEOUT_S,
) -> ServedModel:
    """Serve `model_dir` with this environment's `transformers serve` on 127.0.0.1:`port` (free if None),
    offline, and wait until GET /v1/models lists it. `model_id` (default `synthfactory/<dir name>`)
    is the name clients send as "model"."""
    executable = Path(sys.executable).parent / "transformers"
    if not executable.exists():
        raise FileNotFoundError(f"{executable} not found: install transformers[serving] in this environment")
    model_dir = Path(model_dir).resolve()
    model_id = model_id or f"synthfactory/{model_dir.name}"
    port = port or free_ports(1)[0]
    base_url = f"http://{HOST}:{port}/v1"
    work_dir = Path(tempfile.mkdtemp(prefix="synthfactory-serve-"))
    _link_into_hub_cache(model_dir, model_id, work_dir / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work_dir / "hub")}
    argv = [str(executable), "serve", "--host", HOST, "--port", str(port), "--device", device, model_id]
    with open(work_dir / "serve.log", "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    served = ServedModel(process, base_url, model_id, work_dir)
    deadline = time.monotonic() + timeout_s
    while not _serves(base_url, model_id):
        if process.poll() is not None or time.monotonic() > deadline:
            exited = process.poll() is not None
            what = f"exited with {process.returncode}" if exited else f"not up after {timeout_s:g} s"
            tail = log_tail(served.log_path)
            served.stop()
            raise RuntimeError(f"transformers serve for {model_dir} {what}:\n{tail}")
        time.sleep(POLL_INTERVAL_S)
    return served


@dataclass(frozen=True)
class Fault:
    """What the proxy answers instead of forwarding: an HTTP error, after a stall if `stall_s`."""

    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str = "injected fault"
    stall_s: float = 0.0

    @classmethod
    def error(cls, status: int, *, retry_after: str | None = None, message: str = "injected fault") -> Fault:
        return cls(status, {"Retry-After": retry_after} if retry_after is not None else {}, message)

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Hold the request `seconds` (or until the proxy stops), then answer 504: longer than
        the client's timeout, this is a server that stopped answering."""
        return cls(504, {}, "stalled", seconds)


@dataclass
class _Rule:
    fault: Fault
    prompt: str | None  # None: any request
    remaining: int | None  # None: forever
    path: str | None = None  # e.g. "/v1/completions"; None: any path


def _prompt_of(body: bytes) -> str | None:
    """A completions request's prompt, or a chat request's last message."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("prompt"), str):
        return data["prompt"]
    messages = data.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None
    return None


#: request headers passed upstream (no Host, lengths or encodings: aiohttp sets its own)
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")


class FaultProxy:
    """An HTTP proxy on a free loopback port, run by its own event loop in a background thread.

    `inject` queues faults; a request takes the first fault whose prompt matches (or that
    matches any prompt) and has uses left, else it is forwarded. `received` and `forwarded`
    count requests per (path, prompt); `authorizations` counts Authorization headers seen.
    """

    def __init__(self, upstream_base_url: str) -> None:
        parts = urllib.parse.urlsplit(upstream_base_url)
        self._upstream = f"{parts.scheme}://{parts.netloc}"
        self._api_path = parts.path
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self.received: Counter[tuple[str, str | None]] = Counter()
        self.forwarded: Counter[tuple[str, str | None]] = Counter()
        self.authorizations: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}{self._api_path}"

    def inject(self, fault: Fault, *, prompt: str | None = None, times: int | None = 1, path: str | None = None) -> None:
        """Answer the next `times` matching requests (all, if None) with `fault`."""
        with self._lock:
            self._rules.append(_Rule(fault, prompt, times, path))

    def reset(self) -> None:
        """Drop pending faults and zero the counts."""
        with self._lock:
            self._rules.clear()
            self.received.clear()
            self.forwarded.clear()
            self.authorizations.clear()

    def start(self) -> FaultProxy:
        sock = socket.socket()
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started = asyncio.run_coroutine_threadsafe(self._start(sock), self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        started.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    async def _start(self, sock: socket.socket) -> None:
        self._stopping = asyncio.Event()
        self._session = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        self._stopping.set()  # ends stalls, so the runner need not wait for them
        await self._runner.cleanup()
        await self._session.close()

    def _take_fault(self, path: str, prompt: str | None) -> Fault | None:
        for rule in self._rules:
            if rule.prompt in (None, prompt) and rule.path in (None, path) and rule.remaining != 0:
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule.fault
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = (request.path, _prompt_of(body))
        with self._lock:
            self.received[key] += 1
            self.authorizations[request.headers.get("Authorization", "")] += 1
            fault = self._take_fault(*key)
            if fault is None:
                self.forwarded[key] += 1
        if fault is not None:
            if fault.stall_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), fault.stall_s)
            return web.json_response(
                {"error": {"message": fault.message, "code": fault.status}}, status=fault.status, headers=fault.headers
            )
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        async with self._session.request(
            request.method, self._upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            payload = await upstream.read()
            content_type = upstream.headers.get("Content-Type", "application/json")
            return web.Response(status=upstream.status, body=payload, headers={"Content-Type": content_type})


#: role: content lines, then the assistant's turn; enough for /v1/chat/completions
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def serve_tiny_lm(root: Path) -> ServedModel:
    """A tiny random-weight llama (with a chat template, sampling on so `seed` matters),
    written under `root` and served by `transformers serve` on the CPU."""
    from synthfactory.tinymodels import write_tiny_causal_lm

    model_dir = write_tiny_causal_lm(root / "tiny-llm")
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config_path = model_dir / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "do_sample": True}))
    return start_transformers_serve(model_dir, device="cpu")
