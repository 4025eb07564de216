"""Texts you already have (curated prompts, captions written elsewhere), released through
the same checks, gate and versioning as generated data. Sample i is text i mod n."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pydantic import Field, ValidationInfo, model_validator

from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.generators.inputs import read_lines
from synthfactory.samples import Sample, SampleSlot


class TextListParams(GeneratorParams):
    texts: tuple[str, ...] = ()
    file: str | None = Field(None, description="one text per line, relative to the recipe")

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> "TextListParams":
        if not self.texts and self.file:
            object.__setattr__(self, "texts", read_lines("file", self.file, info))
        if not self.texts:
            raise ValueError("give `texts` or a non-empty `file`")
        return self


@GENERATORS.register("text-list")
class TextList(Generator):
    Params = TextListParams
    version = "1"
    code = ("synthfactory.generators.inputs",)
    params: TextListParams

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample]:
        for slot in slots:
            text = self.params.texts[slot.index % len(self.params.texts)]
            yield Sample(slot, text, {"txt": text.encode()}, payload="txt")
