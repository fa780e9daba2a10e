"""The one model that defines a label, and its JSON schema for structured outputs.

Intent and department are enums built from the taxonomy, so the API can only answer with labels
that exist. Both the pydantic model and the schema are built once per taxonomy version.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from triage.taxonomy import Priority, Sentiment, Taxonomy

SUMMARY_MAX_CHARS = 200


class TicketLabel(BaseModel):
    """A validated label. `intent` and `department` are checked against the taxonomy by the
    per-taxonomy subclass that `label_model` builds; this base is what the rest of triage uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intent: str
    department: str
    priority: Priority
    language: str = Field(
        pattern=r"^[a-z]{2}$", description="ISO 639-1 code of the customer's language"
    )
    sentiment: Sentiment
    confidence: float = Field(ge=0.0, le=1.0, description="How sure the label is, 0 to 1")
    summary: str = Field(
        min_length=1, description="One line for the agent, in English, without personal data"
    )

    @field_validator("summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # A NUL in the model's JSON ("\u0000") would fail the label's INSERT on PostgreSQL,
        # and with it every label recorded in the same transaction.
        line = " ".join(value.replace("\x00", " ").split())
        return line[:SUMMARY_MAX_CHARS]

    @field_validator("language", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        # A model names Brazilian Portuguese "pt-BR" and Traditional Chinese "zh-Hant" often
        # enough; the language is the part before the region or script, not a repair call.
        if not isinstance(value, str):
            return value
        return re.split(r"[-_]", value.strip(), maxsplit=1)[0].lower()


# ISO 639-1: the codes a label's language may be. Checked on what a model answers (not on
# labels already stored), so that a made-up two-letter code is repaired, not routed.
_ISO_639_1_CODES = (
    "aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu "
    "cv cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he "
    "hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko "
    "kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd "
    "ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se "
    "sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty "
    "ug uk ur uz ve vi vo wa wo xh yi yo za zh zu"
)
ISO_639_1 = frozenset(_ISO_639_1_CODES.split())


def _iso_639_1(value: str) -> str:
    if value not in ISO_639_1:
        raise ValueError(f"{value!r} is not an ISO 639-1 language code")
    return value


@lru_cache(maxsize=8)
def label_model(taxonomy: Taxonomy) -> type[TicketLabel]:
    """The TicketLabel subclass whose intent/department are this taxonomy's enums."""
    intents: Any = Literal[taxonomy.intent_names]
    departments: Any = Literal[taxonomy.department_names]
    return create_model(
        "TicketLabel",
        __base__=TicketLabel,
        intent=(intents, Field(description="One intent from the taxonomy")),
        department=(departments, Field(description="The department that owns this intent")),
        __validators__={"_iso_639_1": field_validator("language")(_iso_639_1)},
    )


def validate_label(taxonomy: Taxonomy, data: str | bytes | dict[str, Any]) -> TicketLabel:
    """Validate model output against the taxonomy; raises pydantic.ValidationError."""
    model = label_model(taxonomy)
    if isinstance(data, dict):
        parsed = model.model_validate(data)
    else:
        parsed = model.model_validate_json(data)
    # Return the plain base type so callers never depend on the generated class.
    return TicketLabel.model_validate(parsed.model_dump())


@lru_cache(maxsize=8)
def _output_schema(taxonomy: Taxonomy) -> dict[str, Any]:
    schema: dict[str, Any] = _strict_schema(label_model(taxonomy).model_json_schema())
    return schema


def output_schema(taxonomy: Taxonomy) -> dict[str, Any]:
    """The JSON schema sent as `output_config.format` (a copy; the cached one stays intact)."""
    return copy.deepcopy(_output_schema(taxonomy))


# Structured outputs accept a subset of JSON Schema: every object closed and fully required,
# and no numeric or string-length bounds. Bounds move into the description; pydantic still
# enforces them when the answer comes back.
_UNSUPPORTED = ("minimum", "maximum", "minLength", "maxLength", "pattern", "title", "default")


def _strict_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in node.items():
        if key in _UNSUPPORTED:
            if key not in ("title", "default"):
                notes.append(f"{key}: {value}")
            continue
        out[key] = _strict_schema(value)
    if out.get("type") == "object":
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties", {}))
    if notes:
        base = out.get("description", "")
        out["description"] = (base + " " if base else "") + "{" + ", ".join(notes) + "}"
    return out
