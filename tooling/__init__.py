"""Helpers that run the Pulumi program offline (mock runtime); used by scripts/plan.py and tests."""
