"""Issue 24 on Kubernetes, scale-in protection: the deletion-cost controller script
(kimi_fleet/pod_scripts/deletion_cost.py, shipped in its ConfigMap) run for real against a fake
Kubernetes API server (HTTPS with its own CA, the bearer token checked, list pods and PATCH, which
refuses any body but the one annotation) and fake engine metrics gates on their own loopback
addresses (one port, as pods share the gate's port), serving the engines' pinned metric names."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kimi_fleet import catalog
from kimi_fleet import k8s_deletion_cost as rendering
from kimi_fleet.pod_scripts import deletion_cost as controller
from kimi_fleet.pod_scripts import pod_script
from tests.fakes.harness import free_port

NAMESPACE = "kimi-test"
TOKEN = "fake-service-account-token"
SELECTOR = "app.kubernetes.io/component=engine,kimi-fleet/capacity-type=spot"
VLLM = catalog.ENGINE_METRICS["vllm"]


def engine_metrics(running, waiting, names=VLLM) -> str:
    """A gate's answer: the engine's gauges per label set (two data-parallel ranks), around other series."""
    lines = ["# HELP vllm:generation_tokens_total Generated tokens.", "# TYPE vllm:generation_tokens_total counter",
             f'{names.generated_tokens}{{model_name="kimi-k2.6"}} 12345.0']
    for rank, (run, wait) in enumerate(zip(running, waiting)):
        lines += [f'{names.running}{{model_name="kimi-k2.6",engine="{rank}"}} {run}',
                  f'{names.waiting}{{model_name="kimi-k2.6",engine="{rank}"}} {wait}']
    return "\n".join(lines) + "\n"


# --- the fake API server ---------------------------------------------------------------------------

class FakeApi:
    """Pods by name; every request recorded; a PATCH applies only the one annotation it allows."""

    def __init__(self):
        self.pods: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.refusals: list[str] = []
        self.list_status = 200

    def add(self, name: str, ip: str, *, phase="Running", cost: str | None = None, deleting=False):
        metadata = {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/component": "engine"},
                    "annotations": {"kimi-fleet/release": "abc"}}
        if cost is not None:
            metadata["annotations"][controller.ANNOTATION] = cost
        if deleting:
            metadata["deletionTimestamp"] = "2026-12-08T02:00:00Z"
        self.pods[name] = {"metadata": metadata, "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
                           "status": {"phase": phase, **({"podIP": ip} if ip else {})}}

    def cost(self, name: str) -> str | None:
        return self.pods[name]["metadata"]["annotations"].get(controller.ANNOTATION)

    def patches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "PATCH"]


def _api_handler(api: FakeApi):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, body: bytes = b"") -> dict:
            url = urllib.parse.urlsplit(self.path)
            entry = {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                     "authorization": self.headers.get("Authorization"),
                     "content_type": self.headers.get("Content-Type"), "body": body}
            api.requests.append(entry)
            return entry

        def do_GET(self):
            entry = self._record()
            if entry["authorization"] != f"Bearer {TOKEN}":
                return self._answer(401, {"kind": "Status", "code": 401})
            if entry["path"] != f"/api/v1/namespaces/{NAMESPACE}/pods":
                return self._answer(404, {"kind": "Status", "code": 404})
            if api.list_status != 200:
                return self._answer(api.list_status, {"kind": "Status", "code": api.list_status})
            self._answer(200, {"kind": "PodList", "items": list(api.pods.values())})

        def do_PATCH(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            entry = self._record(body)
            if entry["authorization"] != f"Bearer {TOKEN}":
                return self._answer(401, {"kind": "Status", "code": 401})
            prefix = f"/api/v1/namespaces/{NAMESPACE}/pods/"
            name = urllib.parse.unquote(entry["path"][len(prefix):])
            if not entry["path"].startswith(prefix) or name not in api.pods:
                return self._answer(404, {"kind": "Status", "code": 404})
            try:
                patch = json.loads(body)
                (value,) = patch["metadata"]["annotations"].values()
                allowed = (entry["content_type"] == "application/merge-patch+json" and list(patch) == ["metadata"]
                           and list(patch["metadata"]) == ["annotations"]
                           and list(patch["metadata"]["annotations"]) == [controller.ANNOTATION]
                           and isinstance(value, str) and -2**31 <= int(value) < 2**31)
            except (ValueError, KeyError, TypeError, AttributeError):
                allowed = False
            if not allowed:
                api.refusals.append(body.decode(errors="replace"))
                return self._answer(422, {"kind": "Status", "code": 422})
            api.pods[name]["metadata"]["annotations"][controller.ANNOTATION] = value
            self._answer(200, api.pods[name])

    return Handler


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: the controller must verify it with the CA file it is given."""
    directory = tmp_path_factory.mktemp("api-tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(directory / "key.pem"), "-out", str(directory / "ca.crt"),
                    "-days", "1", "-subj", "/CN=fake-apiserver", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    (directory / "token").write_text(TOKEN + "\n")
    return directory


@contextmanager
def serving(server: ThreadingHTTPServer):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def api(tls):
    import ssl

    fake = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _api_handler(fake))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "ca.crt", tls / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server):
        fake.url = f"https://127.0.0.1:{server.server_address[1]}"
        yield fake


