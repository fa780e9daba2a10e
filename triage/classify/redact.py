"""Personal data the label does not need is replaced before any text leaves for the API.

Intent, priority and language do not depend on who wrote the ticket or how to reach them, so
emails, phone numbers, card numbers, IBANs and the requester's name become placeholders, and
so do the values of credential-named link parameters (token=, password=...).
Order numbers and product names stay: they are often what the ticket is about.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Iterable

# An apostrophe is valid in a local part (o'brien@example.ie), and phones and word processors
# curl it; before the address it is a quote, which stays. One class after the first character
# keeps the pattern as cheap as one without apostrophes; a group per apostrophe was 3x slower.
_EMAIL = re.compile(r"[\w.+-][\w.+'\u2019-]*@[\w-]+(?:\.[\w-]+)+")
# An address percent-encoded in a link (?email=jo%40x.com, or %2540 when encoded twice); its
# local part may hold encoded characters too (ann%2Bshop). Tried only where a local part can
# start, with one character class, to keep it as cheap as _EMAIL.
_EMAIL_IN_URL = re.compile(r"(?<![\w.+%-])[\w.+%-][\w.+'%-]*%(?:25)?40[\w-]+(?:\.[\w-]+)+")
# A query or fragment value whose name says it is a credential (token=, api_key=, sig=,
# X-Amz-Signature=, password=, a verification or OAuth code=, a session id): a reset, login
# or confirmation link lets whoever holds it in. Only these names, so ids and other
# parameters the ticket may be about stay. Written as one word (apikey, sessionid) a name
# counts only in full: "monkey=" is not a key. A value ends where the next parameter can
# start (a path parameter's at ? or ;).
_URL_SECRET = re.compile(
    r"(?<=[?&;#])((?:(?:[\w-]*[_-])?(?:token|key|secret|sig|signature|password|passwd|pwd|otp"
    r"|code|auth|session|sid|jwt)|apikey|accesstoken|authtoken|sessionid|sessid|jsessionid"
    r"|phpsessid)=)[^&#;?\s\"'<>]+",
    re.IGNORECASE,
)
# A pasted HTTP credential lets whoever reads it in, as a link's token does: the value of an
# Authorization header ("Bearer abc...", "Basic dXNl..."), and a JWT wherever it stands (its
# header and payload are base64 JSON, so both start "eyJ"). The scheme word stays: "my Bearer
# token is rejected" is what the ticket is about.
_AUTH_VALUE = re.compile(r"\b((?:Bearer|Basic)\s+)([A-Za-z0-9._~+/-]{12,}=*)", re.IGNORECASE)
# A credential has digits or a capital inside (random or base64); a word does not ("Basic
# subscription", "bearer authentication"), and stays.
_CREDENTIAL_LIKE = re.compile(r"[0-9]|[a-z][A-Z]")
_JWT = re.compile(r"\beyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*")
# The same credential carried in a link's path, after a segment that says what the link does
# (/reset/<token>, Django's /reset/<uid>/<token>/, /magic-link/<token>, /invite/<token>):
# a run of 16 or more letters, digits, - and _ holding a random-looking part (eight or more
# letters and digits mixed). Order pages (/orders/A-99812) and slugs
# (/verify/how-to-verify-your-domain-step-2) stay.
_URL_PATH_SECRET = re.compile(
    r"(/(?:reset|reset[-_]?password|password[-_]?reset|set[-_]?password|verify|verification"
    r"|confirm|confirmation|activate|activation|magic|magic[-_]?link|login|signin|sign[-_]in"
    r"|invite|invitation|token|unsubscribe)(?:/[\w-]{1,12})?/)"
    r"([\w-]{16,})",
    re.IGNORECASE | re.ASCII,
)
_RANDOM_PART = re.compile(r"(?=[^-_]*\d)(?=[^-_]*[A-Za-z])[A-Za-z0-9]{8,}")
# Names of that shape that say what the value is, and it is no credential: the error or
# promo code, the country or currency a link carries, is what the ticket is about.
_URL_NOT_SECRET = re.compile(
    r"(?:error|status|response|reason|promo|promotion|coupon|discount|voucher|country|zip"
    r"|postal|post|currency|lang|language|locale|region|product|item|sku|tax|area|dial|color"
    r"|colour|size|style)[_-]?code=|(?:sort|group|order|partition|lookup|search|filter)[_-]?key=",
    re.IGNORECASE,
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# Country code, two check digits, then groups of four. Typed in lower or mixed case the same
# shape also fits ordinary words ("ab12 this that"), so only an all-capitals match with an
# account number's digits is taken on shape alone; any other must pass the IBAN check (mod
# 97), as a card must pass Luhn.
_IBAN = re.compile(
    r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b", re.IGNORECASE | re.ASCII
)
# International or grouped local numbers: at least 7 digits with separators, optional +cc.
# Not the digits of a reference glued to letters by a hyphen (INV-2026-000123, ORD-123-4567):
# order and invoice numbers are what a ticket is about.
_PHONE = re.compile(r"(?<![\w/])(?<!\w-)(?:\+|00)?\d[\d ()./-]{6,}\d(?![\w/])")
# Dates in any of the usual orders (2026-11-24, 24.11.2026, 11/24/2026), one separator each.
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{4}")
# What an amount has on either side and a phone number does not: decimals after it
# ("1.234.567,89 EUR", "1 234 567,89"), or a currency sign before it ("€1.234.567").
_DECIMALS_AFTER = re.compile(r"[.,]\d")
_CURRENCY_BEFORE = frozenset("$€£¥₹₺₽")
# A mobile number is often typed as one run of digits (612345678, 13800138000, 05321234567),
# which alone is no different from an order number; after a word that says phone, in the
# languages tickets come in, it is a phone number.
_PHONE_WORD_BEFORE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|mob|cell|cellphone|whatsapp|sms|call me|text me"
    r"|m[óo]vil|celular|tel[ée]fono|telefone|t[ée]l[ée]phone|portable|handy|telefon"
    r"|telefonnummer|handynummer|mobilnummer|cellulare|telefoon|mobiel|komórka|komórki"
    r"|numer telefonu|cep)\b"
    # Up to three short words between ("is", "de móvil es", "number:"), none of them one
    # that names what else the digits could be: "my phone order 123456789" is an order.
    r"[^\w\n]{0,4}(?:(?!(?:order|pedido|bestellung|commande|ordine|encomenda|bestelling"
    r"|zamówieni|sipariş|invoice|factura|rechnung|facture|fattura|ticket|case|account)\w*)"
    r"[^\W\d]{1,10}[^\w\n]{1,4}){0,3}$"
)
# Their common stems, as a cheap test before the pattern (both on lower-cased text: with
# IGNORECASE the pattern tried every position the slow way).
_PHONE_STEM = re.compile(
    r"phone|tel|mob|cell|whatsapp|sms|call me|text me|m[óo]vil|celular|t[ée]l"
    r"|portable|handy|cep|komórk"
)
# Looked for only in the few characters before each run of digits: searching the whole text
# for the words cost more than every other pattern together.
_DIGIT_RUN = re.compile(r"(?<![\w+])(?:\+|00)?\d{7,15}\b")
_PHONE_WORD_WINDOW = 64


def _phone_after_word(match: re.Match[str]) -> str:
    before = match.string[max(0, match.start() - _PHONE_WORD_WINDOW) : match.start()].lower()
    phone = _PHONE_STEM.search(before) and _PHONE_WORD_BEFORE.search(before)
    return "[PHONE]" if phone else match.group()


_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
# Four numbers with dots are also a version ("app version 2.14.0.3 crashes"), which is what a
# bug report is about: named as one, or with a number over 255, they are no address.
_VERSION_BEFORE = re.compile(
    r"(?:\bv|\bver\.?|version|versión|versão|versione|build|release|firmware)\s*:?\s*$",
    re.IGNORECASE,
)


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
    # Card numbers start 2 to 6 (Mastercard 2-series and 5, Visa 4, Amex/JCB/Diners 3,
    # Discover/UnionPay 6). One long order or tracking number in ten passes Luhn by chance;
    # those starting 0, 1, 7, 8 or 9 are no card and stay.
    if digits[0] not in "23456":
        return match.group()
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group()


def _iban(match: re.Match[str]) -> str:
    text = match.group()
    # In capitals a mistyped IBAN is still one, but so is the shape of a shouted sentence
    # ("MY ORDER AB12 WHEN WILL THIS SHIP"): taken on shape alone only with an account
    # number's digits after the check digits (every country's has at least eight).
    if text.isupper() and sum(ch.isdigit() for ch in text[4:]) >= 8:
        return "[IBAN]"
    iban = text.replace(" ", "").upper()
    number = int("".join(str(int(ch, 36)) for ch in iban[4:] + iban[:4]))
    return "[IBAN]" if number % 97 == 1 else text


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = re.sub(r"\D", "", text)
    # Dates and plain order numbers have no phone shape; need 7+ digits and either a
    # leading + / 00 or at least two separated groups. A wrong charge's amount stays too: it
    # decides the priority.
    if len(digits) < 7 or _DATE.fullmatch(text) or _is_amount(match) or _is_version(match):
        return text
    # A date and the hour after it ("2026-11-24 14:05", "24.11.2026 10:30") run together
    # into one match: the date and what little follows it are no phone number.
    date = _DATE.match(text)
    if date is not None and len(re.sub(r"\D", "", text[date.end() :])) < 7:
        return text
    grouped = len(re.findall(r"\d+", text)) >= 2
    return "[PHONE]" if text.startswith(("+", "00")) or grouped else text


def _is_version(match: re.Match[str]) -> bool:
    """A software version or build (Chrome 120.0.6099.109, Windows 10.0.19045.3693): numbers
    joined by dots only, one of them a single digit, or named as a version. Dotted phone
    numbers group their digits in twos to fours (06.12.34.56.78, 555.123.4567)."""
    text = match.group()
    if not re.fullmatch(r"\d+(?:\.\d+)+", text):
        return False
    before = match.string[max(0, match.start() - 16) : match.start()]
    return any(len(group) == 1 for group in text.split(".")) or bool(_VERSION_BEFORE.search(before))


def _url_secret(match: re.Match[str]) -> str:
    name = match.group(1)
    return match.group() if _URL_NOT_SECRET.fullmatch(name) else name + "[SECRET]"


def _url_path_secret(match: re.Match[str]) -> str:
    if _RANDOM_PART.search(match.group(2)):
        return match.group(1) + "[SECRET]"
    return match.group()


_DOTTED_MORE = re.compile(r"\.\d")


def _ipv4(match: re.Match[str]) -> str:
    text = match.group()
    before = match.string[max(0, match.start() - 16) : match.start()]
    if any(int(part) > 255 for part in text.split(".")) or _VERSION_BEFORE.search(before):
        return text
    # Four of five dotted groups (06.12.34.56.78) are a French phone number, not an address
    # followed by ".78": the phone pattern takes the whole.
    if _DOTTED_MORE.match(match.string, match.end()) or re.search(r"\d\.$", before):
        return text
    return "[IP]"


def _auth_value(match: re.Match[str]) -> str:
    if _CREDENTIAL_LIKE.search(match.group(2)):
        return match.group(1) + "[SECRET]"
    return match.group()


def _is_amount(match: re.Match[str]) -> bool:
    before = match.string[match.start() - 1 : match.start()]
    return before in _CURRENCY_BEFORE or bool(_DECIMALS_AFTER.match(match.string, match.end()))


def redact(text: str, *, names: Iterable[str] = (), emails: Iterable[str] = ()) -> str:
    """Replace personal data in `text`; `names` and `emails` are the requester's own."""
    return Redactor(names=names, emails=emails)(text)


