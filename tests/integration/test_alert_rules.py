"""deploy/prometheus/triage-alerts.yml stays loadable and true: every rule is well formed, and
every metric and label its expression names is one that a real `triage serve` and a real
`triage worker` expose once they have handled tickets (PostgreSQL, Redis, the fake Messages
API and a fake Zendesk on loopback). A renamed metric or label fails here, not on a quiet
night when the alert it fed never fires."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.integration.test_sources import ZENDESK_SECRET, zendesk_auth, zendesk_ticket
from tests.support.fakehttp import FakeZendesk, running_api
from tests.support.stack import (
    WorkerProcess,
    anthropic_env,
    config_with_sinks,
    served_api,
    signed_headers,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.config import PROJECT_ROOT
from triage.embedded import free_port

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "triage-alerts.yml"
README = PROJECT_ROOT / "README.md"
SEVERITIES = {"page", "ticket"}
# Prometheus's own series, and the labels it attaches to every scraped one.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance"}

# PromQL's functions and aggregations (an identifier followed by "(") that the rules may use;
# an unknown one is a typo Prometheus would refuse.
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "delta", "deriv", "floor",
    "histogram_quantile", "idelta", "increase", "irate", "label_replace", "last_over_time",
    "max", "max_over_time", "min", "min_over_time", "predict_linear", "quantile",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sort", "sort_desc", "stddev",
    "sum", "sum_over_time", "time", "topk", "bottomk", "vector",
}  # fmt: skip
# Followed by a list of label names in parentheses.
GROUPINGS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "offset", "bool"}

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])                       # a range or subquery: durations only
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)


@dataclass
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class Names:
    """What one PromQL expression names: each series selector's metric and its matchers, and
    the label names of its grouping clauses (by, without, on, ignoring, group_left/right)."""

    selectors: list[tuple[str, list[Matcher]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {metric for metric, _ in self.selectors}


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
    return out


def promql_names(expr: str) -> Names:
    """The metrics, matchers and grouping labels of `expr`. A small reader, not a parser: it
    knows enough PromQL to tell a series selector from a function, a keyword or a label."""
    names = Names()
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in GROUPINGS:
            i += 1
            if following == "(":
                labels, i = _label_list(toks, i + 1)
                names.grouping |= labels
            continue
        if kind == "ident" and following in ("(", "by", "without"):  # sum by (l) (...)
            names.functions.add(text)
        elif kind == "ident" and text not in KEYWORDS:
            matchers: list[Matcher] = []
            if following == "{":
                matchers, i = _matchers(toks, i + 2)
            names.selectors.append((text, matchers))
        elif text == "{":  # a selector without a name: {__name__="...", ...}
            matchers, i = _matchers(toks, i + 1)
            metric = next(m.value for m in matchers if m.label == "__name__")
            names.selectors.append((metric, [m for m in matchers if m.label != "__name__"]))
        i += 1
    return names


def _label_list(toks: list[tuple[str, str]], i: int) -> tuple[set[str], int]:
    labels: set[str] = set()
    while toks[i][1] != ")":
        if toks[i][0] == "ident":
            labels.add(toks[i][1])
        i += 1
    return labels, i + 1


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[list[Matcher], int]:
    """Matchers from the token after "{"; returns them and the index of the closing "}"."""
    found: list[Matcher] = []
    while toks[i][1] != "}":
        if toks[i][1] == ",":
            i += 1
            continue
        (label_kind, label), (_, op), (value_kind, value) = toks[i : i + 3]
        assert label_kind == "ident" and value_kind == "string", toks[i : i + 3]
        found.append(Matcher(label, op, value[1:-1]))
        i += 3
    return found, i


# --- what the processes expose -------------------------------------------------------------


@dataclass
class Exposed:
    """Series names (as scraped: `_total`, `_bucket`, `_count`... included) with the label
    names they carry, and for gauges, which report every value on every scrape, the values."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    gauge_values: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def add(self, metrics_text: str) -> None:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                if family.type == "gauge":
                    values = self.gauge_values.setdefault(sample.name, {})
                    for label, value in sample.labels.items():
                        values.setdefault(label, set()).add(value)


