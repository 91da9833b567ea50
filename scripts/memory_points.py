#!/usr/bin/env python3
"""Print the measured memory points of the seeds beside what the sizing says, as a Markdown table
(the README's "Sizing against measurements" section is this output; tests fail when it is stale).

    python scripts/memory_points.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.memory_points import table  # noqa: E402

if __name__ == "__main__":
    sys.stdout.write(table())