class Redactor:
    """`redact` for one requester, for several texts. The requester's own email and name are
    matched by a pattern compiled only for a text that contains one of them: each ticket's
    are new, and compiling them for every ticket was a visible share of a worker's CPU."""

    def __init__(self, *, names: Iterable[str] = (), emails: Iterable[str] = ()) -> None:
        self._emails = [unicodedata.normalize("NFC", e) for e in dict.fromkeys(emails) if e]
        self._names = [
            part for name in names for part in _name_parts(unicodedata.normalize("NFC", name))
        ]

    def __call__(self, text: str) -> str:
        # "José" arrives as é or as e + combining accent, in the text and in the stored name
        # alike; compared as they are, one form hides the other (and a combining accent is no
        # \w, so it also cut addresses short). The whole text leaves in NFC: canonically
        # equivalent, it reads the same to the model, and it is far simpler and cheaper than
        # mapping matches back into the original. Text already in NFC, most of it, is returned
        # as it is after a quick check.
        out = unicodedata.normalize("NFC", text)
        out = _own(out, self._emails, "[EMAIL]", word=False)
        # Most tickets hold no link; a substring test is far cheaper than either pattern.
        if "=" in out:
            out = _URL_SECRET.sub(_url_secret, out)
        if "://" in out:
            out = _URL_PATH_SECRET.sub(_url_path_secret, out)
        if "eyJ" in out:
            out = _JWT.sub("[SECRET]", out)
        if "earer" in out or "asic" in out or "EARER" in out or "ASIC" in out:
            out = _AUTH_VALUE.sub(_auth_value, out)
        if "%40" in out or "%2540" in out:
            out = _EMAIL_IN_URL.sub("[EMAIL]", out)
        if "@" in out:
            out = _EMAIL.sub("[EMAIL]", out)
        out = _IBAN.sub(_iban, out)
        out = _CARD.sub(_card, out)
        out = _IPV4.sub(_ipv4, out)
        out = _PHONE.sub(_phone, out)
        out = _DIGIT_RUN.sub(_phone_after_word, out)
        return _own(out, self._names, "[NAME]", word=True)


