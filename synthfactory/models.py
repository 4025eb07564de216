"""Model references, devices and loading for model-backed plug-ins.

A recipe names a model by hub id or local directory. `resolve_model` pins it to an exact
revision (the hub commit, or a content hash of a local directory) before anything loads,
so provenance records what really ran and a missing model fails with one message that
says what to do. Loading goes through the same `from_pretrained(path)` for real and tiny
test models; loaders are cached, so a worker process loads each model once.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import torch

DeviceName = str
DType = Literal["auto", "float32", "float16", "bfloat16"]
#: overrides every recipe's `device: auto` (e.g. SYNTHFACTORY_DEVICE=cpu on a GPU box)
DEVICE_ENV = "SYNTHFACTORY_DEVICE"
_CONFIG_FILES = ("config.json", "model_index.json")
T = TypeVar("T")


class ModelError(RuntimeError):
    """A model that cannot be used as configured; the message names it and the fix.

    Not transient: retrying the shard would fail the same way.
    """


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to one revision and a local directory to load it from."""

    id: str  # as the recipe names it
    revision: str  # hub commit sha, or "sha256:<hex>" of a local directory's files
    path: Path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


@functools.lru_cache(maxsize=32)
def _directory_hash(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """Content hash of every file in a model directory (cached per process and file stamps)."""
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode() + b"\0")
        with open(path / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _local_model(ref: str, role: str) -> ResolvedModel:
    path = Path(ref).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(f"{role} model {ref!r}: no such directory {path}")
    if not any((path / name).is_file() for name in _CONFIG_FILES):
        raise ModelError(
            f"{role} model {ref!r}: {path} has no config.json or model_index.json; "
            "point the recipe at a directory written by save_pretrained or a hub id"
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    stamp = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return ResolvedModel(ref, _directory_hash(path, stamp), path)


def _hub_model(ref: str, revision: str | None, role: str) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(ref, revision=revision, local_files_only=_offline()))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{role} model {ref!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: run `hf download {ref}` where there is "
            "network and copy HF_HOME here, or set the recipe's model to a local directory"
        ) from None
    except GatedRepoError:
        raise ModelError(
            f"{role} model {ref!r} is gated: accept its licence on huggingface.co and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"{role} model {ref!r}: no such repository on the hub (or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"{role} model {ref!r}: cannot fetch from the hub: {exc}") from None
    return ResolvedModel(ref, path.name, path)


def resolve_model(ref: str, revision: str | None = None, role: str = "generator") -> ResolvedModel:
    """Pin a hub id or local directory to an exact revision; ModelError if it is unusable.

    Online, a hub model not yet cached is downloaded here (whole snapshot), so workers
    never race to download it.
    """
    if _looks_local(ref):
        return _local_model(ref, role)
    return _hub_model(ref, revision, role)


def select_device(preference: DeviceName = "auto") -> DeviceName:
    """'auto' picks cuda, then mps, then cpu (SYNTHFACTORY_DEVICE overrides 'auto')."""
    import torch

    if preference == "auto":
        preference = os.environ.get(DEVICE_ENV, "auto")
    if preference == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = preference.split(":")[0]
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if kind not in available:
        raise ModelError(f"device {preference!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if not available[kind]:
        raise ModelError(f"device {preference!r} is not available on this machine; use device: auto or cpu")
    return preference


def torch_dtype(name: DType, device: DeviceName) -> "torch.dtype":
    """'auto' is float16 on accelerators (bfloat16 where the GPU has it) and float32 on CPU."""
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return getattr(torch, name)


def _memory_hint(device: DeviceName) -> str:
    import torch

    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {device}"
    return f"not enough memory on {device}"


@contextmanager
def explain_model_errors(model: ResolvedModel, device: DeviceName, doing: str) -> Iterator[None]:
    """Turn unloadable weights or an out-of-memory crash into a ModelError naming the model
    and what to try, instead of a traceback from deep inside torch."""
    import torch

    try:
        yield
    except OSError as exc:
        raise ModelError(f"{doing} {model.id}: cannot load the weights in {model.path}: {exc}") from exc
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        out_of_memory = isinstance(exc, torch.OutOfMemoryError | MemoryError) or any(
            phrase in str(exc).lower() for phrase in ("out of memory", "can't allocate memory")
        )
        if not out_of_memory:
            raise
        raise ModelError(
            f"{doing} {model.id} ran out of memory ({_memory_hint(device)}): lower batch_size, "
            "use dtype float16/bfloat16, run fewer workers per device, or set device: cpu"
        ) from exc


def load_once(loader: Callable[..., T]) -> Callable[..., T]:
    """Cache a loader per process: each worker loads a model once, however many shards it runs."""
    return functools.lru_cache(maxsize=4)(loader)


class ModelSettings(BaseModel):
    """The params every model-backed plug-in takes (mixed into its Params model)."""

    model: str = Field(description="hub id or local dir (save_pretrained layout)")
    revision: str | None = Field(None, description="hub branch, tag or commit; default main")
    device: DeviceName = "auto"
    dtype: DType = "auto"


class UsesModel:
    """Mixin for plug-ins whose params are `ModelSettings`: the model is resolved (not
    loaded) on first use, and `preflight` resolves it up front so a bad one fails early."""

    #: what the model does, in error messages ("caption model 'x' …")
    model_role: ClassVar[str]
    params: Any

    @cached_property
    def model(self) -> ResolvedModel:
        return resolve_model(self.params.model, self.params.revision, role=self.model_role)

    @cached_property
    def device(self) -> DeviceName:
        return select_device(self.params.device)

    def preflight(self) -> None:
        self.model, self.device  # noqa: B018  # resolving raises ModelError with the fix
