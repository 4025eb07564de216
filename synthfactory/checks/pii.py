"""Privacy: refuse samples whose text contains personal data (emails, phone numbers,
card numbers, IP addresses, long digit strings). LLM text can leak what the model saw;
a hit rejects the sample with the patterns found, and the report counts them by pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, field_validator

from synthfactory.checks.base import CHECKS, CheckParams, SampleCheck, Verdict
from synthfactory.samples import Sample
from synthfactory.quality.privacy import PII_PATTERNS, find_pii

PATTERN_NAMES = tuple(pattern.name for pattern in PII_PATTERNS)

REASON_PREFIX = "pii: "


class PiiParams(CheckParams):
    patterns: tuple[str, ...] = Field(PATTERN_NAMES, description="pattern names to look for")
    text_files: tuple[str, ...] = Field(("txt",), description="sample members scanned besides the caption")

    @field_validator("patterns")
    @classmethod
    def _known(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in patterns if p not in PATTERN_NAMES]
        if unknown:
            raise ValueError(f"unknown PII pattern {unknown[0]!r}; available: {', '.join(PATTERN_NAMES)}")
        return patterns


@CHECKS.register("pii")
class Pii(SampleCheck):
    Params = PiiParams
    version = "1"
    code = ("synthfactory.quality.privacy",)
    params: PiiParams

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = []
        for sample in samples:
            texts = [sample.caption] + [
                sample.files[ext].decode("utf-8", "replace") for ext in self.params.text_files if ext in sample.files
            ]
            found = [name for name in find_pii("\n".join(texts)) if name in self.params.patterns]
            verdicts.append(Verdict(reason=REASON_PREFIX + ", ".join(found) if found else None))
        return verdicts
