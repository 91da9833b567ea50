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
from kimi_fleet.spec import CONFIG_NAMESPACE, TARGET_KINDS, StackSpec, StackSpecError, did_you_mean


def _discriminated(field) -> dict[str, type[BaseModel]] | None:
    """The variants of a discriminated union field, by tag (None for any other field)."""
    if not isinstance(field.discriminator, str):
        return None
    return {typing.get_args(v.model_fields[field.discriminator].annotation)[0]: v
            for v in typing.get_args(field.annotation)}


def _located(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """A validation error's location as the stack file spells it, and the spec model that holds its
    last key (for key suggestions). Pydantic puts the union tag of a discriminated field (target:
    aws | kubernetes | host) into the location; the file does not, and the tag picks the model."""
    model, holder, out, items = StackSpec, None, [], list(loc)
    while items:
        item = items.pop(0)
        out.append(item)
        holder = model
        if model is None or not isinstance(item, str):
            model = None
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()} | model.model_fields
        field = fields.get(item)
        if field is None:
            model = None
            continue
        variants = _discriminated(field)
        if variants is not None and items and items[0] in variants:
            model = variants[items.pop(0)]
            continue
        model = _model_of(field.annotation)
    return tuple(out), holder


def _model_of(annotation) -> type[BaseModel] | None:
    candidates = [annotation]
    while candidates:
        candidate = candidates.pop()
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        candidates += list(typing.get_args(candidate))
    return None


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


def _suggestion(loc: tuple, model: type[BaseModel] | None) -> str:
    if model is None or not isinstance(loc[-1], str):
        return ""
    known = [f.alias or n for n, f in model.model_fields.items()]
    return f"{did_you_mean(loc[-1], known)}; known keys here: {', '.join(sorted(known))}"


#: pydantic's words for a number it could not take: replaced by what the field allows.
NUMBER_ERRORS = ("int_parsing", "int_parsing_size", "int_from_float", "int_type", "float_parsing", "float_type",
                 "finite_number")


def _number_shape(model: type[BaseModel] | None, name, kind: str) -> str:
    """'a whole number from 1 to 64': the field's type and bounds, from its declaration."""
    whole = kind.startswith("int")
    shape = "a whole number" if whole else "a finite number"
    field = None
    if model is not None and isinstance(name, str):
        field = next((f for n, f in model.model_fields.items() if name in (n, f.alias)), None)
    if field is None:
        return shape
    low = next((getattr(m, a) for m in field.metadata for a in ("ge", "gt") if getattr(m, a, None) is not None), None)
    high = next((getattr(m, a) for m in field.metadata for a in ("le", "lt") if getattr(m, a, None) is not None), None)
    if low is not None and high is not None:
        return f"{shape} from {low:g} to {high:g}"
    if low is not None:
        return f"{shape} of at least {low:g}"
    if high is not None:
        return f"{shape} of at most {high:g}"
    return shape


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
            loc, holder = _located(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, "kind")
                message = f"must be one of {', '.join(TARGET_KINDS)}"
            path = _field_path(loc) or "(stack)"
            field = f"{CONFIG_NAMESPACE}:{path}"
            value = _value_at(data, loc)
            if err["type"] == "missing":
                message = "required, and not set in the stack file"
            if err["type"] in NUMBER_ERRORS:
                message = f"must be {_number_shape(holder, loc[-1], err['type'])}"
            if err["type"] == "extra_forbidden":
                message = f"unknown key{_suggestion(loc, holder)}"
                if len(loc) == 2 and loc[0] == "target" and loc[1] in TARGET_KINDS:
                    kind = (data.get("target") or {}).get("kind")
                    message = f"settings for a {loc[1]} target, but target.kind is {kind!r}"
            shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
            given = f" (given {shown})" if value is not None and not isinstance(value, dict) else ""
            problems.append(f"field {field}{given}: {message}")
        raise StackSpecError(stack_file, problems) from None
    resolved = Resolved(spec)
    problems, sizing = check_rules(resolved)
    if problems:
        raise StackSpecError(stack_file, problems)
    return Validated(spec, resolved, sizing)
