#!/usr/bin/env python3
"""Write stacks/schema.json, the JSON Schema of a stack file, from the StackSpec (run after a spec
change; tests/test_stack_schema.py fails while the file is stale).

    python scripts/stack_schema.py            # write it
    python scripts/stack_schema.py --check    # exit 1 if it is stale
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.stackfile import SCHEMA_FILE, render_stack_file_schema  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the file is current")
    args = parser.parse_args()
    text = render_stack_file_schema()
    current = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else None
    if args.check:
        if current != text:
            print(f"{SCHEMA_FILE} is stale: run python scripts/stack_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(text)
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
