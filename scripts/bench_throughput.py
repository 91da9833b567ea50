#!/usr/bin/env python3
"""Measure a deployed stack's throughput with its engine's own benchmark, through its Caddy, and write
the result as a throughput fact in the catalog's format (catalog.Throughput, as JSON).

    KIMI_API_KEY=... .venv/bin/python scripts/bench_throughput.py run h200-int4-vllm \\
        --base-url https://kimi-h200.example.com --workload chat --concurrency 32 --out build/bench
    .venv/bin/python scripts/bench_throughput.py run h200-int4-vllm --base-url URL --dry-run   # the argv only
    .venv/bin/python scripts/bench_throughput.py fact h200-int4-vllm --workload chat --concurrency 32 \\
        --base-url URL --tool-result result.json                                              # convert a result

`run` executes the stack's engine's own benchmark (catalog.BENCHMARK_TOOLS: vLLM's `vllm bench serve`,
SGLang's `python3 -m sglang.bench_serving`), which must be installed where it runs (the engine image
has it), with the recipes' workload lengths
(catalog.CHAT, catalog.AGENTIC) as random prompts; the key goes to the tool as OPENAI_API_KEY (both
tools send it as a Bearer token), never on the command line. The fact counts every GPU of every
replica behind the endpoint, and states its conditions: random prompts reuse no prefix, where the
recipes' traces hit the KV cache 70% (chat) and 90% (agentic) of the time. Paste the JSON into
catalog.MEASURED_THROUGHPUT (throughput_from_fact reads it back) to price the stack from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_fleet import catalog  # noqa: E402
from kimi_fleet.cost import PRICED_MODEL, stack_layout  # noqa: E402
from kimi_fleet.resolve import Resolved  # noqa: E402
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names  # noqa: E402

WORKLOADS = {"chat": catalog.CHAT, "agentic": catalog.AGENTIC}
TOKENIZER = "moonshotai/Kimi-K2.6"


def tool_argv(r: Resolved, base_url: str, workload: catalog.Workload, concurrency: int, num_prompts: int,
              result: Path, tokenizer: str = TOKENIZER) -> list[str]:
    """The engine's own benchmark (catalog.BENCHMARK_TOOLS) against the endpoint's OpenAI chat route,
    writing its JSON to `result`."""
    tool = catalog.BENCHMARK_TOOLS[r.spec.engine.name]
    values = {"base_url": base_url.rstrip("/"), "tokenizer": tokenizer, "served": r.spec.model.served_name,
              "input": workload.input_tokens, "output": workload.output_tokens, "prompts": num_prompts,
              "concurrency": concurrency, "result": result, "result_dir": result.parent, "result_name": result.name}
    return [*tool.command, *(arg.format(**values) for arg in tool.args)]


def read_result(path: Path) -> dict:
    """One JSON document, or JSON lines appended a run (the last is this run's)."""
    text = path.read_text().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def fact_from_result(r: Resolved, result: dict, workload: catalog.Workload, concurrency: int, base_url: str,
                     today: str | None = None) -> dict:
    """A catalog.Throughput, as JSON, from the tool's own result (output_throughput, mean_tpot_ms)."""
    gpus_per_replica = r.spec.accelerator_count * r.nodes_per_replica
    gpus = gpus_per_replica * r.spec.capacity.replicas
    engines = r.engines_per_node * r.spec.capacity.replicas
    tpot = result.get("mean_tpot_ms")
    tool = " ".join(catalog.BENCHMARK_TOOLS[r.spec.engine.name].command)
    fact = catalog.Throughput(
        name=f"measured-{r.spec.stack}-{workload.kind}-c{concurrency}",
        model=PRICED_MODEL,
        engine=r.spec.engine.name,
        engine_version=r.image_entry.package_version if r.image_entry else "",
        accelerator=r.accelerator.id,
        checkpoint=r.checkpoint.id,
        gpus_per_engine=gpus_per_replica // r.engines_per_node,
        layout=stack_layout(r),
        engines=engines,
        workload=catalog.Workload(workload.kind, workload.input_tokens, workload.output_tokens,
                                  f"random {workload.input_tokens:,} in / {workload.output_tokens:,} out"),
        concurrency=int(result.get("max_concurrency") or concurrency),
        output_tokens_per_second_per_gpu=round(float(result["output_throughput"]) / gpus, 2),
        per_user_tokens_per_second=round(1000 / float(tpot), 1) if tpot else None,
        source=catalog.Source(f"scripts/bench_throughput.py ({tool}) against {base_url} through Caddy",
                              today or datetime.date.today().isoformat()),
        conditions="random prompts without prefix reuse (the recipes' traces hit the KV cache 70% chat, 90% agentic)",
    )
    return dataclasses.asdict(fact)


def throughput_from_fact(doc: dict) -> catalog.Throughput:
    """The JSON a run writes, back as the catalog's dataclass."""
    return catalog.Throughput(**{**doc, "layout": catalog.Layout(**doc["layout"]),
                                 "workload": catalog.Workload(**doc["workload"]),
                                 "source": catalog.Source(**doc["source"])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "fact"))
    parser.add_argument("stack", choices=stack_names())
    parser.add_argument("--base-url", required=True, help="the stack's endpoint (its Caddy), e.g. https://host")
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="chat")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, help="default: 10 x concurrency")
    parser.add_argument("--tokenizer", default=TOKENIZER, help="Hugging Face repo or local path of the tokenizer")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="where results and the fact go")
    parser.add_argument("--tool-result", type=Path, help="fact: the benchmark's own JSON result to convert")
    parser.add_argument("--dry-run", action="store_true", help="run: print the benchmark's argv, run nothing")
    args = parser.parse_args(argv)

    r = Resolved(load_stack_config(stack_file(args.stack)).spec())
    workload = WORKLOADS[args.workload]
    name = f"{args.stack}-{args.workload}-c{args.concurrency}"
    if args.command == "fact":
        if not args.tool_result:
            parser.error("fact needs --tool-result")
        result_path = args.tool_result
    else:
        result_path = args.out / f"{name}.result.json"
        command = tool_argv(r, args.base_url, workload, args.concurrency,
                            args.num_prompts or 10 * args.concurrency, result_path, args.tokenizer)
        if args.dry_run:
            print(json.dumps(command))
            return 0
        key = os.environ.get("KIMI_API_KEY")
        if not key:
            parser.error("set KIMI_API_KEY to the stack's API key (pulumi stack output api_key --show-secrets)")
        args.out.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": key})
        if run.returncode != 0:
            print(f"bench_throughput.py: {command[0]} exited {run.returncode}", file=sys.stderr)
            return 1
    fact = fact_from_result(r, read_result(result_path), workload, args.concurrency, args.base_url)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.fact.json").write_text(json.dumps(fact, indent=2) + "\n")
    print(json.dumps(fact, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
