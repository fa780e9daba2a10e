"""How the fake "model" answers: from markers a test writes into the ticket, else a stable guess.

Markers: `[[intent:shipping]] [[priority:urgent]] [[confidence:0.3]] [[language:de]]
[[sentiment:negative]]`; a marker for one model only names it first:
`[[claude-sonnet-5/confidence:0.95]]` (a cascade's escalation model sure where the first was
not). The department comes from the taxonomy the system prompt lists, so the
fake answers like a model that read its instructions.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from typing import Any

_MARKER = re.compile(r"\[\[(\w+):([^\]]+)\]\]")
_MODEL_MARKER = re.compile(r"\[\[([\w.-]+)/(\w+):([^\]]+)\]\]")
_INTENT_LINE = re.compile(r"^- (\w+) \(department: (\w+)\)", re.M)


def departments_from_system(system: Any) -> dict[str, str]:
    if isinstance(system, list):
        system = "".join(block.get("text", "") for block in system if isinstance(block, dict))
    return dict(_departments_in(system or ""))


@lru_cache(maxsize=16)
def _departments_in(system: str) -> tuple[tuple[str, str], ...]:
    # Every call of a run sends the same system prompt; scanning it each time was a tenth of
    # this process's CPU, which the bench's triage shares two cores with.
    return tuple(_INTENT_LINE.findall(system))


def _enum(schema: dict[str, Any], field: str) -> list[str]:
    prop = schema.get("properties", {}).get(field, {})
    if "enum" in prop:
        return list(prop["enum"])
    if "const" in prop:
        return [prop["const"]]
    return []


def ticket_text(messages: list[dict[str, Any]]) -> str:
    """The first user turn (the ticket), whatever the content shape."""
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def label_for(
    text: str, schema: dict[str, Any], departments: dict[str, str], model: str | None = None
) -> dict[str, Any]:
    markers = dict(_MARKER.findall(text))
    markers.update({k: v for m, k, v in _MODEL_MARKER.findall(text) if m == model})
    intents = _enum(schema, "intent") or list(departments) or ["other"]
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    intent = markers.get("intent") or intents[digest % len(intents)]
    department = departments.get(intent) or (_enum(schema, "department") or ["general"])[0]
    return {
        "intent": intent,
        "department": department,
        "priority": markers.get("priority", "normal"),
        "language": markers.get("language", "en"),
        "sentiment": markers.get("sentiment", "neutral"),
        "confidence": float(markers.get("confidence", 0.9)),
        "summary": f"Customer writes about {intent}.",
    }


def answer_text(label: dict[str, Any]) -> str:
    return json.dumps(label, separators=(",", ":"))
