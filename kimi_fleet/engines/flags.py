"""An engine command line checked against a recorded manifest of its engine's real argument parser
(kimi_fleet/engines/manifests/<engine>-<version>.json, written by scripts/engine_flags.py manifest
from the pinned wheel): unknown flags, abbreviations, deprecated spellings, missing or bad values."""

from __future__ import annotations

import difflib
import json
from functools import cache
from importlib import resources

MANIFESTS = resources.files("kimi_fleet.engines") / "manifests"


def manifest_name(engine: str, package_version: str) -> str:
    return f"{engine}-{package_version}.json"


@cache
def load_manifest(engine: str, package_version: str) -> dict | None:
    """The recorded parser of this engine release, or None when none was recorded."""
    path = MANIFESTS / manifest_name(engine, package_version)
    return json.loads(path.read_text()) if path.is_file() else None


def argv_problems(args: list[str], manifest: dict) -> list[str]:
    """What the engine's parser would refuse or warn about in `args` (argv after the entrypoint)."""
    options, problems = manifest["options"], []
    positionals = 0
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-"):
            positionals += 1
            if positionals > len(manifest["positionals"]):
                problems.append(f"{token!r}: an argument no flag takes (positionals: {manifest['positionals']})")
            continue
        flag, has_inline, inline = token.partition("=")
        if "." in flag:
            base, _, key = flag.partition(".")
            keys = (options.get(base) or {}).get("json_keys")
            if keys is None:
                problems.append(f"{flag}: {base} takes no dotted keys in {manifest['engine']} {manifest['version']}")
            elif key.split(".")[0] not in keys:
                problems.append(f"{flag}: {base} has no key {key!r} in {manifest['engine']} {manifest['version']}")
            if not has_inline:
                i += 1
            continue
        entry = options.get(flag)
        if entry is None:
            near = sorted(o for o in options if o.startswith(flag))
            # --max_model_len, --Max-Model-Len: argparse takes neither; name the spelling it takes.
            close = difflib.get_close_matches(flag.replace("_", "-").lower(), list(options), n=1, cutoff=0.8)
            why = (f" (an abbreviation of {', '.join(near[:3])}: spell it out)" if near
                   else f" (did you mean {close[0]}?)" if close else "")
            problems.append(f"{flag}: not an option of {manifest['engine']} {manifest['version']}{why}")
            continue
        if entry["deprecated"]:
            problems.append(f"{flag}: deprecated in {manifest['engine']} {manifest['version']}")
        if not entry["takes_value"]:
            if has_inline:
                problems.append(f"{flag}: takes no value, given {inline!r}")
            continue
        if has_inline:
            value = inline
        elif i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        elif entry["nargs"] in ("?", "*"):
            continue
        else:
            problems.append(f"{flag}: needs a value")
            continue
        if entry["choices"] and value not in entry["choices"]:
            problems.append(f"{flag} {value}: not one of {', '.join(entry['choices'])}")
    return problems