# --- the fake metrics gates ------------------------------------------------------------------------

def _gate_handler(answer):
    """answer(): (status, body bytes, seconds between chunks or None)."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != rendering.manifests.ENGINE_METRICS_PATH:
                self.send_response(404)
                self.end_headers()
                return
            status, body, trickle = answer()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if trickle is None:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(trickle)

    return Handler


class Gates:
    """One gate per pod address (127.0.0.N), all on one port, as pods all listen on the gate's."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.port = free_port()
        self.answers: dict[str, object] = {}

    def start(self, ip: str, answer) -> str:
        self.answers[ip] = answer
        server = ThreadingHTTPServer((ip, self.port), _gate_handler(lambda: self.answers[ip]()))
        self.stack.enter_context(serving(server))
        return ip


    def start_raw(self, ip: str, behaviour) -> str:
        """A gate that answers every connection with behaviour(socket): raw bytes, for answers
        http.server would not send."""
        listener = socket.create_server((ip, self.port))
        self.stack.callback(listener.close)

        def loop():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    try:
                        behaviour(conn)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return ip


def text(body: str, status: int = 200, trickle=None):
    return lambda: (status, body.encode(), trickle)


@pytest.fixture
def gates():
    with ExitStack() as stack:
        yield Gates(stack)


def config(api: FakeApi, gates: Gates, tls: Path, names=VLLM) -> dict:
    return {"namespace": NAMESPACE, "label_selector": SELECTOR, "metrics_port": gates.port,
            "metrics_path": rendering.manifests.ENGINE_METRICS_PATH, "running": names.running,
            "waiting": names.waiting, "interval_seconds": 15, "max_cost": rendering.MAX_COST,
            "api_url": api.url, "token_file": str(tls / "token"), "ca_file": str(tls / "ca.crt")}


