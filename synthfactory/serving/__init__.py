"""Clients for served LLMs (vLLM, SGLang, TGI, `transformers serve`, hosted OpenAI-compatible
APIs): adaptive concurrency, retries and a response cache, in plain Python for shard tasks."""

from synthfactory.serving.cache import ResponseCache, request_key
from synthfactory.serving.endpoint import (
    Completion,
    CompletionRequest,
    EndpointError,
    EndpointParams,
    EndpointStats,
    Failure,
    check_endpoint,
    complete_batch,
)

__all__ = [
    "Completion",
    "CompletionRequest",
    "EndpointError",
    "EndpointParams",
    "EndpointStats",
    "Failure",
    "ResponseCache",
    "check_endpoint",
    "complete_batch",
    "request_key",
]
