"""Tool-call drift check in K2-Vendor-Verifier's way, for operators (not part of the deploy gate).

K2VV sends tool-bearing requests and scores two things: whether a call was triggered
(`finish_reason == "tool_calls"`) and whether each triggered call's arguments are valid JSON that
passes the tool's JSON schema (`jsonschema`). Its test set is not shipped here; this runs the same
scoring over a fixed set of scenarios with schemas of the shapes that break parsers (enums,
integers, nested objects, arrays), so a run is comparable with the last run of the same endpoint,
and prints the result beside the published figures (catalog.TOOL_CALL_ACCURACY).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import jsonschema

from kimi_fleet import catalog

from .checks import argument_error
from .client import CheckFailed, Endpoint, chat, open_client


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _tool("get_weather", "Current weather for a city.",
          {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          ["city", "unit"]),
    _tool("search_flights", "Search flights between two airports on a date.",
          {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
           "date": {"type": "string", "format": "date"}, "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
          ["origin", "destination", "date", "passengers"]),
    _tool("create_event", "Create a calendar event.",
          {"title": {"type": "string"},
           "start": {"type": "object", "properties": {"date": {"type": "string"}, "time": {"type": "string"}},
                     "required": ["date", "time"], "additionalProperties": False},
           "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
          ["title", "start", "attendees"]),
    _tool("convert_currency", "Convert an amount between currencies.",
          {"amount": {"type": "number", "exclusiveMinimum": 0}, "from": {"type": "string", "enum": ["USD", "EUR", "JPY"]},
           "to": {"type": "string", "enum": ["USD", "EUR", "JPY"]}},
          ["amount", "from", "to"]),
]

PROMPTS = [
    "What's the weather in Lisbon right now? Use celsius.",
    "Find me flights from SFO to NRT on 2027-03-14 for 2 passengers.",
    "Put 'Design review' on my calendar for 2027-01-05 at 14:00 with ana@example.com and li@example.com.",
    "How much is 250 euros in Japanese yen?",
    "Is it colder in Oslo or in Helsinki today? Check both, in fahrenheit.",
    "Book a planning meeting on 2027-02-01 at 09:30 with sam@example.com, then check flights LHR to JFK that day for 1.",
]
VALIDATORS = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"]) for t in TOOLS}


@dataclass
class K2vvResult:
    requests: int
    triggered: int = 0
    calls: int = 0
    valid_calls: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def schema_accuracy(self) -> float | None:
        return self.valid_calls / self.calls if self.calls else None

    def lines(self) -> list[str]:
        accuracy = self.schema_accuracy
        shown = f"{accuracy:.1%}" if accuracy is not None else "n/a (no calls)"
        lines = [
            f"requests {self.requests}, triggered (finish_reason tool_calls) {self.triggered} "
            f"({self.triggered / self.requests:.1%})",
            f"tool calls {self.calls}, schema-valid {self.valid_calls}: schema accuracy {shown}",
            "published (K2-Vendor-Verifier):",
        ]
        lines += [f"  {a.provider:<14} {a.model:<18} {a.schema_accuracy:.1%}" for a in catalog.TOOL_CALL_ACCURACY]
        lines += [f"  e.g. {error}" for error in self.errors[:5]]
        return lines


def _judge_call(call: dict) -> str | None:
    function = call.get("function") or {}
    name, arguments = function.get("name"), function.get("arguments") or ""
    if name not in VALIDATORS:
        return f"called unknown tool {name!r}"
    problem = argument_error(arguments, VALIDATORS[name])
    return f"{name}: {problem}" if problem else None


async def run_k2vv_async(endpoint: Endpoint, requests: int) -> K2vvResult:
    if requests < 1:
        raise ValueError("--k2vv needs at least one request")
    result = K2vvResult(requests)

    async def one(index: int) -> None:
        body = {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], "tools": TOOLS,
                "tool_choice": "auto", "temperature": 1.0, "top_p": 0.95, "max_tokens": endpoint.max_tokens(8192)}
        message = await chat(client, endpoint, body)
        if message.get("finish_reason") != "tool_calls":
            return
        result.triggered += 1
        for call in message.get("tool_calls") or []:
            result.calls += 1
            problem = _judge_call(call)
            if problem:
                result.errors.append(problem)
            else:
                result.valid_calls += 1

    async with open_client(endpoint) as client:
        outcomes = await asyncio.gather(*(one(i) for i in range(requests)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        first = failures[0]
        raise CheckFailed(f"{len(failures)}/{requests} requests failed: "
                          f"{getattr(first, 'reason', None) or f'{type(first).__name__}: {first}'}")
    return result


def run_k2vv(endpoint: Endpoint, requests: int) -> K2vvResult:
    """Raises CheckFailed on transport or plumbing faults (HTTP errors, raw markers in content)."""
    try:
        return asyncio.run(run_k2vv_async(endpoint, requests))
    except httpx.HTTPError as error:
        raise CheckFailed(f"{type(error).__name__}: {error}") from None