def run_once(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script as shipped (the ConfigMap's text), one cycle, in its own interpreter."""
    script = tmp_path / rendering.SCRIPT
    script.write_text(pod_script(rendering.SCRIPT))
    config_file = tmp_path / rendering.CONFIG_KEY
    config_file.write_text(json.dumps(cfg))
    return subprocess.run([sys.executable, str(script), str(config_file), "--once"], capture_output=True,
                          text=True, timeout=60)


# --- the end states --------------------------------------------------------------------------------

def test_the_busiest_pod_gets_the_highest_cost_and_nothing_but_the_annotation_changes(api, gates, tls, tmp_path):
    api.add("busy", gates.start("127.0.0.2", text(engine_metrics([4, 3], [2, 0]))))
    api.add("light", gates.start("127.0.0.3", text(engine_metrics([1, 0], [0, 0]))))
    api.add("idle", gates.start("127.0.0.4", text(engine_metrics([0, 0], [0, 0]))), cost="5")
    # Neither a pod still starting (no IP, Pending) nor one already being deleted is touched.
    api.add("pending", "", phase="Pending")
    api.add("leaving", gates.start("127.0.0.5", text(engine_metrics([9], [9]))), deleting=True)
    before = json.loads(json.dumps(api.pods))

    done = run_once(config(api, gates, tls), tmp_path)
    assert done.returncode == 0, done.stderr
    assert (api.cost("busy"), api.cost("light"), api.cost("idle")) == ("9", "1", "0")
    assert api.cost("pending") is None and api.cost("leaving") is None
    assert api.refusals == []
    # Every request carried the token; the list asked for the scaled Deployment's pods only.
    assert {r["authorization"] for r in api.requests} == {f"Bearer {TOKEN}"}
    (listing,) = [r for r in api.requests if r["method"] == "GET"]
    assert listing["query"] == {"labelSelector": [SELECTOR]}
    for patch in api.patches():
        assert patch["content_type"] == "application/merge-patch+json"
        assert json.loads(patch["body"]) == {"metadata": {"annotations": {controller.ANNOTATION: json.loads(
            patch["body"])["metadata"]["annotations"][controller.ANNOTATION]}}}
    # The pods are as they were but for that one annotation.
    for name, pod in api.pods.items():
        expected = json.loads(json.dumps(before[name]))
        if name in ("busy", "light", "idle"):
            expected["metadata"]["annotations"][controller.ANNOTATION] = api.cost(name)
        assert pod == expected, name
    assert "busy: controller.kubernetes.io/pod-deletion-cost=9" in done.stdout

    # The next cycle with the same loads writes nothing (each write is a pod update every watcher sees).
    api.requests.clear()
    assert run_once(config(api, gates, tls), tmp_path).returncode == 0
    assert api.patches() == []
    # The load moves: only the pod whose cost changed is written.
    gates.answers["127.0.0.3"] = text(engine_metrics([6, 6], [1, 0]))
    api.requests.clear()
    assert run_once(config(api, gates, tls), tmp_path).returncode == 0
    assert [r["path"].rsplit("/", 1)[1] for r in api.patches()] == ["light"]
    assert max(("busy", "light", "idle"), key=lambda name: int(api.cost(name))) == "light"


def test_sglang_names_are_read_as_sglang_names(api, gates, tls, tmp_path):
    sglang = catalog.ENGINE_METRICS["sglang"]
    body = "\n".join([f'{sglang.running}{{model_name="kimi"}} 3', f'{sglang.waiting}{{model_name="kimi"}} 4',
                      # vLLM's names on an SGLang stack are not its load.
                      f"{VLLM.running} 100", f"{VLLM.waiting} 100"]) + "\n"
    api.add("a", gates.start("127.0.0.2", text(body)))
    assert run_once(config(api, gates, tls, names=sglang), tmp_path).returncode == 0
    assert api.cost("a") == "7"


def test_a_pod_whose_metrics_fail_keeps_its_cost(api, gates, tls, tmp_path):
    api.add("was-busy", gates.start("127.0.0.2", text("upstream down", status=502)), cost="12")
    api.add("new", gates.start("127.0.0.3", text("", status=500)))
    api.add("refused", "127.0.0.9", cost="3")  # nothing listens there
    api.add("fine", gates.start("127.0.0.4", text(engine_metrics([2], [0]))), cost="0")
    done = run_once(config(api, gates, tls), tmp_path)
    assert done.returncode == 0, done.stderr
    assert (api.cost("was-busy"), api.cost("new"), api.cost("refused"), api.cost("fine")) == ("12", None, "3", "2")
    assert [r["path"].rsplit("/", 1)[1] for r in api.patches()] == ["fine"]
    assert "was-busy: kept its cost" in done.stdout


HOSTILE = {
    "nan": engine_metrics(["NaN"], [0]),
    "infinity": engine_metrics(["+Inf"], [0]),
    "negative": engine_metrics([-5], [0]),
    "huge": engine_metrics([1e300], [0]),
    "over-the-cap": engine_metrics([rendering.MAX_COST], [1]),
    "not-a-number": engine_metrics(["lots"], [0]),
    "garbage": "\x00\xff<html>Kubernetes is great</html>\n" * 50,
    "no-waiting-gauge": f"{VLLM.running} 3\n",
    "empty": "",
    "json": json.dumps({"running": 3, "waiting": 1}),
}


def test_a_hostile_answer_sets_no_cost_and_the_controller_goes_on(api, gates, tls, tmp_path):
    """Each hostile gate keeps its pod's cost (none here); the honest pod in the same cycle is set."""
    for i, (name, body) in enumerate(HOSTILE.items()):
        api.add(name, gates.start(f"127.0.1.{i + 1}", text(body)))
    big = engine_metrics([1], [1]) + "# padding\n" * (controller.METRICS_LIMIT_BYTES // 10 + 1)
    api.add("over-the-size-limit", gates.start("127.0.2.1", text(big)))
    api.add("honest", gates.start("127.0.2.2", text(engine_metrics([2, 1], [0, 1]))))
    done = run_once(config(api, gates, tls), tmp_path)
    assert done.returncode == 0, done.stderr
    assert {name: api.cost(name) for name in api.pods} == {**{name: None for name in api.pods}, "honest": "4"}
    assert api.refusals == []


def test_a_trickling_gate_is_cut_at_the_deadline(api, gates, tls, monkeypatch):
    """A gate that sends a byte at a time past the deadline keeps its cost (in-process: the deadline is
    shortened; the socket timeout alone would wait for each byte)."""
    monkeypatch.setattr(controller, "METRICS_DEADLINE_SECONDS", 0.5)
    api.add("slow", gates.start("127.0.0.2", text(engine_metrics([5], [5]), trickle=0.05)), cost="1")
    api.add("fine", gates.start("127.0.0.3", text(engine_metrics([1], [0]))))
    result = controller.cycle(controller.Api(config(api, gates, tls)), config(api, gates, tls))
    assert result["set"] == {"fine": 1} and "slow" in result["kept"]
    assert api.cost("slow") == "1"


@pytest.mark.parametrize("body", [
    engine_metrics([3], [4]),
    engine_metrics(["3.4"], ["0.2"]),
])
def test_the_load_is_running_plus_waiting(body):
    assert controller.parse_load(body, VLLM.running, VLLM.waiting, rendering.MAX_COST) == round(
        sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line.startswith((VLLM.running, VLLM.waiting))))


def test_every_hostile_value_parses_to_nothing():
    for name, body in HOSTILE.items():
        assert controller.parse_load(body, VLLM.running, VLLM.waiting, rendering.MAX_COST) is None, name
    assert not math.isfinite(float("NaN"))  # the sample's float() accepts it: the check is the script's


def test_the_api_servers_failures_do_not_stop_the_controller(api, gates, tls, tmp_path):
    api.add("a", gates.start("127.0.0.2", text(engine_metrics([1], [0]))))
    api.list_status = 500
    done = run_once(config(api, gates, tls), tmp_path)
    assert done.returncode == 0 and "cycle failed: HTTPError" in done.stdout
    assert api.cost("a") is None
    # A wrong token: refused by the API server (401), logged, nothing written.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    api.list_status = 200
    done = run_once({**config(api, gates, tls), "token_file": str(wrong)}, tmp_path)
    assert done.returncode == 0 and "401" in done.stdout and api.cost("a") is None
    # An API server whose certificate the CA file does not vouch for is not talked to.
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca), "-days", "1",
                    "-subj", "/CN=other"], check=True, capture_output=True)
    api.requests.clear()
    done = run_once({**config(api, gates, tls), "ca_file": str(other_ca)}, tmp_path)
    assert done.returncode == 0 and "CERTIFICATE_VERIFY_FAILED" in done.stdout
    assert api.requests == []


