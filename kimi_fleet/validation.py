"""From config values to a validated StackSpec: the schema's own checks (shapes, enums, bounds),
then the cross-field and hardware rules, every problem naming the stack file, the field and the
value. Kept apart from the schema (kimi_fleet/spec.py) so the rules, which resolve and size the
spec, do not make the schema import itself back."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from kimi_fleet.resolve import Resolved
from kimi_fleet.rules import check_rules
from kimi_fleet.sizing import Sizing
from kimi_fleet.spec import CONFIG_NAMESPACE, StackSpec, StackSpecError, did_you_mean


def _field_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif isinstance(item, str) and not item.startswith("function-"):
            parts.append(to_camel(item) if "_" in item else item)
    return ".".join(parts)


def _value_at(raw: dict, loc: tuple):
    node = raw
    for item in loc:
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _model_at(loc: tuple):
    """The spec model a validation error's location points into (for key suggestions)."""
    model = StackSpec
    for item in loc:
        if not isinstance(item, str):
            return None
        fields = {f.alias or n: f for n, f in model.model_fields.items()} | model.model_fields
        if item not in fields:
            return None
        candidates = [fields[item].annotation]
        found = None
        while candidates:
            annotation = candidates.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found = annotation
                break
            candidates += list(typing.get_args(annotation))
        if found is None:
            return None
        model = found
    return model


def _suggestion(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return ""
    known = [f.alias or n for n, f in model.model_fields.items()]
    return f"{did_you_mean(loc[-1], known)}; known keys here: {', '.join(sorted(known))}"


class Validated(typing.NamedTuple):
    """A stack as one run uses it: the spec, resolved and sized once."""

    spec: StackSpec
    resolved: Resolved
    sizing: Sizing


def parse_spec(raw: dict, stack: str, stack_file: str) -> StackSpec:
    """Build the spec from config values (keys without the namespace); raise StackSpecError."""
    return validate(raw, stack, stack_file).spec


def validate(raw: dict, stack: str, stack_file: str) -> Validated:
    """The spec from config values, resolved and sized by the same pass that checked it; raise
    StackSpecError naming every problem."""
    data = {"stack": stack, **raw}
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = _field_path(err["loc"]) or "(stack)"
            field = f"{CONFIG_NAMESPACE}:{path}"
            value = _value_at(data, err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key{_suggestion(err['loc'])}"
            shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
            given = f" (given {shown})" if value is not None and not isinstance(value, dict) else ""
            problems.append(f"field {field}{given}: {message}")
        raise StackSpecError(stack_file, problems) from None
    resolved = Resolved(spec)
    problems, sizing = check_rules(resolved)
    if problems:
        raise StackSpecError(stack_file, problems)
    return Validated(spec, resolved, sizing)