def _own(text: str, literals: list[str], placeholder: str, *, word: bool) -> str:
    """Replace the literals, ignoring case as casefold() does, tried in the order given (a full
    name before its parts), whole words only if `word` (and then not a single word written
    in lower case)."""
    # Searched in the casefolded text, not with re.IGNORECASE, which does not fold ß to ss:
    # "JÖRG WEISS" is Jörg Weiß.
    folded = text.casefold()
    present = [f for f in dict.fromkeys(lit.casefold() for lit in literals) if f and f in folded]
    if not present:
        return text
    spans = _literal_spans(folded, present, word=word)
    if len(folded) != len(text):
        to_text = _FoldedPositions(text)
        spans = [(to_text(start, end=False), to_text(end, end=True)) for start, end in spans]
    parts, last = [], 0
    for start, end in spans:
        found = text[start:end]
        if word and found.islower() and found.isalpha():
            # One word of a name written in lower case is a word: Bill Turner's "my bill
            # doubled" and Anna Price's "the price is wrong" are what the ticket is about.
            # The whole name ("anna price"), a capitalised part ("Price", "PRICE") and one no
            # word is spelt like ("lee-smith", "o'brien") still go.
            continue
        parts += [text[last:start], placeholder]
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _literal_spans(text: str, literals: list[str], *, word: bool) -> list[tuple[int, int]]:
    r"""Where `re.finditer(r"\b(?:lit1|lit2...)\b", text)` would match (without the \b when
    not `word`): leftmost first, the earlier literal where two start together. Found with
    str.find rather than a pattern: every ticket's requester is new, and compiling a pattern
    for each was most of what redacting a ticket cost (about 70 of 110 us)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        best: tuple[int, int] | None = None
        for lit in literals:
            start = text.find(lit, pos)
            while start != -1 and word and not _whole_word(text, start, start + len(lit)):
                start = text.find(lit, start + 1)
            if start != -1 and (best is None or start < best[0]):
                best = (start, start + len(lit))
        if best is None:
            return spans
        spans.append(best)
        pos = best[1]


def _is_word_char(text: str, i: int) -> bool:
    # re's \w for str patterns: alphanumeric as str.isalnum() says, or the underscore.
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def _whole_word(text: str, start: int, end: int) -> bool:
    r"""Whether re's \b holds at both ends of text[start:end]."""
    return _is_word_char(text, start - 1) != _is_word_char(text, start) and _is_word_char(
        text, end - 1
    ) != _is_word_char(text, end)


