#!/usr/bin/env python3
"""Print the Dockerfile of a multi-node stack's EFA engine image: the stack's pinned engine image plus
the AWS EFA userspace from the digest-pinned installer (catalog.EFA_INSTALLER). AWS nodes build this
themselves; a Kubernetes cluster's cannot: build and push it, then set its digest as
target.kubernetes.efaEngineImage.

    .venv/bin/python scripts/efa_engine_dockerfile.py k8s-h100-int4-vllm > Dockerfile
    docker build --tag REGISTRY/kimi-engine-efa:v0.22.1-efa1.50.0 . && docker push REGISTRY/kimi-engine-efa:v0.22.1-efa1.50.0
    # then: target.kubernetes.efaEngineImage: REGISTRY/kimi-engine-efa@sha256:<the digest docker push printed>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.launch import efa_image_build  # noqa: E402
from kimi_fleet.resolve import Resolved  # noqa: E402
from kimi_fleet.spec import StackSpecError  # noqa: E402
from kimi_fleet.stackfile import StackFileError, load_stack_config, stack_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="a stack in stacks/ (its engine image is the base)")
    args = parser.parse_args(argv)
    try:
        r = Resolved(load_stack_config(stack_file(args.stack)).spec())
    except (StackFileError, StackSpecError, FileNotFoundError) as error:
        print(f"efa_engine_dockerfile.py: {error}", file=sys.stderr)
        return 2
    if not r.multi_node:
        print(f"efa_engine_dockerfile.py: {args.stack} is one node per replica: its engine needs no fabric",
              file=sys.stderr)
        return 2
    sys.stdout.write(efa_image_build(r.image).dockerfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
