"""Send completion requests to a served LLM (vLLM, SGLang, TGI, `transformers serve`, hosted
OpenAI-compatible APIs) without letting one slow or failing request stop a shard.

`complete_batch` sends a shard's requests concurrently under an adaptive (AIMD) limit, as
NVIDIA NeMo Data Designer does: a server that answers 429/503 or stops answering in time
gets half the concurrency at once, and earns it back one request per round trip. Each
request retries transient errors (408/409/429/5xx, connection errors, timeouts) with
jittered exponential backoff, honouring Retry-After; what still fails becomes a `Failure`
with a one-line reason, so the shard records a rejection instead of crashing. Only a dead
endpoint (every request refused) or a bad configuration raises `EndpointError`.

The API key is read from the environment variable the params name; it never appears in
params, logs, cache keys or messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import httpx
import openai

from synthfactory.serving.params import EndpointParams


#: the api_key placeholder servers without auth accept (vLLM's and SGLang's convention)
NO_KEY = "EMPTY"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
#: statuses worth another try; other 4xx mean the request itself is wrong
RETRYABLE_4XX = frozenset({408, 409, 429})
#: statuses that mean "too much load": they cut the concurrency limit
OVERLOAD_STATUSES = frozenset({429, 503})
MAX_REASON_CHARS = 200
MAX_LISTED_MODELS = 20
#: a preflight answered 429/503 asks again this often (a busy server is alive), waiting
#: its Retry-After up to the cap
PREFLIGHT_BUSY_TRIES = 3
PREFLIGHT_BUSY_WAIT_CAP_S = 10.0

#: how an attempt went, as the concurrency limiter sees it
Outcome = Literal["success", "overload", "other"]


@dataclass(frozen=True)
class CompletionRequest:
    """One generation; for api="chat" the prompt is sent as a single user message."""

    prompt: str
    seed: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None  # from the server's `usage`; None if it reported none
    completion_tokens: int | None
    cached: bool  # answered from the response cache
    attempts: int  # HTTP attempts made (0 when cached)


@dataclass(frozen=True)
class Failure:
    """A request that gave up; `reason` is one line for a rejection record."""

    reason: str


@dataclass
class EndpointStats:
    """Counters for one batch or, merged, for a whole run."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    backoffs: int = 0  # times the concurrency limit was cut
    cache_hits: int = 0
    failures: int = 0  # requests that gave up
    timeouts: int = 0
    throttled: int = 0  # 429/503 answers
    server_errors: int = 0  # other 5xx answers
    prompt_tokens: int = 0  # as the server reported them; cached answers spend none
    completion_tokens: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    def merge(self, other: EndpointStats) -> EndpointStats:
        """Add `other`'s counters into these (shard stats summed into a run's); returns self."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def __iadd__(self, other: EndpointStats) -> EndpointStats:
        return self.merge(other)


class EndpointError(RuntimeError):
    """The endpoint cannot serve this run at all (dead, wrong URL, bad key, unknown model)."""


class AdaptiveLimiter:
    """AIMD concurrency limit: halve on overload, add 1/limit per success (one slot per round trip).

    Requests admitted before a cut were sent at the old rate, so their overloads say nothing
    new: each admission carries the epoch it was admitted in, and only an overload from the
    current epoch cuts again.
    """

    def __init__(self, max_limit: int) -> None:
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.in_flight = 0
        self._epoch = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> int:
        """Wait for a free slot; returns the admission epoch to hand back to `release`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
            return self._epoch

    async def release(self, epoch: int, outcome: Outcome) -> bool:
        """Free the slot and adapt the limit to `outcome`; True when this overload cut the limit."""
        async with self._changed:
            self.in_flight -= 1
            cut = outcome == "overload" and epoch == self._epoch
            if cut:
                self.limit = max(1.0, self.limit * 0.5)
                self._epoch += 1
            elif outcome == "success":
                self.limit = min(float(self.max_limit), self.limit + 1.0 / self.limit)
            self._changed.notify_all()
            return cut


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _api_key(params: EndpointParams) -> str:
    if params.api_key_env is None:
        return NO_KEY
    key = os.environ.get(params.api_key_env)
    if not key:
        raise EndpointError(
            f"api_key_env names ${params.api_key_env} for {params.base_url}, but it is not set: "
            f"export {params.api_key_env}=<your key> (or drop api_key_env for a server without auth)"
        )
    return key


def _one_line(text: str, secret: str) -> str:
    """`text` as one short line, with the API key masked should a server echo it."""
    if secret != NO_KEY:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _server_message(response: httpx.Response) -> str:
    """The human part of an error answer: OpenAI's error.message, FastAPI's detail, or the body."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for name in ("error", "detail", "message"):
            if body.get(name):
                return str(body[name])
    return str(body)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Drop the first stop string and what follows, as OpenAI's API does; some servers
    (`transformers serve`) stop generating there but return it, and answers must not
    depend on which server gave them (the cache is shared)."""
    ends = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return text[: min(ends)] if ends else text


