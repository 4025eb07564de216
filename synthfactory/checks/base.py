"""The sample-check plug-in interface.

A check looks at a batch of generated samples and returns one verdict per sample: the
manifest columns it measured (a score) and, when the sample fails, the reason. Like a
datatrove filter step it is one small class with one abstract method. Checks run inside
the shard task, right after generation, so a model-backed check (CLIP) batches on the
same device and loads once per worker; refused samples are kept aside with the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from synthfactory.generators.base import Sample
from synthfactory.plugins import Registry


class CheckParams(BaseModel):
    """Base of every check's params model: unknown keys are recipe errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Verdict:
    """A check's finding for one sample: measured columns, and a reason when it fails."""

    columns: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


class SampleCheck(ABC):
    """Subclass, declare `Params`, `columns` and `version`, implement `check`, register."""

    Params: ClassVar[type[CheckParams]]
    plugin_name: ClassVar[str]
    version: ClassVar[str]
    #: manifest columns the check adds, with their Arrow types
    columns: ClassVar[dict[str, pa.DataType]] = {}
    #: True when the check reads the sample's image (a recipe without images is an error)
    needs_images: ClassVar[bool] = False

    def __init__(self, params: CheckParams) -> None:
        self.params = params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "SampleCheck":
        return cls(cls.Params.model_validate(params))

    def preflight(self) -> None:
        """Fail fast, before any shard runs, on inputs that cannot work (missing model weights)."""

    @abstractmethod
    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order."""

    def column_minimums(self) -> dict[str, float]:
        """Lower bounds the validation gate re-asserts on the released manifest."""
        return {}


CHECKS: Registry[SampleCheck] = Registry("check", "synthfactory.checks")