def rule_problems(rule: dict[str, Any], exposed: Exposed) -> list[str]:
    """Why `rule`'s expression would not match what triage exposes: metrics no process
    exposes, labels their series do not carry, gauge label values that never occur."""
    names = promql_names(rule["expr"])
    problems = [f"unknown function {f}()" for f in sorted(names.functions - FUNCTIONS)]
    known = {**exposed.labels, **PROMETHEUS_SERIES}
    carried: set[str] = set(TARGET_LABELS)
    for metric, matchers in names.selectors:
        if metric not in known:
            problems.append(f"{metric} is not exposed by the API or a worker")
            continue
        labels = known[metric] | TARGET_LABELS
        carried |= labels
        for m in matchers:
            if m.label not in labels:
                problems.append(f"{metric} has no label {m.label!r} (it has {sorted(labels)})")
            elif metric in exposed.gauge_values and m.op in ("=", "!=", "=~"):
                seen = exposed.gauge_values[metric].get(m.label, set())
                wanted = m.value.split("|") if m.op == "=~" else [m.value]
                missing = [v for v in wanted if v not in seen]
                if missing:
                    problems.append(f"{metric}{{{m.label}}} never has {missing} ({sorted(seen)})")
    problems += [
        f"grouping label {label!r} is on none of {sorted(names.metrics)}"
        for label in sorted(names.grouping - carried)
    ]
    # An annotation can name only labels the alert has: the grouping's, or with no grouping,
    # the selected series' (an approximation that holds for these rules' shapes).
    available = names.grouping if names.grouping else carried
    text = " ".join(str(v) for v in rule.get("annotations", {}).values())
    problems += [
        f"annotation uses $labels.{label}, which the alert does not carry"
        for label in sorted(set(re.findall(r"\$labels\.(\w+)", text)) - available)
    ]
    return problems


# --- the scenario: a real API and worker handling tickets ----------------------------------

POISON = "Poison ticket for the alert rules"
CLOSED_ZENDESK_TICKET = 101
# What the scenario's tickets make a worker count: a dead letter, a skipped write-back, a label
# and its cost. Counters with labels show no series until first counted.
WORKER_SERIES = (
    'triage_stage_failures_total{error_type="',
    'triage_sink_skipped_total{reason="ticket_closed"',
    "triage_tickets_classified_total{",
    "triage_cost_usd_total{",
)


def _config_with_zendesk_sink(tmp: Path, zendesk_url: str) -> Path:
    return config_with_sinks(
        tmp,
        "helpdesks:\n"
        "  zendesk:\n"
        f"    base_url: {zendesk_url}\n"
        "    email: bot@acme.test\n"
        "    api_token_env: T_ZD_TOKEN\n"
        "default: [helpdesk]\n",
    )


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> int:
    headers = {"content-type": "application/json", **headers}
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=10).status_code


