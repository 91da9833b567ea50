#!/usr/bin/env python3
"""Check every stack's engine command line against the real argument parser of its pinned engine.

Three steps, because the engines' parsers need the engines' own (heavy) environments:

    # 1. in kimi-fleet's venv: every planned stack's argv, with the engine and exact version it runs
    .venv/bin/python scripts/engine_flags.py argv --out build/engine-argv.json

    # 2. in a venv holding the pinned wheel (pip install --no-deps vllm==0.22.1 plus what its
    #    parser imports; see README "Engine command lines"): parse them for real, or record the
    #    parser as a manifest for CI
    python scripts/engine_flags.py check-real --engine vllm build/engine-argv.json
    python scripts/engine_flags.py manifest --engine vllm --out kimi_fleet/engines/manifests/vllm-0.22.1.json

    # 3. in CI: tests/test_engine_flags.py checks every argv against the recorded manifests

`check-real` and `manifest` import only the engine, the standard library and kimi_fleet.engines
(which needs `packaging`). A failure names the stack, the flag and what the parser said.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- step 1: argv from kimi-fleet -----------------------------------------------------------------

def stack_argvs() -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from kimi_fleet.launch import render_launch
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.spec import StackSpecError
    from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names

    found = []
    for name in stack_names():
        try:
            r = Resolved(load_stack_config(stack_file(name)).spec())
        except StackSpecError:
            continue  # a refused stack runs nothing
        for rank in range(r.nodes_per_replica):  # every node of a multi-node replica runs its own line
            launch = render_launch(r, rank)
            for instance in launch.instances:
                label = f"{name} node {rank}" if r.multi_node else name
                found.append({"stack": label, "engine": r.spec.engine.name, "image": launch.image,
                              "package_version": r.image_entry.package_version if r.image_entry else None,
                              "entrypoint_words": r.adapter.entrypoint_words(r), "argv": list(instance.argv)})
    return found


# --- step 2: the engines' real parsers --------------------------------------------------------------

def engine_adapter(name: str):
    sys.path.insert(0, str(ROOT))
    from kimi_fleet import engines  # the engine modules import only the catalog and packaging

    return engines.get(name)


def manifest(engine: str) -> dict:
    adapter = engine_adapter(engine)
    parser, version = adapter.real_parser()
    options, positionals = {}, []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            positionals.append(action.dest)
            continue
        help_text = (action.help or "") if action.help is not argparse.SUPPRESS else ""
        entry = {
            "dest": action.dest,
            "takes_value": action.nargs != 0,
            "nargs": action.nargs,
            "choices": sorted(map(str, action.choices)) if action.choices else None,
            "deprecated": bool(getattr(action, "deprecated", False)) or "deprecated" in help_text.lower(),
            "json_keys": adapter.json_option_keys(action.dest),
        }
        for option in action.option_strings:
            options[option] = entry
    return {"engine": engine, "version": version, "positionals": positionals, "options": options,
            "generated_by": "scripts/engine_flags.py manifest", "generated_on": datetime.date.today().isoformat()}


def check_real(engine: str, entries: list[dict]) -> tuple[list[str], list[str], str]:
    """(problems, stacks checked, parser version): only the entries that run this exact version."""
    parser, version = engine_adapter(engine).real_parser()
    problems, checked = [], []
    for entry in entries:
        if entry["engine"] != engine or entry["package_version"] != version:
            continue
        checked.append(entry["stack"])
        args = entry["argv"][len(entry["entrypoint_words"]):]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(args)
        except SystemExit:
            problems.append(f"{entry['stack']}: {stderr.getvalue().strip().splitlines()[-1:]}")
        except Exception as error:  # noqa: BLE001 - a config class rejecting a dotted key raises its own error
            problems.append(f"{entry['stack']}: {type(error).__name__}: {str(error).splitlines()[:3]}")
    return problems, checked, version


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    argv_cmd = sub.add_parser("argv", help="write every planned stack's engine argv (kimi-fleet's venv)")
    argv_cmd.add_argument("--out", type=Path, required=True)
    real = sub.add_parser("check-real", help="parse the argvs with the installed engine's real parser")
    real.add_argument("--engine", required=True)
    real.add_argument("argv_file", type=Path)
    man = sub.add_parser("manifest", help="record the installed engine's parser for CI")
    man.add_argument("--engine", required=True)
    man.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.command == "argv":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stack_argvs(), indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.command == "check-real":
        entries = json.loads(args.argv_file.read_text())
        problems, checked, version = check_real(args.engine, entries)
        for problem in problems:
            print(f"FAIL {problem}")
        others = sorted({e["package_version"] for e in entries if e["engine"] == args.engine} - {version})
        print(f"{len(checked) - len(problems)}/{len(checked)} {args.engine} {version} command lines parse "
              f"({', '.join(sorted(set(checked)))})" + (f"; other versions need their own venv: {', '.join(map(str, others))}"
                                                      if others else ""))
        return 1 if problems or not checked else 0
    document = manifest(args.engine)
    args.out.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {args.engine} {document['version']}, {len(document['options'])} option strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
