"""Known engine bugs that break what agent clients do (issue 23), as data.

Each entry says where it was reported, which engine releases it affects (when that is known), the
symptom a client sees and what an operator does about it. Three things read this table:
- the plan warns when a stack pins an affected release (`warnings_for`),
- the rules refuse a flag known to break tool calls (`FLAG_BUGS`, rules.no_flag_breaks_tool_calls),
- the gate names the entry when it sees the entry's symptom (`named_for`).

Pure data and logic: no Pulumi imports (the verification CLI imports this on a workstation).
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from kimi_fleet.catalog import Source

# --- the symptoms the gate can see (checks.py reports them by these names) ----------------------
#: a stream ends in tool_calls (or stops) with tool_calls deltas that carry no name and no arguments
EMPTY_STREAMED_CALL = "empty streamed tool call"
#: a stream's calls differ from the same request answered non-streamed (dropped, cut or altered)
STREAM_DIFFERS = "streamed calls differ from the non-streamed answer"
#: a call cut by max_tokens comes back as finish_reason "stop" with the call missing
TRUNCATED_CALL_SILENT_STOP = "call cut by max_tokens reported as a stop"
#: a call cut by max_tokens comes back as finish_reason "tool_calls" with unterminated arguments
TRUNCATED_CALL_AS_COMPLETE = "call cut by max_tokens reported as a complete call"


@dataclass(frozen=True)
class EngineBug:
    ref: str  # how people cite it: "vllm #54701"
    engines: tuple[str, ...]  # the engines whose parsers have it ("vllm", "sglang")
    #: PEP 440 specifier of the affected releases; None: not known (the gate still names it on its symptom)
    affected: str | None
    summary: str  # what goes wrong, one line
    symptoms: tuple[str, ...]  # the symptom names above that this bug produces
    workaround: str
    source: Source
    #: a command-line flag whose value above `flag_limit` triggers the bug (a stack may not set it)
    flag: str | None = None
    flag_limit: int | None = None

    def affects(self, engine: str, release: str | None) -> bool:
        """True when `release` of `engine` is in the known affected range."""
        if engine not in self.engines or self.affected is None or not release:
            return False
        try:
            return Version(release) in SpecifierSet(self.affected, prereleases=True)
        except InvalidVersion:
            return False

    def describe(self) -> str:
        engines = "/".join(self.engines)
        releases = f"affects {engines} {self.affected}" if self.affected else f"{engines}, affected releases not known"
        return f"{self.ref} ({releases}; {self.source.where}, {self.source.date}): {self.summary}"


ENGINE_BUGS: tuple[EngineBug, ...] = (
    EngineBug(
        "vllm #54701", ("vllm",), "==0.19.1",
        "with --tool-call-parser kimi_k2, 5-30% of streamed tool calls arrive as empty tool_calls deltas (no name, "
        "no arguments) when 6-14 requests stream at once; the stream still ends with finish_reason tool_calls (or "
        "stop); the same request non-streamed is correct. Also seen on the 0.19.2rc1 nightly; open, no fixed "
        "release named",
        (EMPTY_STREAMED_CALL, STREAM_DIFFERS),
        "move to a vLLM release the gate's tool_swarm check passes at the fleet's concurrency (the catalog's "
        "vllm/vllm-openai:v0.22.1 is the candidate), or have clients send tool-bearing requests with stream: false",
        Source("https://github.com/vllm-project/vllm/issues/54701 (open)", "2026-09-01"),
    ),
    EngineBug(
        "vllm #45866", ("vllm",), None,
        "--stream-interval 4 with the kimi_k2 parsers: the stream stops instead of producing the tool call "
        "(vllm #31501: any --stream-interval > 1 loses streamed tool-call arguments)",
        (STREAM_DIFFERS,),
        "leave --stream-interval at its default 1",
        Source("https://github.com/vllm-project/vllm/issues/45866 and #31501 (open)", "2026-06-16"),
        flag="--stream-interval", flag_limit=1,
    ),
    EngineBug(
        "dynamo PR #8208", ("vllm", "sglang"), None,
        "a max_tokens that cuts a call before <|tool_calls_section_end|> drops the call and reports a stop; the "
        "same section parsing is in vLLM's and SGLang's kimi_k2 parsers",
        (TRUNCATED_CALL_SILENT_STOP,),
        "clients give tool-bearing requests a max_tokens far above the longest call and treat a stop without "
        "the announced call as truncation",
        Source("ai-dynamo/dynamo PR #8208, via issue 23 and shared/HANDBOOK.md", "2026-11"),
    ),
    EngineBug(
        "vllm PR #47963", ("vllm",), None,
        "a streamed tool call cut by max_tokens ends with finish_reason tool_calls and unterminated JSON arguments "
        "(the serving code overrides length); fix open",
        (TRUNCATED_CALL_AS_COMPLETE,),
        "clients treat arguments that do not parse as a truncated call; raise max_tokens",
        Source("https://github.com/vllm-project/vllm/pull/47963 (open)", "2026-09-13"),
    ),
    EngineBug(
        "sglang #23363/#23341", ("sglang",), None,
        "the KimiK2Detector streaming parser silently drops or hangs on multi-turn tool calls with long arguments; "
        "a stream may end with empty content and finish_reason stop",
        (STREAM_DIFFERS, EMPTY_STREAMED_CALL),
        "an SGLang release whose KimiK2Detector passes the gate's long_calls and agent_loop checks, or "
        "non-streaming tool calls",
        Source("https://github.com/sgl-project/sglang/issues/23363 (closed, inactive) and #23341 (open)",
               "2026-04-21"),
    ),
)

#: bugs a command-line flag triggers: the rules refuse the flag
FLAG_BUGS = tuple(bug for bug in ENGINE_BUGS if bug.flag)


def bugs_affecting(engine: str, release: str | None) -> list[EngineBug]:
    return [bug for bug in ENGINE_BUGS if bug.affects(engine, release)]


def warnings_for(resolved) -> list[str]:
    """One line per known bug in the engine release the stack pins (for scripts/plan.py)."""
    entry = resolved.image_entry
    if entry is None:
        return []
    engine = resolved.spec.engine.name
    return [
        f"engine image {resolved.image} pins {engine} {entry.version}, affected by {bug.ref}: {bug.summary}. "
        f"What to do: {bug.workaround} ({bug.source.where})"
        for bug in bugs_affecting(engine, entry.version)
    ]


def named_for(symptom: str, engine: str, release: str | None) -> str:
    """The sentence a gate failure adds when it sees `symptom`: the known bugs of this engine with that
    symptom, the affected one first, and the release the endpoint runs (or how to tell the gate)."""
    candidates = [bug for bug in ENGINE_BUGS if engine in bug.engines and symptom in bug.symptoms]
    runs = f"{engine} {release}" if release else f"{engine} (release not given to the gate: --engine-release)"
    if not candidates:
        return f"no known {engine} bug has this symptom; the endpoint runs {runs}"
    candidates.sort(key=lambda bug: not bug.affects(engine, release))
    first = candidates[0]
    verdict = "which it affects" if first.affects(engine, release) else "a known bug with this symptom"
    others = "; also " + ", ".join(bug.ref for bug in candidates[1:]) if len(candidates) > 1 else ""
    return f"the endpoint runs {runs}: {first.ref}, {verdict}{others}. What to do: {first.workaround}"
