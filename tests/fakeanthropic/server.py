"""A fake Anthropic Messages API over real HTTP, for the real `anthropic` SDK to talk to through
`base_url`. It answers `POST /v1/messages` and the Message Batches endpoints, validates what a
request must carry, records every request, measures calls in flight, and injects faults.

In-process: `with FakeAnthropic(latency=0.5) as fake: ... fake.base_url`.
Out of process: `python -m tests.fakeanthropic --port 8765`, steered over `/_control/*`.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakeanthropic.faults import Fault, FaultPlan
from tests.fakeanthropic.labeler import answer_text, departments_from_system, label_for, ticket_text

# Models released after Opus 4.6 answer 400 to any sampling parameter.
NO_SAMPLING_MODELS = frozenset({"claude-haiku-5-5", "claude-sonnet-5", "claude-opus-5"})
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
BATCH_KINDS = frozenset({"batch_errored", "batch_expired", "batch_refusal"})
CREATE_KINDS = frozenset({"batch_create_error"})
MAX_BATCH_REQUESTS = 100_000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    id: str
    requests: list[dict[str, Any]]
    created: datetime
    ready_at: float
    results: list[dict[str, Any]] | None = None
    canceled: bool = False


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class FakeAnthropic:
    """The fake API. `latency` is seconds per message, or a (low, high) range drawn uniformly."""

    def __init__(
        self,
        latency: float | tuple[float, float] = 0.0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        batch_delay: float = 0.5,
        record: bool = True,
        seed: int = 7,
    ) -> None:
        self.latency = latency
        self.batch_delay = batch_delay
        self.record = record
        self.requests: list[Recorded] = []
        self.faults = FaultPlan(seed)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._calls = 0
        self._in_flight = 0
        self.peak_in_flight = 0
        self._batches: dict[str, _Batch] = {}
        self._stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeAnthropic:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-anthropic", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steering and observing --------------------------------------------------------------
    def add_fault(self, fault: Fault) -> Fault:
        return self.faults.add(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def call_count(self) -> int:
        with self._lock:
            return self._calls

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = 0
            self.peak_in_flight = 0
            self.requests.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "in_flight": self._in_flight,
                "peak_in_flight": self.peak_in_flight,
                "batches": len(self._batches),
                "faults": [f.to_json() for f in self.faults.snapshot()],
            }

    # -- the Messages API --------------------------------------------------------------------
    def _delay(self) -> float:
        if isinstance(self.latency, tuple):
            low, high = self.latency
            with self._lock:
                return self._rng.uniform(low, high)
        return float(self.latency)

    def _enter(self) -> None:
        with self._lock:
            self._calls += 1
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def check_params(self, params: Any) -> str | None:
        """Why a Messages request is invalid, as the real API would say; None when valid."""
        if not isinstance(params, dict):
            return "request body must be a JSON object"
        missing = [k for k in ("model", "max_tokens", "messages") if k not in params]
        if missing:
            return f"{', '.join(missing)}: Field required"
        if not isinstance(params["max_tokens"], int) or params["max_tokens"] < 1:
            return "max_tokens: must be a positive integer"
        if not isinstance(params["messages"], list) or not params["messages"]:
            return "messages: at least one message is required"
        if params["model"] in NO_SAMPLING_MODELS:
            sent = [p for p in SAMPLING_PARAMS if p in params]
            if sent:
                return f"{sent[0]}: sampling parameters are not supported for {params['model']}"
        fmt = (params.get("output_config") or {}).get("format")
        if fmt is not None and (fmt.get("type") != "json_schema" or "schema" not in fmt):
            return "output_config.format: expected {type: json_schema, schema: {...}}"
        return None

    def message(self, params: dict[str, Any], stop_reason: str = "end_turn") -> dict[str, Any]:
        """A successful Message for `params` (the labeler's answer)."""
        text = ticket_text(params["messages"])
        schema = ((params.get("output_config") or {}).get("format") or {}).get("schema") or {}
        departments = departments_from_system(params.get("system"))
        label = label_for(text, schema, departments, params.get("model"))
        answer = answer_text(label)
        return self._envelope(params, answer, stop_reason)

    def _envelope(self, params: dict[str, Any], text: str, stop_reason: str) -> dict[str, Any]:
        prompt = json.dumps(params.get("system", "")) + json.dumps(params["messages"])
        return {
            "id": _new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": _tokens(prompt),
                "output_tokens": _tokens(text),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    def faulty_message(self, params: dict[str, Any], kind: str) -> dict[str, Any]:
        """A 200 answer that is wrong in the way `kind` says."""
        good = self.message(params)
        text = good["content"][0]["text"]
        if kind == "malformed_json":
            return self._envelope(params, "Sure! Here is the label: {intent: billing", "end_turn")
        if kind == "truncated":
            return self._envelope(params, text[: len(text) // 2], "max_tokens")
        if kind == "context_window":
            return self._envelope(params, text[: len(text) // 2], "model_context_window_exceeded")
        if kind == "refusal":
            return self._envelope(params, refusal_text(params), "refusal")
        broken = json.loads(text)
        broken["intent"] = "not_an_intent"
        broken.pop("summary", None)
        return self._envelope(params, json.dumps(broken), "end_turn")

    # -- batches -----------------------------------------------------------------------------
    def create_batch(self, body: Any) -> tuple[int, dict[str, Any]]:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return 400, _error_body(400, "requests: at least one request is required")
        if len(requests) > MAX_BATCH_REQUESTS:
            return 400, _error_body(400, f"requests: at most {MAX_BATCH_REQUESTS} per batch")
        ids = [r.get("custom_id") for r in requests]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) and i for i in ids):
            return 400, _error_body(400, "requests: custom_id must be unique non-empty strings")
        for r in requests:
            problem = self.check_params(r.get("params"))
            if problem:
                return 400, _error_body(400, f"requests[{r['custom_id']}].params.{problem}")
        if self.faults.pick(json.dumps(requests), CREATE_KINDS) is not None:
            return 500, _error_body(500, "internal error")
        batch = _Batch(
            id=_new_id("msgbatch"),
            requests=requests,
            created=datetime.now(UTC),
            ready_at=time.monotonic() + self.batch_delay,
        )
        with self._lock:
            self._batches[batch.id] = batch
        return 200, self._batch_view(batch)

    def batch(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        batch = self._batches.get(batch_id)
        if batch is None:
            return 404, _error_body(404, f"batch {batch_id} not found")
        return 200, self._batch_view(batch)

    def cancel_batch(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        batch = self._batches.get(batch_id)
        if batch is None:
            return 404, _error_body(404, f"batch {batch_id} not found")
        batch.canceled = True
        return 200, self._batch_view(batch)

    def batch_results(self, batch_id: str) -> tuple[int, bytes | dict[str, Any]]:
        batch = self._batches.get(batch_id)
        if batch is None:
            return 404, _error_body(404, f"batch {batch_id} not found")
        self._finish(batch)
        if batch.results is None:
            return 400, _error_body(400, "batch has not finished processing")
        lines = [json.dumps(r) for r in batch.results]
        return 200, ("\n".join(lines) + "\n").encode()

    def _finish(self, batch: _Batch) -> None:
        with self._lock:
            if batch.results is not None or (
                time.monotonic() < batch.ready_at and not batch.canceled
            ):
                return
            batch.results = [self._batch_item(batch, r) for r in batch.requests]

    def _batch_item(self, batch: _Batch, item: dict[str, Any]) -> dict[str, Any]:
        custom_id, params = item["custom_id"], item["params"]
        if batch.canceled:
            return {"custom_id": custom_id, "result": {"type": "canceled"}}
        text = custom_id + "\n" + ticket_text(params["messages"])
        fault = self.faults.pick(text, BATCH_KINDS, params.get("model"))
        if fault is not None and fault.kind == "batch_expired":
            return {"custom_id": custom_id, "result": {"type": "expired"}}
        if fault is not None and fault.kind == "batch_refusal":
            refused = self._envelope(params, refusal_text(params), "refusal")
            return {"custom_id": custom_id, "result": {"type": "succeeded", "message": refused}}
        if fault is not None:
            return {
                "custom_id": custom_id,
                "result": {"type": "errored", "error": _error_body(500, "internal error")},
            }
        return {
            "custom_id": custom_id,
            "result": {"type": "succeeded", "message": self.message(params)},
        }

    def _batch_view(self, batch: _Batch) -> dict[str, Any]:
        self._finish(batch)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.results is None:
            counts["processing"] = len(batch.requests)
        else:
            for r in batch.results:
                counts[r["result"]["type"]] += 1
        ended = batch.results is not None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": _iso(batch.created),
            "expires_at": _iso(batch.created + timedelta(hours=24)),
            "ended_at": _iso(datetime.now(UTC)) if ended else None,
            "cancel_initiated_at": _iso(batch.created) if batch.canceled else None,
            "archived_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results"
            if ended
            else None,
        }


def refusal_text(params: dict[str, Any]) -> str:
    """A refusal as real models word them: often naming what they refuse in the ticket's own
    words (here its subject line), so what quotes a refusal quotes the customer."""
    lines = ticket_text(params.get("messages") or []).splitlines()
    subject = next((line[len("Subject: ") :] for line in lines if line.startswith("Subject: ")), "")
    if not subject:
        return "I can't help with classifying this."
    return f"I can't help with classifying a request about {subject!r}."


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
    }


_FAULT_STATUS = {
    "rate_limit": 429,
    "overloaded": 529,
    "server_error": 500,
    "bad_request": 400,
    "auth": 401,
}


# http.client's own limits on a request's headers.
MAX_HEADERS = 100
MAX_HEADER_LINE = 65536


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Hundreds of SDK connections arrive at once; the default backlog of 5 would refuse them.
    request_queue_size = 1024
    fake: FakeAnthropic


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body then waits for
    # the client's delayed ACK, adding ~40 ms to every "instant" answer.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler's, for the HTTP/1.x requests SDKs send, with the headers read
        line by line. The stdlib hands them to the email package's parser: two fifths of this
        process's CPU per call (py-spy), on the two cores the bench's triage runs on."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request line {self.requestline!r}")
            return False
        self.command, self.path, self.request_version = words
        headers = HTTPMessage()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(line) > MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            name, _, value = line.decode("iso-8859-1").partition(":")
            headers[name.strip()] = value.strip()
        else:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive"
        )
        return True

    # -- plumbing ----------------------------------------------------------------------------
    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def _send(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, ctype: str = ""
    ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", ctype or "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", _new_id("req"))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _trickle(self, data: bytes, seconds: float) -> None:
        """A 200 whose body comes 8 bytes at a time over `seconds`: no single read waits
        long, so only a deadline on the whole call ends it early."""
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", _new_id("req"))
        self.end_headers()
        chunks = [data[i : i + 8] for i in range(0, len(data), 8)]
        pause = seconds / max(1, len(chunks))
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
                if self.server.fake._stopping.wait(pause):
                    return
        except OSError:
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0]
        if path == "/_control/stats":
            return self._send(200, fake.stats())
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "models"]:
            return self._models(parts[2:])
        if parts[:3] == ["v1", "messages", "batches"] and len(parts) == 4:
            return self._send(*fake.batch(parts[3]))
        if parts[:3] == ["v1", "messages", "batches"] and parts[4:] == ["results"]:
            status, payload = fake.batch_results(parts[3])
            return self._send(status, payload, ctype="application/x-jsonl")
        return self._send(404, _error_body(404, f"no route GET {path}"))

    def _models(self, rest: list[str]) -> None:
        """The free Models API: what `triage doctor` uses to check the key and the model."""
        if not self.headers.get("x-api-key") and not self.headers.get("authorization"):
            return self._send(401, _error_body(401, "missing x-api-key header"))
        fault = self.server.fake.faults.pick("models", frozenset({"auth"}))
        if fault is not None:
            return self._send(401, _error_body(401, "invalid x-api-key"))
        known = sorted(NO_SAMPLING_MODELS | {"claude-haiku-4-5", "claude-sonnet-4-5"})
        if rest and rest[0] not in known:
            return self._send(404, _error_body(404, f"model: {rest[0]}"))
        views = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
            for m in (rest[:1] or known)
        ]
        if rest:
            return self._send(200, views[0])
        return self._send(
            200, {"data": views, "has_more": False, "first_id": known[0], "last_id": known[-1]}
        )

    def do_DELETE(self) -> None:
        if self.path.split("?")[0] == "/_control/faults":
            self.server.fake.clear_faults()
            return self._send(200, {"ok": True})
        return self._send(404, _error_body(404, f"no route DELETE {self.path}"))

    def do_POST(self) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0]
        body = self._body()
        if path.startswith("/_control/"):
            return self._control(path, body)
        if fake.record:
            with fake._lock:
                fake.requests.append(Recorded("POST", path, dict(self.headers), body))
        if not self.headers.get("x-api-key") and not self.headers.get("authorization"):
            return self._send(401, _error_body(401, "missing x-api-key header"))
        if path == "/v1/messages":
            return self._messages(body)
        if path == "/v1/messages/batches":
            return self._send(*fake.create_batch(body))
        parts = path.strip("/").split("/")
        if parts[:3] == ["v1", "messages", "batches"] and parts[4:] == ["cancel"]:
            return self._send(*fake.cancel_batch(parts[3]))
        return self._send(404, _error_body(404, f"no route POST {path}"))

    def _messages(self, params: Any) -> None:
        fake = self.server.fake
        fake._enter()
        try:
            problem = fake.check_params(params)
            if problem:
                return self._send(400, _error_body(400, problem))
            fault = fake.faults.pick(json.dumps(params.get("messages")), model=params["model"])
            delay = fake._delay()
            if delay:
                time.sleep(delay)
            if fault is None:
                return self._send(200, fake.message(params))
            return self._inject(fault, params)
        finally:
            fake._leave()

    def _inject(self, fault: Fault, params: dict[str, Any]) -> None:
        fake = self.server.fake
        if fault.kind in _FAULT_STATUS:
            status = _FAULT_STATUS[fault.kind]
            headers = {}
            if fault.kind == "rate_limit":
                headers["retry-after"] = str(fault.retry_after if fault.retry_after else 1)
            elif fault.retry_after is not None:
                headers["retry-after"] = str(fault.retry_after)
            # A rejected key is answered as the real API words it.
            message = "invalid x-api-key" if status == 401 else f"injected {fault.kind}"
            return self._send(status, _error_body(status, message), headers)
        if fault.kind == "timeout":
            fake._stopping.wait(fault.delay)
            try:
                return self._send(200, fake.message(params))
            except OSError:
                return None
        if fault.kind == "drop":
            return self._drop()
        if fault.kind == "trickle":
            return self._trickle(json.dumps(fake.message(params)).encode(), fault.delay)
        if fault.kind == "cut_body":
            whole = json.dumps(fake.message(params)).encode()
            return self._send(200, whole[: len(whole) // 2])
        return self._send(200, fake.faulty_message(params, fault.kind))

    def _control(self, path: str, body: Any) -> None:
        fake = self.server.fake
        if path == "/_control/faults":
            fault = fake.add_fault(Fault.from_json(body or {}))
            return self._send(200, fault.to_json())
        if path == "/_control/reset":
            fake.clear_faults()
            fake.reset_stats()
            return self._send(200, {"ok": True})
        if path == "/_control/latency":
            value = (body or {}).get("latency", 0)
            fake.latency = tuple(value) if isinstance(value, list) else float(value)
            return self._send(200, {"latency": value})
        return self._send(404, _error_body(404, f"no control route {path}"))
