"""A content-addressed cache of served completions, so a rerun or resumed shard asks the
server only for what it has not answered yet.

The key is what determines the answer (api, model, revision, prompt and sampling settings),
not where it came from: another server with the same model, or a rotated API key, reuses
the answers. One small JSON file per answer, written atomically, so concurrent shards and
crashes leave only whole entries; an entry that cannot be read is a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from synthfactory.files import atomic_write_json
from synthfactory.serving.endpoint import Completion, CompletionRequest
from synthfactory.serving.params import EndpointParams

#: bump when the key's contents or meaning change, so old entries are never mistaken for new ones
KEY_VERSION = 1


def request_key(params: EndpointParams, request: CompletionRequest) -> str:
    """The sha256 of the canonical JSON of everything that determines the answer."""
    identity = {
        "version": KEY_VERSION,
        "api": params.api,
        "model": params.model,
        "revision": params.revision,
        "prompt": request.prompt,
        "seed": request.seed,
        "max_tokens": request.max_tokens,
        "temperature": float(request.temperature),  # 1 and 1.0 ask for the same thing
        "top_p": float(request.top_p),
        "stop": list(request.stop),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Successful completions under `root/<first two hex digits>/<key>.json`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The cached completion (cached=True, attempts=0), or None on a miss or an unreadable entry."""
        try:
            entry: Any = json.loads(self.path(key).read_text(encoding="utf-8"))
            text, prompt_tokens, completion_tokens = entry["text"], entry["prompt_tokens"], entry["completion_tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        counts_ok = all(count is None or type(count) is int for count in (prompt_tokens, completion_tokens))
        if not isinstance(text, str) or not counts_ok:
            return None
        return Completion(text, prompt_tokens, completion_tokens, cached=True, attempts=0)

    def lookup(self, params: EndpointParams, request: CompletionRequest) -> Completion | None:
        return self.get(request_key(params, request))

    def store(self, params: EndpointParams, request: CompletionRequest, completion: Completion) -> None:
        self.put(request_key(params, request), completion)

    def put(self, key: str, completion: Completion) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        })
