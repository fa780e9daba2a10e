"""Which sinks each department uses, from config/sinks.yaml (optional).

Without the file every department is "queue only": the dept.<name> message is the delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from triage.config import AppConfig
from triage.sinks.base import Sink


@dataclass(frozen=True)
class SinkTable:
    by_department: dict[str, tuple[Sink, ...]] = field(default_factory=dict)
    default: tuple[Sink, ...] = ()
    # Per HTTP request; with the requests a delivery makes (`requests_for`) it bounds how
    # long one delivery can take (`retry.deliver_seconds`).
    timeout_seconds: float = 10.0

    def queue_only(self) -> tuple[bool, list[str]]:
        """The departments whose queue message is the whole delivery (no sinks), as
        (everything but these, these): (True, names with sinks) when the default has no
        sinks, else (False, names that have none)."""
        if not self.default:
            return True, [name for name, sinks in self.by_department.items() if sinks]
        return False, [name for name, sinks in self.by_department.items() if not sinks]

    def for_department(self, department: str | None) -> Sequence[Sink]:
        if department is None:
            return self.default
        return self.by_department.get(department, self.default)

    def requests_for(self, department: str | None) -> int:
        """The most HTTP requests one delivery to this department makes: its sinks run one
        after another."""
        return sum(sink.max_requests for sink in self.for_department(department))


def load_sinks(config: AppConfig) -> SinkTable:
    path = config.settings.config_dir / "sinks.yaml"
    if not path.exists():
        return SinkTable()
    from triage.sinks.loader import build_sink_table

    table: SinkTable = build_sink_table(path, config)
    return table
