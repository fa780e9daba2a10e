"""Config files are validated at start-up; errors name the file, the field and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from triage.config import PROJECT_ROOT, Settings, load_config
from triage.errors import ConfigError


@pytest.fixture()
def config_dir(tmp_path: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "config", tmp_path / "config")
    return tmp_path / "config"


def edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_default_config_loads_and_has_a_stable_version(config_dir):
    a = load_config(Settings(config_dir=config_dir, backend="local"))
    b = load_config(Settings(config_dir=config_dir, backend="local"))
    assert a.taxonomy.version == b.taxonomy.version
    assert {
        "billing",
        "refund",
        "technical",
        "account",
        "shipping",
        "sales",
        "feedback",
        "other",
    } <= set(a.taxonomy.intents)


def test_editing_the_taxonomy_changes_its_version(config_dir):
    before = load_config(Settings(config_dir=config_dir, backend="local")).taxonomy.version
    edit(config_dir / "taxonomy.yaml", lambda d: d["intents"]["other"].update(description="Misc."))
    after = load_config(Settings(config_dir=config_dir, backend="local")).taxonomy.version
    assert before != after


def test_intent_with_unknown_department_names_file_and_field(config_dir):
    edit(config_dir / "taxonomy.yaml", lambda d: d["intents"]["refund"].update(department="nope"))
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    assert (
        "taxonomy.yaml" in message and "intents.refund.department" in message and "nope" in message
    )


def test_out_of_range_threshold_names_the_field(config_dir):
    edit(config_dir / "taxonomy.yaml", lambda d: d["routing"].update(review_below_confidence=3))
    with pytest.raises(ConfigError, match=r"routing\.review_below_confidence"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_model_missing_from_price_table_is_refused(config_dir):
    settings = Settings(
        config_dir=config_dir, backend="anthropic", model="claude-unknown-9", anthropic_api_key="k"
    )
    with pytest.raises(ConfigError, match="claude-unknown-9"):
        load_config(settings)


def test_malformed_yaml_names_the_file(config_dir):
    (config_dir / "models.yaml").write_text("models: [unclosed")
    with pytest.raises(ConfigError, match=r"models\.yaml"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_taxonomy_not_in_utf8_names_the_file(config_dir):
    path = config_dir / "taxonomy.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "Anything else,", "Anything else (café, Ärger),"
    )
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"taxonomy\.yaml: not UTF-8"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_taxonomy_path_that_is_a_directory_names_the_file(config_dir):
    (config_dir / "taxonomy.yaml").unlink()
    (config_dir / "taxonomy.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"taxonomy\.yaml: cannot be read"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def _add_override(config_dir: Path, when: dict) -> None:
    edit(
        config_dir / "taxonomy.yaml",
        lambda d: d["routing"]["overrides"].append(
            {"name": "billing-to-escalations", "when": when, "department": "escalations"}
        ),
    )


def test_override_on_unknown_department_is_refused_naming_the_override(config_dir):
    _add_override(config_dir, {"department": "billling"})
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    assert "taxonomy.yaml" in message and "when.department" in message
    assert "billing-to-escalations" in message and "billling" in message


@pytest.mark.parametrize("language", ["EN", "english", "en-US"])
def test_override_on_a_language_no_label_can_have_is_refused(config_dir, language):
    _add_override(config_dir, {"language": language})
    with pytest.raises(ConfigError, match=r"when\.language.*billing-to-escalations"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_override_on_known_department_and_language_loads(config_dir):
    _add_override(config_dir, {"department": "billing", "language": "de"})
    taxonomy = load_config(Settings(config_dir=config_dir, backend="local")).taxonomy
    assert taxonomy.routing.overrides[-1].when.department == "billing"


def test_training_row_no_label_can_carry_stops_loading_for_the_offline_backend(config_dir):
    row = '{"body": "Please refund my order", "intent": "refund", "priority": "medium"}\n'
    with (config_dir / "training" / "labeled.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(row)
    with pytest.raises(ConfigError, match=r"labeled\.jsonl:\d+: priority"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_an_intent_given_twice_is_refused_naming_the_key_and_both_lines(config_dir):
    path = config_dir / "taxonomy.yaml"
    # A pasted block under a name already in use: YAML's last-one-wins would silently drop
    # the first `refund` intent.
    text = path.read_text(encoding="utf-8").replace(
        "  other:\n", "  refund:\n    department: general\n    description: Copy.\n  other:\n"
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    assert "taxonomy.yaml" in message and "duplicate key 'refund'" in message
    first = text.splitlines().index("  refund:") + 1
    assert f"first given on line {first}" in message


def test_a_models_entry_given_twice_is_refused(config_dir):
    path = config_dir / "models.yaml"
    path.write_text(
        path.read_text(encoding="utf-8") + "  claude-haiku-4-5:\n    input_per_mtok: 0\n"
        "    output_per_mtok: 0\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"(?s)models\.yaml: .*duplicate key 'claude-haiku-4-5'"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_a_key_written_out_may_override_one_merged_in(config_dir):
    path = config_dir / "models.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "  claude-haiku-4-5:\n", "  claude-haiku-4-5: &haiku\n", 1
    )
    text += "  claude-haiku-4-5-batch:\n    <<: *haiku\n    sampling: false\n"
    path.write_text(text, encoding="utf-8")
    config = load_config(Settings(config_dir=config_dir, backend="local"))
    assert config.models.spec("claude-haiku-4-5-batch").sampling is False


def test_an_override_on_an_intent_and_a_department_not_owning_it_is_refused(config_dir):
    _add_override(config_dir, {"intent": "refund", "department": "logistics"})
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    assert "taxonomy.yaml" in message and "routing.overrides[2].when" in message
    assert "can never match: intent 'refund' belongs to 'billing', not 'logistics'" in message


def _set_overrides(config_dir: Path, *rules: tuple[str, dict]) -> None:
    edit(
        config_dir / "taxonomy.yaml",
        lambda d: d["routing"].update(
            overrides=[
                {"name": name, "when": when, "department": "escalations"} for name, when in rules
            ]
        ),
    )


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({}, {"priority": "urgent"}),  # a catch-all above anything
        ({"priority": "urgent"}, {"priority": "urgent", "intent": "refund"}),
        ({"department": "billing"}, {"intent": "refund", "sentiment": "negative"}),
        ({"language": "de"}, {"language": "de"}),
    ],
)
def test_an_override_an_earlier_one_always_takes_first_is_refused(config_dir, earlier, later):
    _set_overrides(config_dir, ("wide", earlier), ("narrow", later))
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    assert "taxonomy.yaml" in message and "routing.overrides[1]" in message
    assert "'narrow' can never match: override 'wide' (routing.overrides[0]) comes first" in (
        message
    )


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({"priority": "urgent", "intent": "refund"}, {"priority": "urgent"}),  # narrow first
        ({"department": "logistics"}, {"intent": "refund"}),
        ({"priority": "high"}, {"priority": "urgent"}),
    ],
)
def test_overrides_that_each_can_match_load(config_dir, earlier, later):
    _set_overrides(config_dir, ("first", earlier), ("second", later))
    taxonomy = load_config(Settings(config_dir=config_dir, backend="local")).taxonomy
    assert [rule.name for rule in taxonomy.routing.overrides] == ["first", "second"]


def test_two_overrides_with_one_name_are_refused(config_dir):
    _set_overrides(config_dir, ("vip", {"priority": "urgent"}), ("vip", {"intent": "refund"}))
    with pytest.raises(ConfigError, match=r"routing\.overrides\[1\]\.name: 'vip' is already"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_yes_no_on_off_are_words_in_config_files_as_in_yaml_1_2(config_dir):
    # YAML 1.1 would read `no` (Norwegian) as False and the department `on` as True.
    path = config_dir / "taxonomy.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "  escalations:\n", "  on:\n    description: Onboarding.\n  escalations:\n"
    )
    text = text.replace("when: {priority: urgent}", "when: {priority: urgent, language: no}")
    path.write_text(text, encoding="utf-8")
    models = config_dir / "models.yaml"
    models.write_text(
        models.read_text(encoding="utf-8").replace("sampling: true", "sampling: yes", 1),
        encoding="utf-8",
    )
    config = load_config(Settings(config_dir=config_dir, backend="local"))
    assert "on" in config.taxonomy.departments
    assert config.taxonomy.routing.overrides[0].when.language == "no"
    assert config.models.spec("claude-haiku-4-5").sampling is True
    # A boolean still written as one stays one.
    assert config.models.spec("claude-haiku-5-5").sampling is False


@pytest.mark.parametrize("backend", ["anthropic", "cascade"])
@pytest.mark.parametrize("key", [None, "", "  \n"])
def test_an_api_backend_without_a_key_is_refused_by_validation_not_at_the_first_ticket(
    config_dir, monkeypatch, backend, key
):
    # A blank ANTHROPIC_API_KEY= in an env file used to count as a key: every call a 401,
    # every ticket dead-lettered.
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("TRIAGE_ANTHROPIC_API_KEY", raising=False)
    if key is not None:
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    with pytest.raises(ConfigError, match=f"TRIAGE_BACKEND={backend} needs ANTHROPIC_API_KEY"):
        load_config(Settings(config_dir=config_dir, backend=backend))


def test_an_api_key_is_used_without_the_whitespace_around_it(monkeypatch):
    # As read from a secret file: httpx refuses a header value ending in a newline.
    monkeypatch.setenv("ANTHROPIC_API_KEY", " sk-ant-test\n")
    settings = Settings()
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == "sk-ant-test"


def test_a_list_whose_entries_are_all_commented_out_means_none(config_dir):
    # `overrides:` and `examples:` left with every entry behind `#` load as null.
    path = config_dir / "taxonomy.yaml"
    text = path.read_text(encoding="utf-8")
    head, rules = text.split("  overrides:\n")
    text = head + "  overrides:\n" + "".join(f"#{line}\n" for line in rules.splitlines())
    text = text.replace(
        '      - "Hello, are you hiring?"\n      - "Test message please ignore."\n',
        '#      - "Hello, are you hiring?"\n',
    )
    path.write_text(text, encoding="utf-8")
    taxonomy = load_config(Settings(config_dir=config_dir, backend="local")).taxonomy
    assert taxonomy.routing.overrides == ()
    assert taxonomy.intents["other"].examples == ()


def test_a_required_key_left_null_is_still_refused(config_dir):
    edit(config_dir / "taxonomy.yaml", lambda d: d["intents"]["refund"].update(department=None))
    with pytest.raises(ConfigError, match=r"intents\.refund\.department: Input should be"):
        load_config(Settings(config_dir=config_dir, backend="local"))


def test_one_example_under_two_intents_is_refused_naming_both(config_dir):
    edit(
        config_dir / "taxonomy.yaml",
        lambda d: d["intents"]["cancellation"]["examples"].append(
            "  I want a refund for the order I returned last WEEK."
        ),
    )
    with pytest.raises(ConfigError) as info:
        load_config(Settings(config_dir=config_dir, backend="local"))
    message = str(info.value)
    # Named from whichever of the two comes second in the file.
    assert "taxonomy.yaml" in message and "also an example of intent" in message
    assert "intents.refund.examples[0]" in message and "'cancellation'" in message
