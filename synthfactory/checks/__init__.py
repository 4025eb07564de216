"""Check plug-ins: each module in this package registers one check."""

from synthfactory.checks.base import CHECKS, CheckParams, SampleCheck, Verdict

__all__ = ["CHECKS", "CheckParams", "SampleCheck", "Verdict"]
