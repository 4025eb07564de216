"""Producing a release: a recipe's job, its shards, the gate, and the publish transaction.

Plain Python steps that `flows/` and `tasks/` orchestrate; each module is one step:
job (inputs checked, work dir), build (one shard), shard_cache (resumable shards),
stage (merge + dataset checks), gate (Great Expectations, card, report), publish and
recovery (the registry transaction and its journal), verify, regenerate (CI).
Importing this package imports none of them, so shard workers load only what they use.
"""
