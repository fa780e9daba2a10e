"""The offline backend: a classifier trained at start-up from the taxonomy's examples and the
labeled tickets under `config/training/`. No API key, no network, no downloads.

Character n-grams carry most of the signal across languages and typos; word n-grams add
phrases. One logistic regression per field (intent, priority, sentiment, language) gives
calibrated-enough probabilities for the intent's confidence, so unsure tickets still go to a
person. Training takes about a second for the shipped data and happens once per process.

The language model only knows the languages of its training data, and would answer one of
them for a Japanese or Russian ticket. So when a ticket's letters are mostly in a script none
of those languages is written in, the script names the language (see `script_language`) and
the confidence drops below the review threshold: the intent was guessed from text the model
cannot read, and a person should look. A language in a script the data does cover, but with
no rows of its own (Swedish, say, among the Latin-script data), cannot be told apart this way
and is answered as the nearest language the data has: add rows for it to config/training/.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from triage.classify.backends.base import ClassificationRequest, ClassificationResult
from triage.classify.schema import TicketLabel
from triage.config import read_config_text
from triage.errors import ConfigError
from triage.taxonomy import Taxonomy

TRAINING_DIR = "training"
_FIELDS = ("priority", "sentiment", "language")
_DEFAULTS = {"priority": "normal", "sentiment": "neutral", "language": "en"}
# Inverse regularisation. Higher for intent: with few examples per class a softer model is
# accurate but under-confident, and would send right answers to human review.
INTENT_C = 100.0
FIELD_C = 10.0


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    intent: str
    priority: str | None = None
    sentiment: str | None = None
    language: str | None = None


def example_text(subject: str, body: str) -> str:
    return f"{subject}\n{body}".strip()


def load_examples(taxonomy: Taxonomy, config_dir: Path) -> list[Example]:
    """The taxonomy's own examples plus every `config/training/*.jsonl` row whose intent the
    taxonomy knows (rows for intents that were removed are skipped, not an error).

    A row that is malformed, or whose priority, sentiment or language no label can carry, is
    a ConfigError naming file:line: trained on, such a value would be predicted for tickets
    and every one of them dead-lettered when its label failed validation."""
    examples = [
        Example(text=text, intent=name)
        for name, intent in taxonomy.intents.items()
        for text in intent.examples
    ]
    for path in sorted((config_dir / TRAINING_DIR).glob("*.jsonl")):
        for number, line in enumerate(_read_lines(path), 1):
            if line.strip():
                example = _training_example(taxonomy, line, f"{path}:{number}")
                if example is not None:
                    examples.append(example)
    missing = [name for name in taxonomy.intents if not any(e.intent == name for e in examples)]
    if missing:
        raise ConfigError(
            f"taxonomy.yaml: intents {', '.join(missing)} have no examples; the offline "
            "classifier needs at least one per intent"
        )
    return examples


def _read_lines(path: Path) -> list[str]:
    return read_config_text(path).splitlines()


def _training_example(taxonomy: Taxonomy, line: str, where: str) -> Example | None:
    """One JSONL row as an Example, None when its intent is not in the taxonomy."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not a labeled ticket ({exc})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: not a labeled ticket (a JSON object is expected)")
    for field, required in (("body", True), ("intent", True), ("subject", False)):
        value = row.get(field)
        if value is None and not required:
            continue
        if not isinstance(value, str):
            problem = "missing" if value is None else f"a string is expected, got {value!r}"
            raise ConfigError(f"{where}: not a labeled ticket ({field}: {problem})")
    intent: str = row["intent"]
    if intent not in taxonomy.intents:
        return None
    fields = _label_fields(taxonomy, intent, row, where)
    return Example(
        text=example_text(row.get("subject") or "", row["body"]), intent=intent, **fields
    )


def _label_fields(
    taxonomy: Taxonomy, intent: str, row: dict[str, Any], where: str
) -> dict[str, str | None]:
    """The row's priority, sentiment and language, checked by the label schema itself (the
    values the model learns are the values it will answer) and normalised as a label is."""
    given = {field: row[field] for field in _FIELDS if row.get(field) is not None}
    try:
        label = TicketLabel(
            intent=intent,
            department=taxonomy.department_for(intent),
            confidence=1.0,
            summary=intent,
            **{**_DEFAULTS, **given},
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise ConfigError(
            f"{where}: {field}: {error['msg']} (got {row.get(field, error['input'])!r}); "
            "no label can carry this value"
        ) from None
    return {field: getattr(label, field) if field in given else None for field in _FIELDS}


def _features() -> FeatureUnion:
    return FeatureUnion(
        [
            (
                "chars",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True
                ),
            ),
            (
                "words",
                TfidfVectorizer(
                    analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True
                ),
            ),
        ]
    )


class _FieldModel:
    """One field's classifier over the shared features, or a constant when the data has
    fewer than two values for it."""

    def __init__(self, features: Any, labels: list[str], *, c: float) -> None:
        counts = Counter(labels)
        self.model: LogisticRegression | None = None
        self.constant: str | None = next(iter(counts), None)
        if len(counts) >= 2:
            # saga converges in a fraction of lbfgs's time on these sparse features; a fixed
            # seed keeps the trained model, and so every label, reproducible.
            self.model = LogisticRegression(
                C=c, solver="saga", tol=1e-3, max_iter=3000, random_state=0
            )
            self.model.fit(features, labels)

    def predict(self, features: Any) -> tuple[str | None, float]:
        if self.model is None:
            return self.constant, 1.0
        probabilities = self.model.predict_proba(features)[0]
        best = int(probabilities.argmax())
        return str(self.model.classes_[best]), float(probabilities[best])


