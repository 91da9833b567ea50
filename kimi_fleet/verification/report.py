"""Check results, the suite report and its table rendering."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class CheckResult:
    name: str
    status: str
    reason: str
    seconds: float
    details: dict = field(default_factory=dict)


@dataclass
class Report:
    base_url: str
    model: str
    engine: str
    checks: list[CheckResult]
    wall_seconds: float

    @property
    def passed(self) -> bool:
        """Every check that ran passed; skipped checks (tls on http) do not count."""
        return all(check.status != FAIL for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "engine": self.engine,
            "passed": self.passed,
            "checks": [asdict(check) for check in self.checks],
            "wall_seconds": round(self.wall_seconds, 3),
        }


NAME_WIDTH, STATUS_WIDTH, SECONDS_WIDTH = 10, 6, 8


def table_header() -> str:
    return f"{'check':<{NAME_WIDTH}} {'status':<{STATUS_WIDTH}} {'seconds':>{SECONDS_WIDTH}}  reason"


def table_row(result: CheckResult) -> str:
    return (
        f"{result.name:<{NAME_WIDTH}} {result.status.upper():<{STATUS_WIDTH}} "
        f"{result.seconds:>{SECONDS_WIDTH}.2f}  {result.reason}"
    )


def format_table(report: Report) -> str:
    lines = [table_header()] + [table_row(check) for check in report.checks]
    verdict = "PASSED" if report.passed else f"FAILED ({', '.join(report.failed_checks())})"
    lines.append(f"{report.model} at {report.base_url} [{report.engine}]: {verdict} in {report.wall_seconds:.2f}s")
    return "\n".join(lines)
