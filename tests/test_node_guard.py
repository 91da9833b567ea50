"""Failed keys throttled per address, and the opt-in host firewall, checked by the real consumers:
Caddy writing its access log, fail2ban-regex and fail2ban-server reading it, nftables banning and
filtering inside private network namespaces (so nothing here touches the machine's own rules)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from kimi_fleet import node_guard
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import render_caddyfile_for, render_node_files, SecretsSource
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file

SCENARIO = Path(__file__).parent / "fakes" / "failed_key_scenario.py"
API_KEY = "node-guard-test-key-5d1c0e7a"
WRONG_KEY = "wrong-key-9b2f47e1c3a8d605"


def _can_use_private_netns() -> str | None:
    """None when this machine lets root make network namespaces and nftables rules in them."""
    for tool in ("unshare", "ip", "nft", "caddy", "fail2ban-client", "fail2ban-regex"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/run installs it)"
    probe = subprocess.run(["unshare", "--net", "nft", "add", "table", "inet", "probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no private network namespace with nftables here: {probe.stderr.strip()}"
    return None


NETNS_UNAVAILABLE = _can_use_private_netns()
needs_netns = pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE))


def _resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


# --- fail2ban: the node's filter and jail against the node's Caddyfile ------------------------

def _fail2ban_dir(root: Path, access_log: Path, port: int) -> Path:
    """Debian's fail2ban configuration with the node's filter and jail; only the log path and the
    port differ, and a loopback client may be banned (a node never bans its own addresses)."""
    conf = root / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for default_jail in (conf / "jail.d").iterdir():
        default_jail.unlink()
    (conf / "filter.d" / f"{node_guard.JAIL_NAME}.conf").write_text(node_guard.render_fail2ban_filter())
    (conf / "jail.d" / f"{node_guard.JAIL_NAME}.local").write_text(
        node_guard.render_fail2ban_jail(log_path=str(access_log), ports=(port,)))
    (conf / "jail.d" / "zz-test.local").write_text(f"[{node_guard.JAIL_NAME}]\nignoreself = false\n")
    (conf / "fail2ban.local").write_text(
        f"[Definition]\nlogtarget = {root / 'fail2ban.log'}\ndbfile = :memory:\n")
    return conf


@needs_netns
def test_repeated_wrong_keys_from_one_address_are_banned_and_logged_without_the_key(tmp_path):
    r = _resolved("h200-int4-sglang")
    launch = render_launch(r)
    engine_port = int(launch.upstreams[0].rsplit(":", 1)[1])
    https_port, http_port = 18443, 18080
    access_log = tmp_path / "access.log"
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(render_caddyfile_for(r, launch, domain="localhost", tls="internal", https_port=https_port,
                                              http_port=http_port, bind_host="127.0.0.1",
                                              access_log=str(access_log)))
    access_log.touch()  # what the bootstrap's prepare_access_log does before fail2ban starts
    policy = node_guard.FAILED_KEYS
    (tmp_path / "scenario.json").write_text(json.dumps({
        "engine_port": engine_port, "https_port": https_port, "caddyfile": str(caddyfile),
        "api_key": API_KEY, "wrong_key": WRONG_KEY, "failures": policy.max_failures,
        "fail2ban_client": shutil.which("fail2ban-client"),
        "fail2ban_dir": str(_fail2ban_dir(tmp_path, access_log, https_port)), "jail": node_guard.JAIL_NAME,
    }))
    run = subprocess.run(["unshare", "--net", sys.executable, str(SCENARIO), str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    diagnostics = {"result": result, "fail2ban.log": _tail(tmp_path / "fail2ban.log"),
                   "f2b.out": _tail(tmp_path / "f2b.out"), "caddy.out": _tail(tmp_path / "caddy.out")}
    assert result["proxy_up"] and result["jail_up"], diagnostics
    assert result["attacker_before"] == ["401"] * policy.max_failures, diagnostics
    assert result["banned"], diagnostics
    # The forged header named another address: only the real one is banned.
    assert "198.51.100.9" not in result["jail_status"], diagnostics
    assert result["in_firewall"], diagnostics
    assert "198.51.100.9" not in result["ruleset"], diagnostics
    assert result["attacker_after"] in ("refused", "timeout"), diagnostics
    assert result["good_client_after"] == "200", diagnostics

    # Logged: every failure, by address, status and path; neither key appears anywhere.
    log_text = access_log.read_text()
    failures = [json.loads(line) for line in log_text.splitlines() if json.loads(line)["status"] == 401]
    assert len(failures) >= policy.max_failures + 1
    assert {entry["request"]["remote_ip"] for entry in failures} == {"127.0.0.2"}
    for text in (log_text, (tmp_path / "fail2ban.log").read_text(), (tmp_path / "caddy.out").read_text()):
        assert API_KEY not in text and WRONG_KEY not in text
    assert "Ban 127.0.0.2" in (tmp_path / "fail2ban.log").read_text()

    # fail2ban's own regex tester agrees, address by address, on the real log.
    regex = subprocess.run(["fail2ban-regex", "-o", "ip", str(access_log),
                            str(tmp_path / "fail2ban" / "filter.d" / f"{node_guard.JAIL_NAME}.conf")],
                           capture_output=True, text=True)
    assert regex.returncode == 0, regex.stderr
    assert regex.stdout.split() == ["127.0.0.2"] * len(failures)


def _tail(path: Path, size: int = 2000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def test_filter_refuses_forged_lines_and_other_statuses(tmp_path):
    """Lines a client can shape (headers, URI) never produce a match on their content."""
    if shutil.which("fail2ban-regex") is None:
        pytest.skip("fail2ban not installed (.ci/run installs it)")
    prefix = '{"level":"error","ts":1796166334.5785534,"logger":"http.log.access.log0","msg":"handled request",'
    lines = [
        # A 401 from 203.0.113.5: the one match.
        prefix + '"request":{"remote_ip":"203.0.113.5","remote_port":"5","headers":{}},"status":401,"size":2}',
        # A 200 whose URI and header carry the filter's own words, JSON-escaped as Caddy writes them.
        prefix + r'"request":{"remote_ip":"203.0.113.6","remote_port":"5","uri":"/x\",\"status\":401,",'
                 r'"headers":{"User-Agent":["\"remote_ip\":\"198.51.100.9\""]}},"status":200,"size":2}',
        # A 413 (body too large) is not a failed key.
        prefix + '"request":{"remote_ip":"203.0.113.7","remote_port":"5","headers":{}},"status":413,"size":2}',
        # Another logger's line.
        '{"level":"error","ts":1796166334.5,"logger":"tls","msg":"handled request","request":'
        '{"remote_ip":"203.0.113.8"},"status":401}',
    ]
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    filter_file = tmp_path / "kimi.conf"
    filter_file.write_text(node_guard.render_fail2ban_filter())
    regex = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), str(filter_file)], capture_output=True, text=True)
    assert regex.returncode == 0, regex.stderr
    assert regex.stdout.split() == ["203.0.113.5"]


def test_every_node_gets_the_jail_and_only_hosts_get_the_firewall():
    for stack, host in (("h200-int4-sglang", False), ("rtxpro6000-int4-sglang", True)):
        r = _resolved(stack)
        files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"), ebs_volume_id="vol-1")
        assert node_guard.FAIL2BAN_JAIL_PATH in files and node_guard.FAIL2BAN_FILTER_PATH in files
        assert f"output file {node_guard.ACCESS_LOG}" in files["/etc/caddy/Caddyfile"].content
        assert (node_guard.FIREWALL_RULES_PATH in files) is host
        if host:
            enabled = render_node_files(r.__class__(r.spec.model_copy(update={"target": r.spec.target.model_copy(
                update={"host": r.spec.target.host.model_copy(update={"firewall": True})})})),
                render_launch(r), size(r), secrets=SecretsSource("files"))[node_guard.FIREWALL_RULES_PATH].content
            assert "tcp dport { 80, 443, 9443 } accept" in enabled  # the scrape endpoint's own port
            # Default off: the file only removes kimi-fleet's table (opting out undoes an opt-in).
            assert "policy drop" not in files[node_guard.FIREWALL_RULES_PATH].content


# --- the host firewall, applied by the real nft between two namespaces --------------------

class _Namespaces:
    """A server namespace and a client namespace joined by a veth pair: 10.77.0.1 is the host,
    the client has 10.77.0.2 (in the SSH allowlist) and 10.77.0.3 (not)."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.server, self.client = f"kfs{tag}", f"kfc{tag}"
        self.listener: subprocess.Popen | None = None

    def __enter__(self):
        for ns in (self.server, self.client):
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("link", "add", f"v{self.server}", "netns", self.server, "type", "veth",
                 "peer", "name", f"v{self.client}", "netns", self.client)
        self._ip("-n", self.server, "addr", "add", "10.77.0.1/24", "dev", f"v{self.server}")
        self._ip("-n", self.client, "addr", "add", "10.77.0.2/24", "dev", f"v{self.client}")
        self._ip("-n", self.client, "addr", "add", "10.77.0.3/24", "dev", f"v{self.client}")
        for ns, dev in ((self.server, f"v{self.server}"), (self.client, f"v{self.client}")):
            self._ip("-n", ns, "link", "set", dev, "up")
        return self

    def __exit__(self, *exc):
        if self.listener is not None:
            self.listener.kill()
            self.listener.wait()
        for ns in (self.server, self.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def listen(self, ports: list[int]) -> None:
        code = textwrap.dedent(f"""
            import socket, threading, sys
            def serve(port):
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port)); s.listen(16)
                while True:
                    c, _ = s.accept(); c.close()
            for p in {ports!r}:
                threading.Thread(target=serve, args=(p,), daemon=True).start()
            print("listening", flush=True)
            sys.stdin.read()
        """)
        self.listener = subprocess.Popen(["ip", "netns", "exec", self.server, sys.executable, "-c", code],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.listener.stdout.readline().strip() == "listening"

    def apply(self, rules: str, path: Path) -> None:
        path.write_text(rules)
        subprocess.run(["ip", "netns", "exec", self.server, "nft", "-f", str(path)], check=True, capture_output=True)

    def reachable(self, source: str, port: int) -> bool:
        code = ("import socket, sys\ns = socket.socket(); s.settimeout(1)\ns.bind((sys.argv[1], 0))\n"
                "try:\n    s.connect(('10.77.0.1', int(sys.argv[2])))\nexcept OSError:\n    sys.exit(1)\n")
        return subprocess.run(["ip", "netns", "exec", self.client, sys.executable, "-c", code, source, str(port)],
                              capture_output=True).returncode == 0


@needs_netns
def test_host_firewall_admits_https_everywhere_and_ssh_only_from_the_allowlist(tmp_path):
    ssh_port, engine_port, metrics_port, scrape_port = 2222, 30000, 9400, 9443
    # The host's scrape endpoint (a keyed TLS site of the proxy) is public like 443; the exporter is not.
    enabled = node_guard.render_firewall(enabled=True, ssh_port=ssh_port, ssh_allowlist=("10.77.0.2/32", "2001:db8::/64"),
                                         stack="rtxpro6000-int4-sglang", extra_public_ports=(scrape_port,))
    disabled = node_guard.render_firewall(enabled=False, ssh_port=ssh_port, ssh_allowlist=(), stack="rtxpro6000-int4-sglang")
    ports = [80, 443, ssh_port, engine_port, metrics_port, scrape_port]
    with _Namespaces() as net:
        net.listen(ports)
        assert all(net.reachable("10.77.0.3", port) for port in ports)  # no rules yet: everything open
        for _ in range(2):  # the first apply and a re-apply are the same transaction
            net.apply(enabled, tmp_path / "firewall.nft")
            assert net.reachable("10.77.0.2", 80) and net.reachable("10.77.0.2", 443)
            assert net.reachable("10.77.0.3", 443) and net.reachable("10.77.0.3", scrape_port)
            assert net.reachable("10.77.0.2", ssh_port)
            assert not net.reachable("10.77.0.3", ssh_port)
            assert not net.reachable("10.77.0.2", engine_port) and not net.reachable("10.77.0.2", metrics_port)
        # Opting out removes the table and nothing else.
        net.apply(disabled, tmp_path / "firewall.nft")
        assert net.reachable("10.77.0.3", ssh_port) and net.reachable("10.77.0.3", engine_port)
        net.apply(disabled, tmp_path / "firewall.nft")  # removing twice is fine too


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (.ci/run installs it)")
@pytest.mark.parametrize("allowlist", [(), ("203.0.113.7/32",), ("2001:db8::/64",), ("10.0.0.0/8", "2001:db8::/48")])
def test_firewall_rules_parse_in_nft(tmp_path, allowlist):
    if NETNS_UNAVAILABLE:
        pytest.skip(NETNS_UNAVAILABLE)
    path = tmp_path / "firewall.nft"
    for enabled in (True, False):
        path.write_text(node_guard.render_firewall(enabled=enabled, ssh_port=22, ssh_allowlist=allowlist, stack="s"))
        check = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