def test_a_bad_config_is_refused_naming_what_it_needs(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"namespace": NAMESPACE}))
    done = subprocess.run([sys.executable, "-c", "import sys; from kimi_fleet.pod_scripts import deletion_cost as c; "
                           "sys.exit(c.main(sys.argv[1:]))", str(config_file)], capture_output=True, text=True)
    assert done.returncode == 2 and "label_selector" in done.stderr


# --- one gate's broken HTTP cannot stop the cycle (review 2) ------------------------------------------

def _long_header(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n")


def _many_headers(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(120))
                 + b"Content-Length: 0\r\n\r\n")


def _chunked_cut_short(conn):
    body = engine_metrics([50], [50]).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body)


@pytest.mark.parametrize("behaviour", [_long_header, _many_headers, _chunked_cut_short],
                         ids=["header-line-over-64KiB", "over-100-headers", "chunked-body-cut-short"])
def test_a_gate_breaking_http_keeps_its_own_cost_and_the_others_are_set(api, gates, tls, capsys, behaviour):
    """http.client raises these (LineTooLong, HTTPException, IncompleteRead), outside OSError/ValueError:
    they once escaped the pool and failed the cycle before any patch, for every pod, every interval."""
    api.add("a", gates.start("127.0.0.2", text(engine_metrics([2], [1]))), cost="0")
    api.add("b", gates.start("127.0.0.3", text(engine_metrics([5], [0]))))
    api.add("liar", gates.start_raw("127.0.0.4", behaviour), cost="7")
    cfg = config(api, gates, tls)
    result = controller.cycle(controller.Api(cfg), cfg)
    assert result["set"] == {"a": 3, "b": 5} and "liar" in result["kept"]
    assert (api.cost("a"), api.cost("b"), api.cost("liar")) == ("3", "5", "7")
    assert [r["path"].rsplit("/", 1)[1] for r in api.patches()] == ["a", "b"]
    assert "liar: its metrics could not be read:" in capsys.readouterr().out


