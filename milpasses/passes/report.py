"""What each pass did: sites rewritten, sites skipped and why, ops added and removed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

@dataclass
class PassReport:
    pass_id: str
    rewritten: Counter = field(default_factory=Counter)  # site kind -> count
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    ops_before: int = 0  # non-const ops in the main function when the pass started
    ops_after: int = 0
    seconds: float = 0.0  # wall time of the pass
    # With the per-pass check: the largest output difference the pass made on seeded inputs
    # ({"max_abs_error", "max_rel_error", "output", "passed"}); None when not checked.
    check: dict | None = None

    @property
    def ops_removed(self) -> int:
        """Net non-const ops the pass removed (negative when it added ops)."""
        return self.ops_before - self.ops_after

    @property
    def sites_rewritten(self) -> int:
        return sum(self.rewritten.values())

    @property
    def sites_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "pass": self.pass_id,
            "rewritten": dict(self.rewritten),
            "skipped": dict(self.skipped),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "seconds": self.seconds,
            **({} if self.check is None else {"check": self.check}),
        }


class PassReports(dict):
    """The reports of one pipeline's ``ane::`` passes, by pass id, in the order they ran: each
    pipeline from ``ane_pipeline()`` has its own (``pipeline.reports``), so two conversions
    never share one."""

    def as_dicts(self) -> list[dict]:
        return [report.as_dict() for report in self.values()]
