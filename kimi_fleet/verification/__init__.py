"""Verification suite for a deployed Kimi-K2.6 endpoint (auth, modes, tools, vision, streaming, TLS, load)."""

from .checks import CHECKS
from .report import CheckResult, Report
from .runner import run_suite, run_suite_async

__all__ = ["CHECKS", "CheckResult", "Report", "run_suite", "run_suite_async"]