class _FoldedPositions:
    """Maps a position in `text.casefold()` back to `text`. casefold() makes a few characters
    longer (ß -> ss, ﬁ -> fi), all of them outside ASCII, so only those are looked at."""

    def __init__(self, text: str) -> None:
        # For each lengthening character: where its fold starts and ends, and where it is.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._at: list[int] = []
        grown = 0
        for m in _NON_ASCII.finditer(text):
            size = len(m.group().casefold())
            if size > 1:
                self._starts.append(m.start() + grown)
                self._ends.append(m.start() + grown + size)
                self._at.append(m.start())
                grown += size - 1

    def __call__(self, pos: int, *, end: bool) -> int:
        k = bisect.bisect_right(self._starts, pos) - 1
        if k < 0:
            return pos
        if pos < self._ends[k]:
            # Inside one character's fold: a match's start or end takes in the whole character.
            return self._at[k] + (1 if end and pos > self._starts[k] else 0)
        return pos - (self._ends[k] - self._at[k] - 1)


def _name_parts(name: str) -> list[str]:
    # The full name first, then each part long enough not to hit ordinary words. A part
    # without a letter is not a name: in "Store 4417" the number is what the ticket is about.
    parts = [name.strip()] + [p for p in name.split() if len(p) >= 3]
    return [p for p in dict.fromkeys(parts) if any(ch.isalpha() for ch in p)]
