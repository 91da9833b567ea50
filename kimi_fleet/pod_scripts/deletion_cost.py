#!/usr/bin/env python3
"""Protect a scaling stack's busiest engine pod from scale-in (issue 24): every interval, read each
engine pod's running + waiting requests from its metrics gate (the port Prometheus scrapes) and set
the pod's `controller.kubernetes.io/pod-deletion-cost` to that load, so that when KEDA's HPA scales
the Deployment in, the ReplicaSet controller deletes the least busy ready pod first (it deletes
lower-cost pods first among pods equally ready: pkg/controller/replicaset, ActivePodsWithRanks).

It runs alone in its own pod, with its own ServiceAccount: an engine pod gets no token and can
change no pod. The only write is a JSON merge patch of that one annotation, on the pod whose own
gate answered: a lying engine can only move its own cost, within [0, max_cost].

A pod whose metrics do not answer, or answer nonsense (NaN, infinity, a negative or absurd count,
no sample of the two gauges, a body over the size limit, a trickle past the deadline), keeps the
cost it has: its last reading stands. A low cost instead would expose a busy pod to scale-in on a
network hiccup, which is the loss this exists to prevent; a stale high cost only makes the
ReplicaSet pick another pod, and a pod whose engine died fails its readiness probe, which the
ReplicaSet ranks first for deletion whatever its cost.

The annotation is written only when it changes (the Kubernetes docs warn against updating it from
a metric at a high rate: each write is a pod update every watcher sees).

Standard library only (the pinned python image): the in-cluster token (re-read each cycle: bound
tokens rotate) and CA, https to the API server at KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT.

Liveness: after each cycle that completed (some pods unreadable or not), the file config
["heartbeat_file"] is touched; `--alive` exits 1 when it is missing or older than LIVENESS_CYCLES
intervals (the pod's liveness probe: a controller stuck failing is restarted, and counted in
`kubectl get pods`' RESTARTS).

usage: deletion_cost.py CONFIG_JSON [--once | --alive]
  CONFIG_JSON  {"namespace", "label_selector", "metrics_port", "metrics_path", "running", "waiting",
                "interval_seconds", "max_cost"} and optionally "heartbeat_file"
                (k8s_deletion_cost.controller_config); for tests also "api_url", "token_file", "ca_file"
  --once       one cycle, then exit (0 whatever the cycle met)
  --alive      exit 0 when the heartbeat is fresh, 1 when not (no API call, no metrics read)
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: One pod's metrics read, whole (connect, headers and body): a gate answers in milliseconds.
METRICS_DEADLINE_SECONDS = 5.0
#: An engine's /metrics is tens to hundreds of KB; more is refused unread.
METRICS_LIMIT_BYTES = 4 * 1024 * 1024
#: One read of a body, and the longest line the metrics parse keeps (an exposition line is a few
#: hundred bytes; one over this refuses the answer).
READ_BYTES = 65536
MAX_LINE_BYTES = 65536
#: The pod list and each patch.
API_TIMEOUT_SECONDS = 10.0
API_LIMIT_BYTES = 32 * 1024 * 1024
#: Pods read at once (a slow pod does not hold the others back).
READERS = 8
CONFIG_KEYS = ("namespace", "label_selector", "metrics_port", "metrics_path", "running", "waiting",
               "interval_seconds", "max_cost")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")
USAGE = "usage: deletion_cost.py CONFIG_JSON [--once | --alive]"
#: A heartbeat older than this many intervals fails --alive: a cycle is the pod list (10 s at most),
#: the reads (5 s per READERS pods) and the patches (10 s each at most), so a slow cycle over many
#: pods is not taken for a stuck one.
LIVENESS_CYCLES = 8


def log(message: str) -> None:
    print(f"[kimi-deletion-cost] {message}", flush=True)


class _Unbounded(Exception):
    """A body over its size limit, or still arriving at its deadline."""


def _bounded_chunks(response, limit: int, deadline: float):
    """The body's chunks as they arrive; _Unbounded past `limit` bytes or `deadline`."""
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise _Unbounded
        chunk = response.read1(READ_BYTES) if hasattr(response, "read1") else response.read(READ_BYTES)
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise _Unbounded
        yield chunk


def _read_bounded(response, limit: int, deadline: float) -> bytes | None:
    """The body, or None when it is over `limit` bytes or still arriving at `deadline`."""
    try:
        return b"".join(_bounded_chunks(response, limit, deadline))
    except _Unbounded:
        return None


