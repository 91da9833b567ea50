#!/usr/bin/env python3
"""kimi-fleet node watchdog: admission and liveness by real generations (kimi-watchdog.timer).

Each run, per engine: one tiny generation straight to the engine (generation_probe.py).
- An engine is *admitted* the first time it generates after a (re)start (systemd's InvocationID
  tells one start from the next). Before that, failures mean "still loading" and are left alone:
  loading 595 GB takes minutes and systemd's start timeout governs it.
- An admitted engine that fails `failures` probes in a row is restarted (an HTTP-200 /health
  with a dead scheduler is exactly this case).
The node is *ready* when every engine is admitted, the node's own Caddy, on its loopback listener,
refuses a request without the key and generates with it, and the project's verification suite
(shipped with the release) passed against that listener for this release and these engine starts
(text, thinking and instant modes, tool calls, vision, streaming: stack.json's admission checks).
Then the ready file (stack.json's ready_file, world-readable: Caddy serves it to a load balancer's
health check) holds the release id; otherwise it is removed. The suite runs once per release and
engine start; a failed run is retried on the next timer tick.

Paths are under $KIMI_ROOT when it is set (tests); systemctl is whatever is first on PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from admission import run_suite  # noqa: E402  (shipped beside this file)
from compile_cache import PUBLISH_UNIT, read_settings  # noqa: E402
from generation_probe import probe  # noqa: E402
from node_status import read as read_status, start_phase  # noqa: E402

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
STACK_JSON = ROOT / "etc/kimi-fleet/stack.json"
RELEASE = ROOT / "etc/kimi-fleet/release"
NODE_ENV = ROOT / "etc/kimi-fleet/node.env"
STATE_DIR = ROOT / "run/kimi-fleet/watchdog"
LOG = ROOT / "var/log/kimi-fleet/watchdog.log"


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-watchdog] {message}"
    print(line, file=sys.stderr)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def setting(name: str) -> str:
    """One KEY=VALUE line of node.env, read as data (never sourced)."""
    settings = read_settings(str(NODE_ENV))
    if name not in settings:
        raise KeyError(f"{name} not in {NODE_ENV}")
    return settings[name]


def invocation(unit: str) -> str:
    shown = subprocess.run(["systemctl", "show", "-p", "InvocationID", "--value", unit],
                           capture_output=True, text=True, check=False)
    return shown.stdout.strip()


def restart(unit: str) -> None:
    subprocess.run(["systemctl", "restart", "--no-block", unit], check=False)


def refuses_without_key(base_url: str, timeout: float) -> bool:
    request = urllib.request.Request(f"{base_url}/v1/models")
    try:
        urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        return error.code == 401
    except OSError:
        return False
    return False


def check_engine(engine: dict, model: str, watchdog: dict) -> bool:
    """Probe one engine, update its state, restart it if it broke after admission. True if admitted."""
    unit = f"kimi-engine@{engine['index']}.service"
    state_file = STATE_DIR / f"engine-{engine['index']}.json"
    current = invocation(unit)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("invocation") != current:
        state = {"invocation": current, "admitted": False, "failures": 0}  # a new start: admit again
    failure = probe(f"http://127.0.0.1:{engine['port']}", model, watchdog["probe_timeout_seconds"])
    if failure is None:
        if not state["admitted"]:
            log(f"{unit}: generates, admitted")
        state.update(admitted=True, failures=0)
    elif state["admitted"]:
        state["failures"] += 1
        log(f"{unit}: probe failed ({state['failures']}/{watchdog['failures']} in a row): {failure}")
        if state["failures"] >= watchdog["failures"]:
            log(f"{unit}: restarting: it stopped generating after admission")
            restart(unit)
            state = {"invocation": None, "admitted": False, "failures": 0}
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    return state["admitted"]


def proven(stack: dict, key: str) -> bool:
    """Run the verification suite against the node's own Caddy, once per release and engine starts."""
    admission = stack["admission"]
    release = RELEASE.read_text().strip()
    starts = [invocation(f"kimi-engine@{engine['index']}.service") for engine in stack["engines"]]
    proof = json.dumps({"release": release, "engine_starts": starts})
    proof_file = STATE_DIR / "admission.json"
    if proof_file.exists() and proof_file.read_text() == proof:
        return True
    start_phase("verifying")
    passed, message = run_suite(
        base_url=stack["local_proxy"], model=stack["model"], engine=admission["engine"], checks=admission["checks"],
        release=release, suite_path=str(ROOT / admission["path"].lstrip("/")),
        python=os.environ.get("KIMI_VERIFY_PYTHON") or admission["python"],
        report=ROOT / admission["report"].lstrip("/"), key=key, timeout=admission["request_timeout_seconds"],
        concurrency=admission["concurrency"], deadline=admission["deadline_seconds"])
    log(f"admission: {message}" + ("" if passed else "; not ready, retried next run"))
    if passed:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        proof_file.write_text(proof)
        share_compile_cache()
    return passed


def share_compile_cache() -> None:
    """The engines compiled and warmed up for the suite: let the next node of this launch reuse the
    kernels (the publish unit uploads them once per launch, in the background; managed mirror only)."""
    archive = read_settings(str(NODE_ENV)).get("COMPILE_CACHE_ARCHIVE")
    if archive:
        log(f"compile cache: publishing to {archive} ({PUBLISH_UNIT})")
        subprocess.run(["systemctl", "start", "--no-block", PUBLISH_UNIT], check=False)


def main() -> int:
    stack = json.loads(STACK_JSON.read_text())
    watchdog = stack["watchdog"]
    admitted = [check_engine(engine, stack["model"], watchdog) for engine in stack["engines"]]
    ready = False
    if all(admitted):
        local = stack["local_proxy"]
        key = (ROOT / setting("API_KEY_FILE").lstrip("/")).read_text().strip()
        failure = probe(local, stack["model"], watchdog["probe_timeout_seconds"], key)
        if failure is None and refuses_without_key(local, watchdog["probe_timeout_seconds"]):
            ready = proven(stack, key)
        else:
            log(f"local proxy {local}: {failure or 'answers without the key'}")
    release = RELEASE.read_text().strip()
    ready_file = ROOT / stack["ready_file"].lstrip("/")
    if ready:
        if not ready_file.exists() or ready_file.read_text().strip() != release:
            log(f"node ready: release {release}")
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(release + "\n")
        ready_file.chmod(0o644)
        start_phase("ready")
    elif ready_file.exists():
        log("node not ready")
        ready_file.unlink()
        if read_status().get("phase") == "ready":
            start_phase("loading")  # an engine is being restarted
    return 0


if __name__ == "__main__":
    sys.exit(main())
