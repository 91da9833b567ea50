#!/usr/bin/env python3
"""kimi-fleet pod admission (Kubernetes): the pod is Ready only after the project's verification
suite passed against the pod's own proxy, and while its generations keep working (standard library
only; runs in the admission container, next to the engine and the proxy).

    pod_admission.py CONFIG.json [--rounds N]

Once: take the suite's pinned packages from the weights volume, where the weights download
installed them (pip --target, once per pins and image), or install them now if that is missing
(skipped when KIMI_VERIFY_PYTHON names an interpreter that has them). Then every interval: one tiny generation
through the proxy's loopback listener with the key. While it generates and the suite has not
passed for this pod, run the suite (admission.py); on a pass write the passed file, which the
container's readiness probe tests. `failures` failed generations in a row remove the file (the
pod leaves the Service until it generates and passes the suite again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from admission import run_suite  # noqa: E402  (shipped beside this file)
from generation_probe import probe  # noqa: E402


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-admission] {message}", file=sys.stderr,
          flush=True)


def install(config: dict) -> tuple[str, str | None]:
    """(python, dependencies directory) to run the suite with: the packages the weights download
    installed on the weights volume when complete, else installed from PyPI now."""
    if os.environ.get("KIMI_VERIFY_PYTHON"):
        return os.environ["KIMI_VERIFY_PYTHON"], None
    prebuilt = config.get("prebuilt_dependencies_dir")
    if prebuilt and (Path(prebuilt) / config["prebuilt_marker"]).is_file():
        log(f"suite packages: {prebuilt} (installed by the weights download)")
        return sys.executable, prebuilt
    if prebuilt:
        log(f"suite packages: {prebuilt} is not complete; installing the pins from PyPI")
    target = config["dependencies_dir"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--only-binary=:all:",
                    "--target", target, "-r", config["requirements"]], check=True)
    return sys.executable, target


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 0
    key = os.environ["KIMI_API_KEY"]
    python, dependencies = install(config)
    passed_file = Path(config["passed_file"])
    # A restarted container proves itself again (its emptyDir keeps the last run's file).
    passed_file.unlink(missing_ok=True)
    passed, failures, done = False, 0, 0
    while not rounds or done < rounds:
        done += 1
        failure = probe(config["local_proxy"], config["model"], config["probe_timeout_seconds"], key)
        if failure is None:
            failures = 0
            if not passed:
                passed, message = run_suite(
                    base_url=config["local_proxy"], model=config["model"], engine=config["engine"],
                    checks=config["checks"], release=config["release"], suite_path=config["suite_path"],
                    python=python, report=Path(config["report"]), key=key, timeout=config["request_timeout_seconds"],
                    concurrency=config["concurrency"], deadline=config["deadline_seconds"], dependencies=dependencies)
                log(message)
                if passed:
                    passed_file.parent.mkdir(parents=True, exist_ok=True)
                    passed_file.write_text(config["release"] + "\n")
        elif passed:
            failures += 1
            log(f"generation through the proxy failed ({failures}/{config['failures']}): {failure}")
            if failures >= config["failures"]:
                log("not ready until it generates and passes the suite again")
                passed_file.unlink(missing_ok=True)
                passed, failures = False, 0
        if not rounds or done < rounds:
            time.sleep(config["interval_seconds"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