class LoadReader:
    """running + waiting as the exposition streams in, one line at a time: only the two gauges' sums
    are kept, so memory holds one line (at most MAX_LINE_BYTES) and one read, whatever the body's size
    (a whole 4 MiB body split into lines took ~130 MiB, over the pod's 128 Mi limit)."""

    def __init__(self, running: str, waiting: str, max_cost: int):
        self.running, self.waiting, self.max_cost = running, waiting, max_cost
        self.totals: dict[str, float] = {}
        self.refused = False
        self._partial = b""

    def line(self, line: str) -> None:
        match = _SAMPLE.match(line)
        if self.refused or not match or match.group(1) not in (self.running, self.waiting):
            return
        try:
            value = float(match.group(2))
        except ValueError:
            self.refused = True
            return
        if not math.isfinite(value) or value < 0:
            self.refused = True
            return
        self.totals[match.group(1)] = self.totals.get(match.group(1), 0.0) + value

    def feed(self, chunk: bytes) -> None:
        """A piece of the body; a line longer than MAX_LINE_BYTES refuses the answer."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if len(raw) > MAX_LINE_BYTES:
                self.refused = True
            else:
                self.line(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if len(self._partial) > MAX_LINE_BYTES:
            self.refused = True
            self._partial = b""

    def load(self) -> int | None:
        """The cost, or None when the answer cannot be trusted: a gauge missing, a value that is not a
        finite number >= 0, a total above max_cost, or a line over MAX_LINE_BYTES."""
        if self._partial:
            self.feed(b"\n")
        if self.refused or self.running not in self.totals or self.waiting not in self.totals:
            return None
        total = self.totals[self.running] + self.totals[self.waiting]
        if not math.isfinite(total) or total > self.max_cost:
            return None
        return int(round(total))


def parse_load(text: str, running: str, waiting: str, max_cost: int) -> int | None:
    """running + waiting (each summed over its label sets: one per model or data-parallel rank) as a
    cost, or None when the answer cannot be trusted (LoadReader.load)."""
    reader = LoadReader(running, waiting, max_cost)
    reader.feed(text.encode("utf-8", errors="replace"))
    return reader.load()


def read_load(url: str, config: dict) -> int | None:
    """One pod's cost from its metrics gate, or None (unreadable: keep what it has). Nothing a gate
    answers raises: http.client's own errors (a header line over 64 KiB, over 100 headers, a chunked
    body cut short) included; read_pod logs whatever does."""
    deadline = time.monotonic() + METRICS_DEADLINE_SECONDS
    reader = LoadReader(config["running"], config["waiting"], config["max_cost"])
    with urllib.request.urlopen(url, timeout=METRICS_DEADLINE_SECONDS) as response:
        if response.status != 200:
            return None
        try:
            for chunk in _bounded_chunks(response, METRICS_LIMIT_BYTES, deadline):
                reader.feed(chunk)
                if reader.refused:
                    return None
        except _Unbounded:
            return None
    return reader.load()


def read_pod(name: str, url: str | None, config: dict) -> int | None:
    """read_load for one pod, whatever its gate does: a failure of any kind is logged with the pod and
    leaves it its cost; it never reaches the cycle (one lying pod would stop every pod's update)."""
    if url is None:
        return None
    try:
        return read_load(url, config)
    except urllib.error.HTTPError as error:  # a status the opener refuses: the pod's answer, not news
        error.close()
        return None
    except Exception as error:  # noqa: BLE001 - see the docstring
        log(f"{name}: its metrics could not be read: {type(error).__name__}: {str(error)[:200]}")
        return None


def metrics_url(pod_ip: str, config: dict) -> str | None:
    """The pod's gate, from the IP the API server reports (checked: it goes into a URL)."""
    try:
        address = ipaddress.ip_address(pod_ip)
    except ValueError:
        return None
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{int(config['metrics_port'])}{config['metrics_path']}"


class Api:
    """The API server with the pod's ServiceAccount token: list pods, patch one annotation."""

    def __init__(self, config: dict):
        self.namespace = config["namespace"]
        self.token_file = config.get("token_file", f"{SERVICE_ACCOUNT_DIR}/token")
        url = config.get("api_url")
        if not url:
            host = os.environ["KUBERNETES_SERVICE_HOST"]
            host = f"[{host}]" if ":" in host else host
            url = f"https://{host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
        self.url = url.rstrip("/")
        self.context = None
        if self.url.startswith("https://"):
            self.context = ssl.create_default_context(cafile=config.get("ca_file", f"{SERVICE_ACCOUNT_DIR}/ca.crt"))

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        with open(self.token_file) as handle:  # re-read: the kubelet rotates a bound token
            token = handle.read().strip()
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        if content_type:
            request.add_header("Content-Type", content_type)
        deadline = time.monotonic() + API_TIMEOUT_SECONDS
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_SECONDS, context=self.context) as response:
            data = _read_bounded(response, API_LIMIT_BYTES, deadline)
        if data is None:
            raise ValueError(f"{method} {path}: answer over {API_LIMIT_BYTES} bytes or {API_TIMEOUT_SECONDS:g} s")
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ValueError(f"{method} {path}: not a JSON object")
        return answer

    def pods(self, label_selector: str) -> list[dict]:
        query = urllib.parse.urlencode({"labelSelector": label_selector})
        answer = self._request("GET", f"/api/v1/namespaces/{urllib.parse.quote(self.namespace)}/pods?{query}")
        items = answer.get("items")
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    def set_cost(self, name: str, cost: int) -> None:
        """A JSON merge patch of metadata.annotations[ANNOTATION] and nothing else."""
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}}).encode()
        self._request("PATCH", f"/api/v1/namespaces/{urllib.parse.quote(self.namespace)}/pods/"
                               f"{urllib.parse.quote(name, safe='')}", body, "application/merge-patch+json")


