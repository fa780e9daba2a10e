"""Personal data the label does not need is replaced before any text leaves for the API.

Intent, priority and language do not depend on who wrote the ticket or how to reach them, so
emails, phone numbers, card numbers, IBANs and the requester's name become placeholders.
Order numbers and product names stay: they are often what the ticket is about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# International or grouped local numbers: at least 7 digits with separators, optional +cc.
_PHONE = re.compile(r"(?<![\w/])(?:\+|00)?\d[\d ()./-]{6,}\d(?![\w/])")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = re.sub(r"\D", "", text)
    # Dates (2026-11-24) and plain order numbers have no phone shape; need 7+ digits and
    # either a leading + / 00 or at least two separated groups.
    if len(digits) < 7 or re.fullmatch(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}", text):
        return text
    grouped = len(re.findall(r"\d+", text)) >= 2
    return "[PHONE]" if text.startswith(("+", "00")) or grouped else text


def redact(text: str, *, names: Iterable[str] = (), emails: Iterable[str] = ()) -> str:
    """Replace personal data in `text`; `names` and `emails` are the requester's own."""
    out = text
    for email in emails:
        if email:
            out = re.sub(re.escape(email), "[EMAIL]", out, flags=re.IGNORECASE)
    out = _EMAIL.sub("[EMAIL]", out)
    out = _IBAN.sub("[IBAN]", out)
    out = _CARD.sub(_card, out)
    out = _IPV4.sub("[IP]", out)
    out = _PHONE.sub(_phone, out)
    for name in names:
        for part in _name_parts(name):
            out = re.sub(rf"\b{re.escape(part)}\b", "[NAME]", out, flags=re.IGNORECASE)
    return out


def _name_parts(name: str) -> list[str]:
    # The full name first, then each part long enough not to hit ordinary words.
    parts = [name.strip()] + [p for p in name.split() if len(p) >= 3]
    return [p for p in dict.fromkeys(parts) if p]
