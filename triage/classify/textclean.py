"""The text a classifier should see: HTML turned into plain text, quoted reply chains and
signatures trimmed. The original body is stored untouched; only this derived text is
classified, hashed for reuse and sent to a model (fewer tokens, less noise, less personal data).
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "hr"}
)
_SKIP_TAGS = frozenset({"script", "style", "head", "title"})
_HTML_HINT = re.compile(r"<(?:p|div|br|html|body|span|table|blockquote|a|b|i|strong|em)\b", re.I)

# A line that opens a quoted earlier message, in the languages helpdesks see most.
_QUOTE_HEADERS = (
    re.compile(r"^\s*on\b.{0,200}\bwrote:\s*$", re.I),
    re.compile(r"^\s*el\b.{0,200}\bescribió:\s*$", re.I),
    re.compile(r"^\s*le\b.{0,200}\ba écrit\s*:\s*$", re.I),
    re.compile(r"^\s*am\b.{0,200}\bschrieb\b.{0,80}:\s*$", re.I),
    re.compile(r"^\s*em\b.{0,200}\bescreveu:\s*$", re.I),
    re.compile(r"^\s*il giorno\b.{0,200}\bha scritto:\s*$", re.I),
    re.compile(
        r"^\s*-{2,}\s*(original message|mensaje original|message d'origine|"
        r"ursprüngliche nachricht|mensagem original|messaggio originale)\s*-{2,}\s*$",
        re.I,
    ),
    re.compile(r"^\s*_{10,}\s*$"),
    re.compile(r"^\s*(from|de|von|da):\s.+$", re.I),
)

# A line that starts a signature block; everything from it on is dropped.
_SIGNATURE_OPENERS = re.compile(
    r"^\s*(--\s*|"
    r"(best|kind|warm)?\s*regards,?|thanks( and regards| in advance)?[,!.]?|thank you[,!.]?|"
    r"cheers,?|sincerely,?|best,?|"
    r"(un )?saludo(s)?( cordiales)?,?|atentamente,?|gracias[,!.]?|"
    r"cordialement,?|bien cordialement,?|merci( d'avance)?[,!.]?|bonne journée,?|"
    r"mit freundlichen grüßen,?|mfg,?|viele grüße,?|beste grüße,?|liebe grüße,?|danke[,!.]?|"
    r"atenciosamente,?|obrigad[oa][,!.]?|cordiali saluti,?|grazie[,!.]?|met vriendelijke groet,?|"
    r"sent from my (iphone|android|mobile).*)\s*$",
    re.I,
)
# A signature opener only counts near the end: "Thanks" at the top is a greeting, not a signature.
_SIGNATURE_TAIL_LINES = 8
# A line of the ticket's own text, not of a signature: a sentence ("I was charged twice."),
# a question, or a long line. Name, title, company, phone and address lines are short and
# unpunctuated.
# Thanks open a signature ("Thanks,\nAnna") but also stand alone before the request; a
# closing such as "Best regards" or "--" does not, and what follows it (a legal disclaimer
# in sentences too) is signature whatever it reads like.
_THANKS = re.compile(
    r"^\s*(thanks( in advance)?|thank you|gracias|merci( d'avance)?|danke|obrigad[oa]|grazie)"
    r"[,!.]?\s*$",
    re.I,
)
_CONTENT_LINE = re.compile(r"^\s*(?:\S+\s+){3,}\S*[.!]\s*$|^.*\?\s*$|^\s*(?:\S+\s+){7,}\S+")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._quote_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "blockquote":
            # Mail clients put the quoted earlier message in a blockquote.
            self._quote_depth += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and self._skip:
            self._skip -= 1
        elif tag == "blockquote" and self._quote_depth:
            self._quote_depth -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip and not self._quote_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts)).replace("\xa0", " ")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def looks_like_html(text: str) -> bool:
    return bool(_HTML_HINT.search(text))


def strip_quoted_reply(text: str) -> str:
    """Cut at the first line that opens a quoted earlier message; drop '>' lines."""
    kept: list[str] = []
    for line in text.splitlines():
        if any(p.match(line) for p in _QUOTE_HEADERS) and kept:
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line)
    return "\n".join(kept)


def strip_signature(text: str) -> str:
    lines = text.rstrip().splitlines()
    start = max(1, len(lines) - _SIGNATURE_TAIL_LINES)
    for i in range(start, len(lines)):
        # "Hi,\nThanks!\nI was charged twice..." opens no signature: what follows is the
        # ticket, and cutting there would leave "Hi," to classify.
        if _SIGNATURE_OPENERS.match(lines[i]) and not (
            _THANKS.match(lines[i]) and any(_CONTENT_LINE.match(line) for line in lines[i + 1 :])
        ):
            return "\n".join(lines[:i])
    return text


def clean_ticket_text(text: str) -> str:
    """Plain, trimmed text of a ticket body; never empty when the body had words."""
    plain = html_to_text(text) if looks_like_html(text) else text.replace("\r\n", "\n")
    trimmed = strip_signature(strip_quoted_reply(plain)).strip()
    trimmed = re.sub(r"[ \t]+", " ", trimmed)
    trimmed = re.sub(r"\n{3,}", "\n\n", trimmed)
    # Falling back to the whole text beats classifying nothing when trimming ate everything.
    return trimmed or " ".join(plain.split())
