"""Regex PII screen for generated text: which kinds of personal data a string appears to hold.

Generators trained on web text can regurgitate e-mail addresses, phone numbers or card
numbers; a release should know before it ships. Each pattern is a compiled regex plus an
optional validator (Luhn for cards, `ipaddress` for IPs, digit counts) that rejects look-alikes
such as years, prices, versions, times and dimensions. Patterns run in table order and each
accepted match is blanked out before the next pattern runs, so a card or phone number is not
reported again as `long_digits`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PiiPattern:
    """A named PII regex; a match counts only if `valid(matched_text)` is true (when given)."""

    name: str
    regex: re.Pattern[str]
    valid: Callable[[str], bool] | None = None


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _luhn_ok(text: str) -> bool:
    digits = _digits(text)
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = int(ch)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _phone_ok(text: str) -> bool:
    """E.164 allows at most 15 digits; fewer than 10 is too short for a full number."""
    return 10 <= len(_digits(text)) <= 15


def _ssn_ok(text: str) -> bool:
    """US SSN rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ipv4_ok(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _ipv6_ok(text: str) -> bool:
    """A valid address holding at least one digit, so `dead::beef`-style tokens are skipped."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return any(ch.isdigit() for ch in text)


def _long_digits_ok(text: str) -> bool:
    return len(_digits(text)) >= 9


# Numbers must not be glued to a letter, digit, decimal point, sign or dash on either side.
_NUM_START = r"(?<![\w.+-])"
_NUM_END = r"(?![\w]|[.,-]\d)"
# Grouped card layouts: 4-4-4-4(-3), and Amex 4-6-5 / Diners 4-6-4; one separator throughout.
_CARD_GROUPS = (
    r"\d{4}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{4}(?:(?P=sep)\d{3})?"
    r"|\d{4}(?P<sep2>[ -])\d{6}(?P=sep2)\d{4,5}"
)

PII_PATTERNS: tuple[PiiPattern, ...] = (
    PiiPattern(
        "email",
        re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    ),
    PiiPattern(
        "phone",
        re.compile(
            # +CC then 2-5 groups, e.g. +1 415-555-0132, +44 20 7946 0958, +1 (415) 555-0132
            r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5}" + _NUM_END
            # North American national forms: (415) 555-0132, 415-555-0132, 1-800-555-0199
            + r"|" + _NUM_START + r"(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}" + _NUM_END
        ),
        _phone_ok,
    ),
    PiiPattern(
        "credit_card",
        re.compile(_NUM_START + r"(?:\d{13,19}|" + _CARD_GROUPS + ")" + _NUM_END),
        _luhn_ok,
    ),
    PiiPattern("ssn", re.compile(_NUM_START + r"\d{3}-\d{2}-\d{4}" + _NUM_END), _ssn_ok),
    PiiPattern(
        "ipv6",
        re.compile(
            r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:])"
        ),
        _ipv6_ok,
    ),
    PiiPattern("ipv4", re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)"), _ipv4_ok),
    # Any other run of >= 9 digits (dash-joined, or laid out like a card): account or ID
    # numbers, and card-shaped numbers that fail the Luhn check.
    PiiPattern(
        "long_digits",
        re.compile(_NUM_START + r"(?:" + _CARD_GROUPS + r"|\d+(?:-\d+)*)" + _NUM_END),
        _long_digits_ok,
    ),
)

_MAYBE_PII = re.compile(r"[\d@]")


def find_pii(text: str) -> list[str]:
    """Names of the PII patterns found in `text`, each once, in `PII_PATTERNS` order."""
    if not _MAYBE_PII.search(text):  # every pattern needs a digit or an "@"
        return []
    found: list[str] = []
    for pattern in PII_PATTERNS:
        hits = [m for m in pattern.regex.finditer(text) if pattern.valid is None or pattern.valid(m.group())]
        if hits:
            found.append(pattern.name)
            for match in reversed(hits):
                text = text[: match.start()] + " " * (match.end() - match.start()) + text[match.end() :]
    return found
