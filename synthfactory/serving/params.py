"""Where a served model lives and how hard to push it: the recipe's `backend` block for an
OpenAI-compatible endpoint. Light on purpose (pydantic only): generator modules import it
in every shard worker, the HTTP client only when a shard calls a server."""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointParams(BaseModel):
    """Where a served model lives and how hard to push it."""

    # Inputs stay out of validation errors: a rejected base_url may carry a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    base_url: str = Field(description="the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="the model name the server serves")
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    max_concurrency: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(60, gt=0, le=3600)
    max_retries: int = Field(4, ge=0, le=20)
    revision: str | None = Field(None, description="the model revision, if known; part of the cache key")

    @field_validator("base_url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "base_url must not carry credentials (user:password@); put the key in an environment "
                "variable and name it in api_key_env"
            )
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_VAR_NAME.match(value):
            raise ValueError(
                "api_key_env is the NAME of the environment variable holding the key (like OPENAI_API_KEY), "
                "not the key itself"
            )
        return value