def check_endpoint(params: EndpointParams, timeout_s: float = 10) -> None:
    """Preflight before a run: the endpoint answers GET {base_url}/models with our key and
    lists the model. Raises EndpointError naming the URL and what to check."""
    key = _api_key(params)
    url = f"{params.base_url}/models"
    key_hint = f"is ${params.api_key_env} the right key" if params.api_key_env else "does it need a key (api_key_env)"
    for attempt in range(PREFLIGHT_BUSY_TRIES):
        try:
            response = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)
        except httpx.HTTPError as err:
            raise EndpointError(
                f"cannot reach {url} ({_one_line(str(err) or type(err).__name__, key)}): "
                "is the server running and reachable from here, and is base_url right?"
            ) from None
        if response.status_code not in OVERLOAD_STATUSES:
            break
        if attempt == PREFLIGHT_BUSY_TRIES - 1:
            return  # alive but busy: the run's own back-off deals with that
        time.sleep(min(parse_retry_after(response.headers.get("Retry-After")) or 1.0, PREFLIGHT_BUSY_WAIT_CAP_S))
    if response.status_code in (401, 403):
        raise EndpointError(f"{url} refused the request (HTTP {response.status_code}): {key_hint}?")
    if response.status_code == 404:
        raise EndpointError(f"{url} does not exist (HTTP 404): does base_url end in /v1?")
    if response.status_code != 200:
        message = _one_line(_server_message(response), key)
        raise EndpointError(f"{url} answered HTTP {response.status_code}: {message}")
    try:
        served = [str(entry["id"]) for entry in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(
            f"{url} did not answer like an OpenAI-compatible API (no model list): does base_url end in /v1?"
        ) from None
    if params.model not in served:
        listed = ", ".join(served[:MAX_LISTED_MODELS]) + (", ..." if len(served) > MAX_LISTED_MODELS else "")
        raise EndpointError(
            f"{params.base_url} does not serve model {params.model!r}; it serves: {listed or '(none listed)'}"
        )


class _UnusableAnswer(Exception):
    """The server answered 200 but with nothing to use."""


@dataclass(frozen=True)
class _AttemptError:
    """Why one HTTP attempt failed, and what to do about it."""

    kind: Literal["status", "timeout", "connection", "bad_response"]
    message: str
    status: int | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status >= 500 or self.status in RETRYABLE_4XX
        return self.kind in ("timeout", "connection")

    @property
    def overload(self) -> bool:
        return self.kind == "timeout" or self.status in OVERLOAD_STATUSES

    def reason(self, attempts: int, timeout_s: float) -> str:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if self.kind == "status":
            return f"HTTP {self.status} after {tries}: {self.message}"
        if self.kind == "timeout":
            return f"timed out after {tries} (timeout_s={timeout_s:g})"
        if self.kind == "connection":
            return f"connection failed after {tries}: {self.message}"
        return f"unusable answer after {tries}: {self.message}"


class AnswerCache(Protocol):
    """Where answers are kept between runs (`synthfactory.serving.cache.ResponseCache`)."""

    def lookup(self, params: EndpointParams, request: CompletionRequest) -> Completion | None: ...

    def store(self, params: EndpointParams, request: CompletionRequest, completion: Completion) -> None: ...


class _Batch:
    """One complete_batch call: one client, one limiter, the stats it fills."""

    def __init__(
        self, params: EndpointParams, key: str, client: openai.AsyncOpenAI,
        cache: AnswerCache | None, stats: EndpointStats,
    ) -> None:
        self.params = params
        self.key = key
        self.client = client
        self.cache = cache
        self.stats = stats
        self.limiter = AdaptiveLimiter(params.max_concurrency)
        self.sent = 0  # requests that went to the server (not answered from the cache)
        self.refused = 0  # of those, gave up on connection errors

    async def complete(self, request: CompletionRequest) -> Completion | Failure:
        cached = await self._cached(request)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        self.sent += 1
        attempts = 0
        while True:
            attempts += 1
            result = await self._attempt(request)
            if isinstance(result, Completion):
                completion = dataclasses.replace(result, attempts=attempts)
                await self._remember(request, completion)
                return completion
            if not result.retryable or attempts > self.params.max_retries:
                self.stats.failures += 1
                if result.kind == "connection":
                    self.refused += 1
                return Failure(result.reason(attempts, self.params.timeout_s))
            self.stats.retries += 1
            await asyncio.sleep(self._backoff_s(attempts, result.retry_after))

    async def _cached(self, request: CompletionRequest) -> Completion | None:
        if self.cache is None:
            return None
        return await asyncio.to_thread(self.cache.lookup, self.params, request)

    async def _remember(self, request: CompletionRequest, completion: Completion) -> None:
        if self.cache is not None:
            await asyncio.to_thread(self.cache.store, self.params, request, completion)

    @staticmethod
    def _backoff_s(attempts: int, retry_after: float | None) -> float:
        """The server's Retry-After if it gave one (capped), else full jitter over an exponential ceiling."""
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_S)
        return random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempts - 1)))

    async def _attempt(self, request: CompletionRequest) -> Completion | _AttemptError:
        """One HTTP request under the adaptive limit; counts it in the stats."""
        epoch = await self.limiter.acquire()
        self.stats.requests += 1
        result: Completion | _AttemptError
        try:
            async with asyncio.timeout(self.params.timeout_s):
                result = await self._send(request)
        except (openai.APITimeoutError, TimeoutError):
            result = _AttemptError("timeout", "")
        except openai.APIConnectionError as err:
            result = _AttemptError("connection", _one_line(str(err.__cause__ or err), self.key))
        except openai.APIStatusError as err:
            result = _AttemptError(
                "status", _one_line(_server_message(err.response), self.key), err.status_code,
                parse_retry_after(err.response.headers.get("retry-after")),
            )
        except (openai.APIError, _UnusableAnswer) as err:  # answered, but not with a completion
            result = _AttemptError("bad_response", _one_line(str(err), self.key))
        except Exception as err:  # an answer of a shape we did not expect: this request fails, not the shard
            result = _AttemptError("bad_response", _one_line(f"{type(err).__name__}: {err}", self.key))
        if isinstance(result, _AttemptError):
            self._count_error(result)
        outcome: Outcome = "success" if isinstance(result, Completion) else "overload" if result.overload else "other"
        if await self.limiter.release(epoch, outcome):
            self.stats.backoffs += 1
        return result

    def _count_error(self, error: _AttemptError) -> None:
        if error.kind == "timeout":
            self.stats.timeouts += 1
        elif error.status in OVERLOAD_STATUSES:
            self.stats.throttled += 1
        elif error.status is not None and error.status >= 500:
            self.stats.server_errors += 1

    async def _send(self, request: CompletionRequest) -> Completion:
        arguments: dict[str, Any] = {
            "model": self.params.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if request.stop:
            arguments["stop"] = list(request.stop)
        if self.params.api == "chat":
            chat = await self.client.chat.completions.create(
                messages=[{"role": "user", "content": request.prompt}], **arguments
            )
            if not chat.choices:
                raise _UnusableAnswer("the answer has no choices")
            text, usage = chat.choices[0].message.content or "", chat.usage
        else:
            completion = await self.client.completions.create(prompt=request.prompt, **arguments)
            if not completion.choices:
                raise _UnusableAnswer("the answer has no choices")
            text, usage = completion.choices[0].text, completion.usage
        prompt_tokens = usage.prompt_tokens if usage is not None else None
        completion_tokens = usage.completion_tokens if usage is not None else None
        self.stats.prompt_tokens += prompt_tokens or 0
        self.stats.completion_tokens += completion_tokens or 0
        return Completion(_cut_at_stop(text, request.stop), prompt_tokens, completion_tokens, cached=False, attempts=1)


async def _complete_all(
    params: EndpointParams, requests: Sequence[CompletionRequest], cache: AnswerCache | None, stats: EndpointStats
) -> list[Completion | Failure]:
    key = _api_key(params)
    async with openai.AsyncOpenAI(
        base_url=params.base_url, api_key=key, max_retries=0, timeout=params.timeout_s
    ) as client:
        batch = _Batch(params, key, client, cache, stats)
        results = await asyncio.gather(*(batch.complete(request) for request in requests))
    if batch.sent and batch.refused == batch.sent:
        raise EndpointError(
            f"every request to {params.base_url} failed to connect: did the server stop, or is base_url wrong?"
        )
    return list(results)


def complete_batch(
    params: EndpointParams,
    requests: Sequence[CompletionRequest],
    *,
    cache: AnswerCache | None,
    stats: EndpointStats,
) -> list[Completion | Failure]:
    """Send `requests` concurrently under the adaptive limit; results in request order.

    Runs its own event loop, so call it from a thread without a running loop (a Prefect
    task worker). Per-request errors come back as `Failure`; EndpointError only for an
    unset API key variable or an endpoint that refused every connection.
    """
    started = time.monotonic()
    try:
        return asyncio.run(_complete_all(params, requests, cache, stats)) if requests else []
    finally:
        stats.wall_s += time.monotonic() - started