# --- memory: the parse holds a line, not the body ------------------------------------------------------

_MEMORY_PROBE = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import deletion_cost as dc
config = {"metrics_port": int(sys.argv[2]), "metrics_path": sys.argv[3], "running": sys.argv[4],
          "waiting": sys.argv[5], "max_cost": 1000000}
url = dc.metrics_url("127.0.0.2", config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load = dc.read_load(url, config)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(load, (after - before) / 1024)
"""


def test_a_body_near_the_size_limit_is_parsed_in_bounded_memory(gates, tmp_path):
    """The reviewer's shape: ~1.4 million 3-byte lines just under METRICS_LIMIT_BYTES (read whole and
    split, it took the script's process to ~133 MiB against the pod's 128 Mi limit), the gauges last:
    parsed to the end, and the process' peak resident memory grows by a few MiB at most."""
    gauges = engine_metrics([3], [4]).encode()
    body = b"ab\n" * ((controller.METRICS_LIMIT_BYTES - len(gauges) - 16) // 3) + gauges
    gates.start("127.0.0.2", lambda: (200, body, None))
    (tmp_path / rendering.SCRIPT).write_text(pod_script(rendering.SCRIPT))
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(gates.port),
                           rendering.manifests.ENGINE_METRICS_PATH, VLLM.running, VLLM.waiting],
                          capture_output=True, text=True, timeout=60, check=True)
    load, growth_mib = done.stdout.split()
    assert load == "7"
    assert float(growth_mib) < 8, done.stdout


def test_an_overlong_line_refuses_the_answer_however_it_arrives():
    reader = controller.LoadReader(VLLM.running, VLLM.waiting, rendering.MAX_COST)
    for line in engine_metrics([3], [4]).encode().splitlines(keepends=True):
        reader.feed(line)
    assert reader.load() == 7
    long_line = b"# " + b"x" * controller.MAX_LINE_BYTES
    for pieces in ([long_line + b"\n"], [long_line[:1000], long_line[1000:]]):
        reader = controller.LoadReader(VLLM.running, VLLM.waiting, rendering.MAX_COST)
        reader.feed(engine_metrics([3], [4]).encode())
        for piece in pieces:
            reader.feed(piece)
        assert reader.load() is None and reader._partial == b""


# --- liveness: the heartbeat and the probe's command ---------------------------------------------------

def test_the_liveness_probe_fails_until_a_cycle_completes_and_when_cycles_stop(api, gates, tls, tmp_path):
    """The rendered probe's command, run as the kubelet would (its paths under tmp_path): no heartbeat
    yet fails; a cycle with one unreadable pod still completes and beats; a beat older than
    LIVENESS_CYCLES intervals fails; a cycle the API server fails does not beat."""
    heartbeat = tmp_path / "heartbeat"
    cfg = {**config(api, gates, tls), "heartbeat_file": str(heartbeat)}
    api.add("a", gates.start("127.0.0.2", text(engine_metrics([1], [0]))))
    api.add("liar", gates.start_raw("127.0.0.3", _many_headers))
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / rendering.SCRIPT).write_text(pod_script(rendering.SCRIPT))
    (mount / rendering.CONFIG_KEY).write_text(json.dumps(cfg))
    command = [sys.executable] + [arg.replace(rendering.MOUNT, str(mount))
                                  for arg in rendering.liveness_probe()["exec"]["command"][1:]]

    def probe() -> int:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).returncode

    assert probe() == 1
    done = run_once(cfg, tmp_path)
    assert done.returncode == 0 and api.cost("a") == "1" and heartbeat.exists()
    assert probe() == 0
    stale = time.time() - controller.LIVENESS_CYCLES * rendering.INTERVAL_SECONDS - 1
    os.utime(heartbeat, (stale, stale))
    assert probe() == 1
    api.list_status = 500
    done = run_once(cfg, tmp_path)
    assert "cycle failed" in done.stdout and heartbeat.stat().st_mtime == pytest.approx(stale)
    assert probe() == 1
