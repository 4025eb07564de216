"""The served-LLM client against a real `transformers serve` (tiny random model) behind a
fault-injecting proxy, plus unit tests of the pieces that need no server.

Faults are scripted per prompt, so every test uses prompts of its own and counts at the
proxy what reached the server. No test asserts an upper bound on time: CI has 2 busy cores.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from synthfactory.daemons import free_ports
from synthfactory.serving.cache import ResponseCache, request_key
from synthfactory.serving.endpoint import (
    AdaptiveLimiter,
    Completion,
    CompletionRequest,
    EndpointError,
    EndpointStats,
    Failure,
    _cut_at_stop,
    check_endpoint,
    complete_batch,
    parse_retry_after,
)
from synthfactory.serving.params import EndpointParams
from synthfactory.serving.testserver import Fault, FaultProxy, ServedModel, serve_tiny_lm

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """The tiny llama, sampling (so `seed` matters) and with a chat template, served for the module."""
    with serve_tiny_lm(tmp_path_factory.mktemp("serve")) as server:
        yield server


@pytest.fixture(scope="module")
def module_proxy(served: ServedModel) -> Iterator[FaultProxy]:
    with FaultProxy(served.base_url) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> FaultProxy:
    module_proxy.reset()
    return module_proxy


def params_for(url: str, model: str, **overrides: object) -> EndpointParams:
    return EndpointParams.model_validate({"base_url": url, "model": model, "timeout_s": 60, **overrides})


def ask(prompt: str, seed: int = 0, **overrides: object) -> CompletionRequest:
    fields: dict[str, object] = {"prompt": prompt, "seed": seed, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    return CompletionRequest(**{**fields, **overrides})  # type: ignore[arg-type]


def completions(results: list[Completion | Failure]) -> list[Completion]:
    assert all(isinstance(result, Completion) for result in results), results
    return results  # type: ignore[return-value]


# ---- against the real server ----


@pytest.mark.slow
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_both_apis_return_text_and_usage(served: ServedModel, proxy: FaultProxy, api: str) -> None:
    stats = EndpointStats()
    prompts = [f"{api}: a red circle", f"{api}: a blue square"]
    results = completions(complete_batch(
        params_for(proxy.base_url, served.model_id, api=api), [ask(p) for p in prompts], cache=None, stats=stats
    ))
    path = "/v1/completions" if api == "completions" else "/v1/chat/completions"
    assert [proxy.forwarded[(path, p)] for p in prompts] == [1, 1]
    for result in results:
        assert result.text and not result.cached and result.attempts == 1
        assert result.prompt_tokens and result.completion_tokens and result.completion_tokens <= 8
    assert stats.requests == 2 and stats.retries == stats.failures == stats.cache_hits == 0
    assert stats.prompt_tokens == sum(r.prompt_tokens or 0 for r in results)
    assert stats.completion_tokens == sum(r.completion_tokens or 0 for r in results)
    assert stats.wall_s > 0
    assert proxy.authorizations == {"Bearer EMPTY": 2}  # no api_key_env: the no-auth placeholder


@pytest.mark.slow
def test_key_comes_from_the_named_variable_and_never_shows(
    served: ServedModel, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-test-0123456789"
    monkeypatch.setenv("SERVING_TEST_KEY", secret)
    proxy.inject(Fault.error(401, message=f"Incorrect API key provided: {secret}"), prompt="key")
    params = params_for(proxy.base_url, served.model_id, api_key_env="SERVING_TEST_KEY")
    [result] = complete_batch(params, [ask("key")], cache=None, stats=EndpointStats())
    assert isinstance(result, Failure)
    assert secret not in result.reason and "***" in result.reason
    assert proxy.authorizations == {f"Bearer {secret}": 1}


@pytest.mark.slow
def test_429_waits_for_retry_after_and_cuts_the_limit(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.error(429, retry_after="1"), prompt="throttled", times=2)
    stats = EndpointStats()
    started = time.monotonic()
    [result] = completions(complete_batch(
        params_for(proxy.base_url, served.model_id), [ask("throttled")], cache=None, stats=stats
    ))
    assert time.monotonic() - started >= 2.0  # two Retry-After: 1 waits
    assert result.attempts == 3
    assert proxy.received[("/v1/completions", "throttled")] == 3
    assert proxy.forwarded[("/v1/completions", "throttled")] == 1
    assert (stats.requests, stats.retries, stats.throttled, stats.failures) == (3, 2, 2, 0)
    assert stats.backoffs == 2  # each retry was admitted after the previous cut, so each 429 cuts again


@pytest.mark.slow
def test_500s_are_retried_until_success(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.error(500), prompt="flaky", times=2)
    stats = EndpointStats()
    [result] = completions(complete_batch(
        params_for(proxy.base_url, served.model_id), [ask("flaky")], cache=None, stats=stats
    ))
    assert result.attempts == 3
    assert (stats.requests, stats.retries, stats.server_errors, stats.backoffs) == (3, 2, 2, 0)


@pytest.mark.slow
def test_a_request_that_keeps_failing_becomes_a_failure_alone(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.error(500, message="boom"), prompt="doomed", times=None)
    stats = EndpointStats()
    results = complete_batch(
        params_for(proxy.base_url, served.model_id, max_retries=2),
        [ask("doomed"), ask("fine 1"), ask("fine 2")], cache=None, stats=stats,
    )
    assert isinstance(results[0], Failure)
    assert results[0].reason == "HTTP 500 after 3 attempts: boom"
    completions(results[1:])
    assert proxy.received[("/v1/completions", "doomed")] == 3
    assert (stats.failures, stats.retries, stats.server_errors, stats.requests) == (1, 2, 3, 5)


@pytest.mark.slow
def test_a_stall_past_the_timeout_is_a_timeout_and_retried(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.stall(120), prompt="stalled")
    stats = EndpointStats()
    [result] = completions(complete_batch(
        params_for(proxy.base_url, served.model_id, timeout_s=3), [ask("stalled")], cache=None, stats=stats
    ))
    assert result.attempts >= 2
    assert stats.timeouts >= 1 and stats.backoffs >= 1 and stats.retries == result.attempts - 1
    assert proxy.forwarded[("/v1/completions", "stalled")] >= 1


@pytest.mark.slow
def test_a_request_that_keeps_timing_out_says_so(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.stall(120), prompt="hung", times=None)
    stats = EndpointStats()
    params = params_for(proxy.base_url, served.model_id, timeout_s=0.5, max_retries=1)
    [result] = complete_batch(params, [ask("hung")], cache=None, stats=stats)
    assert result == Failure("timed out after 2 attempts (timeout_s=0.5)")
    assert (stats.timeouts, stats.failures) == (2, 1)


@pytest.mark.slow
def test_client_errors_fail_at_once(served: ServedModel, proxy: FaultProxy) -> None:
    proxy.inject(Fault.error(404, message="no such route"), prompt="lost")
    stats = EndpointStats()
    unknown_model = complete_batch(params_for(proxy.base_url, "no/such-model"), [ask("who")], cache=None, stats=stats)
    lost = complete_batch(params_for(proxy.base_url, served.model_id), [ask("lost")], cache=None, stats=stats)
    assert unknown_model == [
        Failure(f"HTTP 400 after 1 attempt: Server is pinned to '{served.model_id}'; requested 'no/such-model'.")
    ]
    assert lost == [Failure("HTTP 404 after 1 attempt: no such route")]
    assert (stats.requests, stats.retries, stats.failures) == (2, 0, 2)


@pytest.mark.slow
def test_cache_answers_a_repeat_without_the_server(served: ServedModel, proxy: FaultProxy, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    requests = [ask(f"cached {i}", seed=i) for i in range(3)]
    params = params_for(proxy.base_url, served.model_id)
    first = completions(complete_batch(params, requests, cache=cache, stats=EndpointStats()))
    assert sum(proxy.forwarded.values()) == 3

    stats = EndpointStats()
    again = completions(complete_batch(params, requests, cache=cache, stats=stats))
    assert sum(proxy.forwarded.values()) == 3  # nothing more reached the server
    assert [r.text for r in again] == [r.text for r in first]
    assert all(r.cached and r.attempts == 0 for r in again)
    assert (stats.cache_hits, stats.requests, stats.prompt_tokens) == (3, 0, 0)

    elsewhere = params_for(served.base_url, served.model_id, max_concurrency=2)  # same model, other URL
    assert complete_batch(elsewhere, requests, cache=cache, stats=EndpointStats()) == again


@pytest.mark.slow
def test_seed_is_honoured_one_request_at_a_time(served: ServedModel) -> None:
    """What `transformers serve` does with `seed`: it seeds torch's global RNG before each
    generation, so one request at a time the same seed gives the same text and another
    seed another text. (Concurrent requests share that RNG, so there it is not reliable.)"""
    params = params_for(served.base_url, served.model_id, max_concurrency=1)

    def text(seed: int) -> str:
        [result] = completions(complete_batch(params, [ask("seeded", seed=seed)], cache=None, stats=EndpointStats()))
        return result.text

    first = text(7)
    assert text(7) == first
    assert text(8) != first


@pytest.mark.slow
def test_check_endpoint_accepts_the_served_model(served: ServedModel) -> None:
    check_endpoint(params_for(served.base_url, served.model_id))


@pytest.mark.slow
def test_check_endpoint_lists_the_served_models_for_an_unknown_one(served: ServedModel) -> None:
    with pytest.raises(EndpointError, match="does not serve model 'no/such-model'") as raised:
        check_endpoint(params_for(served.base_url, "no/such-model"))
    assert served.model_id in str(raised.value) and served.base_url in str(raised.value)


# ---- without a server ----


def dead_url() -> str:
    (port,) = free_ports(1)
    return f"http://127.0.0.1:{port}/v1"


def test_check_endpoint_names_a_dead_url() -> None:
    url = dead_url()
    with pytest.raises(EndpointError, match="is the server running") as raised:
        check_endpoint(params_for(url, "m"), timeout_s=5)
    assert f"{url}/models" in str(raised.value)


def test_an_unset_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVING_TEST_UNSET_KEY", raising=False)
    params = params_for(dead_url(), "m", api_key_env="SERVING_TEST_UNSET_KEY")
    with pytest.raises(EndpointError, match=r"\$SERVING_TEST_UNSET_KEY"):
        check_endpoint(params)
    with pytest.raises(EndpointError, match=r"\$SERVING_TEST_UNSET_KEY"):
        complete_batch(params, [ask("x")], cache=None, stats=EndpointStats())


def test_an_endpoint_refusing_every_request_raises() -> None:
    url = dead_url()
    stats = EndpointStats()
    with pytest.raises(EndpointError, match="every request to .* failed to connect") as raised:
        complete_batch(params_for(url, "m", max_retries=1), [ask("a"), ask("b")], cache=None, stats=stats)
    assert url in str(raised.value)
    assert (stats.requests, stats.failures) == (4, 2)


def test_empty_batch_sends_nothing() -> None:
    assert complete_batch(params_for(dead_url(), "m"), [], cache=None, stats=EndpointStats()) == []


@pytest.mark.parametrize(
    ("base_url", "api_key_env", "message"),
    [
        ("http://user:pw@host/v1", None, "base_url must not carry credentials"),
        ("ftp://host/v1", None, "base_url must be an http:// or https:// URL"),
        ("host:8000/v1", None, "base_url must be an http:// or https:// URL"),
        ("http://host/v1", "sk-abc123", "api_key_env is the NAME of the environment variable"),
        ("http://host/v1", "1KEY", "api_key_env is the NAME of the environment variable"),
    ],
)
def test_params_reject(base_url: str, api_key_env: str | None, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as raised:
        EndpointParams(base_url=base_url, model="m", api_key_env=api_key_env)
    assert "pw@" not in str(raised.value) and "sk-abc123" not in str(raised.value)  # inputs stay out of errors


def test_params_normalise_and_freeze() -> None:
    params = EndpointParams(base_url="https://api.example.com/v1/", model="m", api_key_env="OPENAI_API_KEY")
    assert params.base_url == "https://api.example.com/v1"
    with pytest.raises(ValidationError):
        EndpointParams(base_url="http://h/v1", model="m", max_concurrency=0)
    with pytest.raises(ValidationError):
        EndpointParams(base_url="http://h/v1", model="m", unknown=1)  # type: ignore[call-arg]


def test_request_key_ignores_the_url_but_not_what_shapes_the_answer() -> None:
    here = EndpointParams(base_url="http://a/v1", model="m")
    there = EndpointParams(base_url="https://b/v1", model="m", api_key_env="K", max_concurrency=2)
    request = ask("p", temperature=1)
    assert request_key(here, request) == request_key(there, ask("p", temperature=1.0))
    variants = [
        (here.model_copy(update={"model": "m2"}), request),
        (here.model_copy(update={"revision": "abc"}), request),
        (here.model_copy(update={"api": "chat"}), request),
        (here, ask("p2")), (here, ask("p", seed=1)), (here, ask("p", max_tokens=9)),
        (here, ask("p", top_p=0.5)), (here, ask("p", stop=("\n",))),
    ]
    keys = {request_key(params, variant) for params, variant in variants}
    assert len(keys) == len(variants) and request_key(here, request) not in keys


def test_cache_round_trip_and_corrupt_entries(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    key = request_key(EndpointParams(base_url="http://a/v1", model="m"), ask("p"))
    assert cache.get(key) is None
    cache.put(key, Completion("hello", 3, 2, cached=False, attempts=2))
    assert cache.path(key) == tmp_path / key[:2] / f"{key}.json"
    assert cache.get(key) == Completion("hello", 3, 2, cached=True, attempts=0)
    for corrupt in ("{not json", '{"text": 1, "prompt_tokens": null, "completion_tokens": null}', "[]"):
        cache.path(key).write_text(corrupt)
        assert cache.get(key) is None
    cache.put(key, Completion("again", None, None, cached=False, attempts=1))
    assert cache.get(key) == Completion("again", None, None, cached=True, attempts=0)


def test_stats_sum_across_shards() -> None:
    total = EndpointStats(requests=2, wall_s=1.5)
    total += EndpointStats(requests=3, cache_hits=1, wall_s=0.5)
    total.merge(EndpointStats(failures=1))
    expected = {**EndpointStats().as_dict(), "requests": 5, "cache_hits": 1, "failures": 1, "wall_s": 2.0}
    assert total.as_dict() == expected


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("1", now) == 1.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_stop_strings_are_cut_off() -> None:
    assert _cut_at_stop("a cat\nsat. then", ("\n", ".")) == "a cat"
    assert _cut_at_stop("a cat sat", ("\n",)) == "a cat sat"
    assert _cut_at_stop("a cat", ()) == "a cat"


def test_limiter_cuts_once_per_window_and_recovers_slowly() -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(8)
        tickets = [await limiter.acquire() for _ in range(3)]
        assert (limiter.limit, limiter.in_flight) == (8.0, 3)
        # three requests sent at the old rate all overload: one cut
        cuts = [await limiter.release(ticket, "overload") for ticket in tickets]
        assert cuts == [True, False, False] and limiter.limit == 4.0 and limiter.in_flight == 0
        # one admitted after the cut may cut again
        assert await limiter.release(await limiter.acquire(), "overload") and limiter.limit == 2.0
        for _ in range(3):
            await limiter.release(await limiter.acquire(), "overload")
        assert limiter.limit == 1.0  # the floor
        await limiter.release(await limiter.acquire(), "other")
        assert limiter.limit == 1.0
        await limiter.release(await limiter.acquire(), "success")
        assert limiter.limit == 2.0  # + 1/limit
        await limiter.release(await limiter.acquire(), "success")
        assert limiter.limit == 2.5
        for _ in range(100):
            await limiter.release(await limiter.acquire(), "success")
        assert limiter.limit == 8.0  # capped at max_concurrency

    asyncio.run(scenario())


def test_limiter_blocks_at_the_limit_until_a_slot_frees() -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(2)
        first, second = await limiter.acquire(), await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiting.done()
        await limiter.release(first, "overload")  # limit 1 with one still in flight: still full
        await asyncio.sleep(0)
        assert not waiting.done() and limiter.limit == 1.0
        await limiter.release(second, "other")
        assert await asyncio.wait_for(waiting, 10) == 1  # admitted in the epoch after the cut

    asyncio.run(scenario())
