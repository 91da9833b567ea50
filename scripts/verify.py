#!/usr/bin/env python3
"""Verify a deployed Kimi-K2.6 endpoint: python scripts/verify.py --base-url URL --api-key KEY --model NAME"""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.verification.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
