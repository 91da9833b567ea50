"""Node files as template files: shell scripts, systemd units and drop-ins, loaded with
importlib.resources and filled one way (`render`): every `__NAME__` marker gets a value, every value
given has a marker, or rendering fails. Values are kimi-fleet's constants and the stack's already
validated plain values; lists travel as JSON files, never through a template."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

MARKER = re.compile(r"__([A-Z][A-Z0-9_]*)__")


@cache
def source(name: str) -> str:
    return (resources.files(__package__) / name).read_text()


def render(name: str, **values: object) -> str:
    text = source(name)
    wanted = set(MARKER.findall(text))
    missing, unused = wanted - values.keys(), values.keys() - wanted
    if missing or unused:
        raise KeyError(f"template {name}: no value for {sorted(missing)}; no marker for {sorted(unused)}")
    return MARKER.sub(lambda match: str(values[match.group(1)]), text)
