"""Clients for served LLMs (vLLM, SGLang, TGI, `transformers serve`, hosted OpenAI-compatible
APIs): adaptive concurrency, retries and a response cache, in plain Python for shard tasks.

`params` (the recipe's endpoint block) is light; `endpoint` and `cache` import the HTTP
client, so import them where a shard actually calls a server."""