def _candidate(pod: dict) -> tuple[str, str, str | None] | None:
    """(name, pod IP, current cost) of a running pod not being deleted, else None."""
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    name, pod_ip = metadata.get("name"), status.get("podIP")
    if (not isinstance(name, str) or not isinstance(pod_ip, str) or status.get("phase") != "Running"
            or metadata.get("deletionTimestamp")):
        return None
    annotations = metadata.get("annotations") or {}
    current = annotations.get(ANNOTATION) if isinstance(annotations, dict) else None
    return name, pod_ip, current


def cycle(api: Api, config: dict) -> dict:
    """One pass: {"set": {pod: cost}, "kept": {pod: why}}. Raises only what the API server's list
    raised (the caller logs it and tries again next interval)."""
    pods = [c for c in map(_candidate, api.pods(config["label_selector"])) if c is not None]
    urls = {name: metrics_url(pod_ip, config) for name, pod_ip, _ in pods}
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        loads = dict(zip(urls, pool.map(lambda item: read_pod(*item, config), urls.items())))
    result: dict[str, dict] = {"set": {}, "kept": {}}
    for name, _, current in pods:
        cost = loads[name]
        if cost is None:
            result["kept"][name] = "its metrics did not answer with a load"
        elif current == str(cost):
            result["kept"][name] = "unchanged"
        else:
            try:
                api.set_cost(name, cost)
            except (OSError, ValueError) as error:  # gone since the list, or the API server's hiccup
                result["kept"][name] = f"patch failed: {type(error).__name__}: {error}"
                continue
            result["set"][name] = cost
    return result


def load_config(path: str) -> dict | None:
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or any(key not in config for key in CONFIG_KEYS):
        return None
    return config


def beat(config: dict) -> None:
    """Touch the heartbeat file (a cycle completed)."""
    path = config.get("heartbeat_file")
    if path:
        with open(path, "a"):
            pass
        os.utime(path)


def alive(config: dict, now: float | None = None) -> bool:
    """The heartbeat is younger than LIVENESS_CYCLES intervals (no heartbeat_file configured: alive)."""
    path = config.get("heartbeat_file")
    if not path:
        return True
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except OSError:
        return False
    return age < LIVENESS_CYCLES * float(config["interval_seconds"])


def main(argv: list[str]) -> int:
    once = argv[1:] == ["--once"]
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] not in ("--once", "--alive")):
        print(USAGE, file=sys.stderr)
        return 2
    config = load_config(argv[0])
    if config is None:
        print(f"{USAGE}\nconfig {argv[0]!r} is not a JSON object with {', '.join(CONFIG_KEYS)}", file=sys.stderr)
        return 2
    if argv[1:] == ["--alive"]:
        if alive(config):
            return 0
        print(f"heartbeat {config.get('heartbeat_file')} missing or older than {LIVENESS_CYCLES} intervals",
              file=sys.stderr)
        return 1
    api = Api(config)
    while True:
        try:
            result = cycle(api, config)
        except Exception as error:  # noqa: BLE001 - a controller that stops protects nothing: log, retry
            log(f"cycle failed: {type(error).__name__}: {error}")
        else:
            try:
                beat(config)
            except OSError as error:  # the probe will say so; the costs still count
                log(f"heartbeat not written: {error}")
            for name, cost in sorted(result["set"].items()):
                log(f"{name}: {ANNOTATION}={cost}")
            for name, why in sorted(result["kept"].items()):
                if why != "unchanged":
                    log(f"{name}: kept its cost ({why})")
        if once:
            return 0
        time.sleep(float(config["interval_seconds"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
