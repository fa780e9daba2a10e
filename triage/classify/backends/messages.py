"""One ticket as a Messages API request, and a Message back as a label's text and usage.

Shared by the real-time backend (`anthropic.py`) and the batch backfill, so that both send the
same system prompt, output schema and sampling parameters, and read answers the same way.
"""

from __future__ import annotations

from typing import Any

from anthropic.types import Message
from pydantic import BaseModel, ValidationError

from triage.classify.backends.base import ClassificationRequest, Usage
from triage.classify.prompt import prompt_version, system_prompt, user_message
from triage.classify.schema import output_schema
from triage.config import ModelSpec
from triage.errors import OutputTruncated, Refused, TransientError
from triage.metrics import CLASSIFY_COST, CLASSIFY_TOKENS
from triage.taxonomy import Taxonomy


class LabelRequest:
    """The parts of a labelling request that do not depend on the ticket, built once per
    taxonomy version and model so that every call sends byte-identical prompts (caching)."""

    def __init__(self, *, taxonomy: Taxonomy, model: str, spec: ModelSpec, max_tokens: int) -> None:
        self.taxonomy = taxonomy
        self.model = model
        self.spec = spec
        self.max_tokens = max_tokens
        self.system: Any = [
            {
                "type": "text",
                "text": system_prompt(taxonomy),
                "cache_control": {"type": "ephemeral"},
            }
        ]
        self.output_config: Any = {
            "format": {"type": "json_schema", "schema": output_schema(taxonomy)}
        }
        self.prompt_version = prompt_version(taxonomy)
        # Only models that accept sampling parameters get temperature; later ones answer 400.
        self.sampling: dict[str, Any] = {"temperature": 0} if spec.sampling else {}

    def messages(self, request: ClassificationRequest) -> list[dict[str, Any]]:
        return [{"role": "user", "content": user_message(request)}]

    def params(self, request: ClassificationRequest) -> dict[str, Any]:
        """The whole request body, as a Message Batches item's `params` carries it."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": self.system,
            "messages": self.messages(request),
            "output_config": self.output_config,
            **self.sampling,
        }


class AnswerBlock(BaseModel):
    type: str
    text: str = ""


class AnswerUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class Answer(BaseModel):
    """The fields of a Message that triage reads, parsed from the raw response body.

    The SDK's own parse builds every nested type of `Message` field by field in Python.
    One thread against the fake Messages API, a median 2,465 µs of CPU per call with it and
    2,068 µs with this; the call is a third of a worker's CPU per ticket.
    """

    id: str
    content: list[AnswerBlock]
    stop_reason: str | None = None
    usage: AnswerUsage

    @classmethod
    def of(cls, message: Message) -> Answer:
        """The same fields of a Message the SDK has already parsed (batch results)."""
        return cls.model_validate(message, from_attributes=True)


def read_answer(body: bytes, ticket_id: int, request_id: str | None) -> Answer:
    """A 200 whose body is not a Message (a proxy's error page, a body cut short) is a
    transient failure, like the dropped connection it usually is."""
    try:
        return Answer.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise TransientError(
            f"API answered 200 with a body that is not a Message ({len(body)} bytes; "
            f"{where}: {first['msg']})",
            ticket_id=ticket_id,
            request_id=request_id,
        ) from exc


def answer_text(message: Answer, ticket_id: int, request_id: str | None) -> str:
    """The label text of a finished Message; refusal and max_tokens stops are typed errors."""
    text = "".join(block.text for block in message.content if block.type == "text")
    if message.stop_reason == "refusal":
        # The model's words often paraphrase the ticket: quoted, stored but never logged.
        raise Refused(
            "model refused to label the ticket",
            quoted=text[:200] or "no explanation",
            ticket_id=ticket_id,
            request_id=request_id,
        )
    if message.stop_reason == "max_tokens":
        raise OutputTruncated(
            f"label cut off at max_tokens ({message.usage.output_tokens} tokens)",
            ticket_id=ticket_id,
            request_id=request_id,
        )
    if message.stop_reason == "model_context_window_exceeded":
        # Stopped where the model's context ran out: cut off like max_tokens, and a repair
        # call, sent with this answer on top, would only run out sooner.
        raise OutputTruncated(
            f"label cut off by the model's context window "
            f"({message.usage.input_tokens} input tokens)",
            ticket_id=ticket_id,
            request_id=request_id,
        )
    return text


def usage_of(message: Answer, spec: ModelSpec, model: str, *, batch: bool = False) -> Usage:
    """Tokens and cost of one Message; batch results cost the model's batch price. Counted in
    the spend metrics here, once per answer and under the model that gave it: an answer that
    is refused, cut off or invalid, or a cheap model's before an escalation, is paid for too."""
    u = message.usage
    cache_read = u.cache_read_input_tokens or 0
    cache_write = u.cache_creation_input_tokens or 0
    usage = Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cost_usd=spec.cost(u.input_tokens, u.output_tokens, cache_read, cache_write, batch=batch),
    )
    CLASSIFY_TOKENS.labels(model=model, kind="input").inc(usage.input_tokens)
    CLASSIFY_TOKENS.labels(model=model, kind="output").inc(usage.output_tokens)
    CLASSIFY_COST.labels(model=model).inc(float(usage.cost_usd))
    return usage
