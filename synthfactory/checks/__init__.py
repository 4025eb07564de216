"""Check plug-ins: each module in this package registers one check."""

from synthfactory.checks.base import (
    CHECKS,
    Check,
    CheckParams,
    DatasetCheck,
    DatasetView,
    Findings,
    PreviousRelease,
    SampleCheck,
    Verdict,
)

__all__ = [
    "CHECKS",
    "Check",
    "CheckParams",
    "DatasetCheck",
    "DatasetView",
    "Findings",
    "PreviousRelease",
    "SampleCheck",
    "Verdict",
]