class LocalBackend:
    name = "local"

    def __init__(self, taxonomy: Taxonomy, *, config_dir: Path) -> None:
        self._taxonomy = taxonomy
        examples = load_examples(taxonomy, config_dir)
        digest = hashlib.sha256()
        for e in examples:
            digest.update(f"{e.intent}|{e.priority}|{e.sentiment}|{e.language}|{e.text}\n".encode())
        # Recorded as the model and prompt version: retraining on new data is distinguishable.
        self.data_version = digest.hexdigest()[:10]
        self.model = f"local-tfidf-lr-{self.data_version}"
        self.models = frozenset({self.model})
        self.training_size = len(examples)
        # Vectorised once and shared: every field reads the same text.
        self._features = _features()
        matrix = self._features.fit_transform([e.text for e in examples])
        self._intent = _FieldModel(matrix, [e.intent for e in examples], c=INTENT_C)
        # The scripts the language model has seen labeled (as the language each implies), and
        # the languages it can answer: text in either is the model's to judge.
        labeled = [e for e in examples if e.language]
        self._readable: set[str | None] = {e.language for e in labeled}
        self._readable |= {script_language(e.text) for e in labeled}
        self._fields: dict[str, _FieldModel] = {}
        for field in _FIELDS:
            rows = [i for i, e in enumerate(examples) if getattr(e, field)]
            labels = [str(getattr(examples[i], field)) for i in rows]
            self._fields[field] = _FieldModel(matrix[rows], labels, c=FIELD_C)

    def classify(self, request: ClassificationRequest) -> ClassificationResult:
        started = time.perf_counter()
        text = example_text(request.subject, request.body)
        features = self._features.transform([text])
        intent, confidence = self._intent.predict(features)
        assert intent is not None  # load_examples guarantees every intent has examples
        values = {f: self._fields[f].predict(features)[0] or _DEFAULTS[f] for f in _FIELDS}
        unread = script_language(text)
        if unread is not None and unread not in self._readable:
            values["language"] = unread
            # Half the threshold: below it by a margin whatever the operator set it to.
            confidence = min(confidence, self._taxonomy.routing.review_below_confidence / 2)
        label = TicketLabel(
            intent=intent,
            department=self._taxonomy.department_for(intent),
            priority=values["priority"],
            language=values["language"],
            sentiment=values["sentiment"],
            # Rounded down: rounded to nearest, a probability of 0.4996 recorded 0.5 and passed
            # a review threshold of 0.5 that it is below.
            confidence=math.floor(confidence * 1000) / 1000,
            summary=_summary(intent, request),
        )
        return ClassificationResult(
            label=label,
            backend=self.name,
            model=self.model,
            prompt_version=f"local-{self.data_version}",
            latency_ms=(time.perf_counter() - started) * 1000,
        )


# The first word of a letter's Unicode name, for the scripts whose text the training data may
# not cover, and the language that script implies. Kana means Japanese; Han without kana is
# read as Chinese. Cyrillic as Russian and Devanagari as Hindi are guesses (the label schema
# has no "unknown" language, only two-letter codes); the ticket goes to review either way.
_SCRIPT_LANGUAGES = {
    "HIRAGANA": "ja",
    "KATAKANA": "ja",
    "KATAKANA-HIRAGANA": "ja",
    "CJK": "zh",
    "HANGUL": "ko",
    "CYRILLIC": "ru",
    "GREEK": "el",
    "HEBREW": "he",
    "ARABIC": "ar",
    "THAI": "th",
    "DEVANAGARI": "hi",
}


def script_language(text: str) -> str | None:
    """The language implied by the script of most of the text's letters, or None when most
    letters are in another script (Latin, say) or there are none."""
    letters = 0
    languages: Counter[str] = Counter()
    for char in text:
        if not char.isalpha():
            continue
        letters += 1
        words = unicodedata.name(char, "?").split()
        # "HALFWIDTH KATAKANA LETTER A": the width is a legacy encoding's, the script follows.
        script = words[1] if words[0] in ("HALFWIDTH", "FULLWIDTH") else words[0]
        if script in _SCRIPT_LANGUAGES:
            languages[_SCRIPT_LANGUAGES[script]] += 1
    # Japanese mixes kana with Han characters: any kana makes the Han count Japanese too.
    if languages["ja"] and languages["zh"]:
        languages["ja"] += languages.pop("zh")
    if not languages:
        return None
    language, count = languages.most_common(1)[0]
    return language if count * 2 > letters else None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _summary(intent: str, request: ClassificationRequest) -> str:
    """An extractive one-liner: the intent and the subject (or the body's first sentence).
    The text is already redacted by the pipeline, so no personal data reaches the label."""
    source = request.subject.strip() or _SENTENCE_END.split(request.body.strip(), maxsplit=1)[0]
    source = " ".join(source.split())[:150] or "(no text)"
    return f"{intent}: {source}"