@pytest.fixture(scope="module")
def exposed(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Exposed:
    """One routed ticket, one dead-lettered (the model answers 400), one whose Zendesk
    write-back is skipped (closed there), one webhook refused (bad signature); then what the
    API's /metrics and the worker's metrics port show."""
    truncate(pg_url)
    redis.Redis.from_url(redis_url).flushdb()
    zendesk = FakeZendesk()
    zendesk.ticket(CLOSED_ZENDESK_TICKET, status="closed")
    worker_port = free_port()
    with FakeAnthropic() as fake, running_api(zendesk) as zendesk_api:
        fake.add_fault(Fault("bad_request", times=-1, match=POISON))
        env = anthropic_env(
            pg_url,
            redis_url,
            fake.base_url,
            TRIAGE_CONFIG_DIR=str(
                _config_with_zendesk_sink(tmp_path_factory.mktemp("alerts"), zendesk_api.url)
            ),
            TRIAGE_WEBHOOK_SECRET_ZENDESK=ZENDESK_SECRET,
            TRIAGE_WORKER_METRICS_PORT=str(worker_port),
            T_ZD_TOKEN="tok",
        )
        with served_api(env) as api, WorkerProcess(env, concurrency=4) as worker:
            for payload in (
                ticket_payload(body="Where is my order? [[confidence:0.99]]"),
                ticket_payload(subject=POISON),
            ):
                body = json.dumps(payload).encode()
                assert _post(api.url, "/webhooks/generic", body, signed_headers(body)) == 202
            zd_ticket = zendesk_ticket(
                CLOSED_ZENDESK_TICKET, description="Charged twice. [[confidence:0.99]]"
            )
            body = json.dumps(zd_ticket).encode()
            assert _post(api.url, "/webhooks/zendesk", body, zendesk_auth(body)) == 202
            body = json.dumps(ticket_payload()).encode()
            forged = signed_headers(body, "whsec_" + uuid.uuid4().hex)
            assert _post(api.url, "/webhooks/generic", body, forged) == 401

            worker_url = f"http://127.0.0.1:{worker_port}/metrics"

            def worker_done() -> str | None:
                try:
                    text = httpx.get(worker_url, timeout=5).text
                except httpx.HTTPError:  # its metrics port not listening yet
                    return None
                return text if all(series in text for series in WORKER_SERIES) else None

            try:
                worker_text = wait_until(worker_done, 90, what="the worker's series")
            except AssertionError:
                raise AssertionError(worker.log()) from None
            api_text = httpx.get(f"{api.url}/metrics", timeout=10).text
    seen = Exposed()
    seen.add(api_text)
    seen.add(worker_text)
    return seen


def _rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def _readme_anchors() -> set[str]:
    """GitHub's anchors for README's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", README.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


RULE_NAMES = [rule["alert"] for rule in _rules()] if RULES.exists() else ["(no rules file)"]


# --- the tests -----------------------------------------------------------------------------


def test_the_rules_file_is_a_prometheus_rule_file_with_unique_alerts():
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert group["name"] and group["rules"], group
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("alert", RULE_NAMES)
def test_each_rule_has_severity_summary_description_and_a_runbook_in_the_readme(alert):
    rule = next(r for r in _rules() if r["alert"] == alert)
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, set(rule)
    assert re.fullmatch(r"(\d+[smh])+", str(rule["for"])), rule["for"]
    assert rule["labels"]["severity"] in SEVERITIES
    notes = rule["annotations"]
    assert notes["summary"].strip() and notes["description"].strip()
    page, _, anchor = notes["runbook"].partition("#")
    assert page == "README.md" and anchor in _readme_anchors(), notes["runbook"]


def test_the_readme_lists_every_alert_with_its_severity():
    rows = re.findall(r"^\| `(Triage\w+)` \| (\w+) \|", README.read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted((r["alert"], r["labels"]["severity"]) for r in _rules())


@pytest.mark.parametrize("alert", RULE_NAMES)
def test_each_rule_names_only_metrics_and_labels_the_api_and_worker_expose(alert, exposed):
    rule = next(r for r in _rules() if r["alert"] == alert)
    assert rule_problems(rule, exposed) == []


def test_a_rule_naming_a_metric_or_label_nobody_exposes_is_caught(exposed):
    # The check above can fail: the same rules with one metric misspelt, one label misspelt.
    rule = next(r for r in _rules() if r["alert"] == "TriageWebhooksDatabaseDown")
    typo = {**rule, "expr": rule["expr"].replace("triage_webhooks_total", "triage_webhook_total")}
    assert rule_problems(typo, exposed) == [
        "triage_webhook_total is not exposed by the API or a worker"
    ]
    label = {**rule, "expr": rule["expr"].replace("status=", "code=")}
    assert [p.split(" (")[0] for p in rule_problems(label, exposed)] == [
        "triage_webhooks_total has no label 'code'"
    ]
    state = {**rule, "expr": 'max(triage_tickets{state="dead"})'}
    assert [p.split(" (")[0] for p in rule_problems(state, exposed)] == [
        "triage_tickets{state} never has ['dead']"
    ]


def test_the_reader_tells_series_from_functions_keywords_and_labels():
    names = promql_names(
        'sum by (source) (increase(triage_webhooks_total{status="401"}[10m])) >= 5 '
        "and on() sum without (model) ("
        "histogram_quantile(0.9, rate(triage_ingest_seconds_bucket[5m]))) "
        '> max(triage_tickets offset 15m) unless absent(up{job="triage-api"} == 1)'
    )
    assert names.metrics == {
        "triage_webhooks_total", "triage_ingest_seconds_bucket", "triage_tickets", "up"
    }  # fmt: skip
    assert names.grouping == {"source", "model"}
    assert names.functions == {"sum", "increase", "histogram_quantile", "rate", "max", "absent"}
    [(_, matchers)] = [s for s in names.selectors if s[0] == "triage_webhooks_total"]
    assert [(m.label, m.op, m.value) for m in matchers] == [("status", "=", "401")]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules():
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
