"""stacks/schema.json: the published JSON Schema of a stack file, current and true to the spec."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from kimi_fleet.stackfile import (
    PROJECT_ROOT, SCHEMA_FILE, SCHEMA_HEADER, render_stack_file_schema, stack_file, stack_names,
)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_file_is_current():
    assert SCHEMA_FILE.read_text() == render_stack_file_schema(), "run: python scripts/stack_schema.py"
    check = subprocess.run([sys.executable, "scripts/stack_schema.py", "--check"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("stack", stack_names())
def test_every_stack_file_names_the_schema_and_matches_it(stack, validator):
    text = stack_file(stack).read_text()
    assert text.splitlines()[0] == SCHEMA_HEADER
    errors = [error.message for error in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []


@pytest.mark.parametrize("edit, where", [
    (lambda c: c.update({"kimi-fleet:budget_per_hour_usd": 10}), "budget_per_hour_usd"),
    (lambda c: c["kimi-fleet:engine"].update({"memoryFractoin": 0.8}), "memoryFractoin"),
    (lambda c: c.update({"kimi-fleet:capacity": {"rollout": "sideways"}}), "sideways"),
    (lambda c: c.update({"kimi-fleet:contextLength": 12}), "12"),
    (lambda c: c.update({"kimi-fleet:apiKey": "plain-text-key-0123456789"}), "not of type 'object'"),
    (lambda c: c.update({"kimifleet:domain": "x.example.com"}), "kimifleet:domain"),
])
def test_what_an_editor_flags(edit, where, validator):
    document = copy.deepcopy(yaml.safe_load(stack_file("h200-int4-sglang").read_text()))
    edit(document["config"])
    messages = [error.message for error in validator.iter_errors(document)]
    assert messages and any(where in message for message in messages), messages


def test_provider_settings_are_left_to_the_providers(validator):
    document = yaml.safe_load(stack_file("h200-int4-sglang").read_text())
    document["config"]["aws:region"] = "eu-west-1"
    assert list(validator.iter_errors(document)) == []


def test_every_property_is_described():
    """What an editor shows on hover: every field says what it is for."""
    undescribed = []

    def walk(node, path):
        if isinstance(node, dict):
            for name, value in (node.get("properties") or {}).items():
                if isinstance(value, dict) and not value.get("description"):
                    undescribed.append(f"{path}.{name}")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, path)

    walk(json.loads(SCHEMA_FILE.read_text()), "")
    assert undescribed == []
