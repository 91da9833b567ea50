"""Failed keys against the real proxy, with the node's real fail2ban jail banning through nftables.

Runs inside a private network namespace (`unshare --net`), so fail2ban's nftables table dies with
it. Clients come from two loopback addresses: 127.0.0.2 sends wrong keys, 127.0.0.3 is a good
client. Prints one JSON object with what happened; tests/test_node_guard.py judges it.

usage: unshare --net python failed_key_scenario.py WORKDIR   (WORKDIR holds scenario.json)
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from harness import wait_for  # beside this script (it runs as a script, inside the namespace)

ATTACKER = "127.0.0.2"
GOOD_CLIENT = "127.0.0.3"


class _Engine(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source, retries=0, verify=False), timeout=3)


def _status(source: str, url: str, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    # A header forging the fields the filter reads: the ban must still land on the real address.
    headers["User-Agent"] = 'x","remote_ip":"198.51.100.9","status":401,'
    try:
        with _client(source) as client:
            return str(client.get(url, headers=headers).status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.TimeoutException:
        return "timeout"


def main(workdir: Path) -> dict:
    scenario = json.loads((workdir / "scenario.json").read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    engine = http.server.ThreadingHTTPServer(("127.0.0.1", scenario["engine_port"]), _Engine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()

    url = f"https://localhost:{scenario['https_port']}/v1/models"
    key, wrong = scenario["api_key"], scenario["wrong_key"]
    caddy = subprocess.Popen(
        ["caddy", "run", "--config", scenario["caddyfile"], "--adapter", "caddyfile"],
        env={**os.environ, "KIMI_API_KEY": key, "HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data")},
        stdout=(workdir / "caddy.out").open("wb"), stderr=subprocess.STDOUT,
    )
    fail2ban = [scenario["fail2ban_client"], "-c", scenario["fail2ban_dir"], "-s", str(workdir / "f2b.sock"),
                "-p", str(workdir / "f2b.pid")]
    server = subprocess.Popen([*fail2ban, "-x", "-f", "start"], stdout=(workdir / "f2b.out").open("wb"),
                              stderr=subprocess.STDOUT)
    result: dict = {}
    try:
        result["proxy_up"] = wait_for(lambda: _status(GOOD_CLIENT, url, key) == "200", 20, 0.2)

        def jail_status() -> str:
            out = subprocess.run([*fail2ban, "status", scenario["jail"]], capture_output=True, text=True)
            return out.stdout if out.returncode == 0 else ""

        result["jail_up"] = wait_for(lambda: "Banned IP list" in jail_status(), 20, 0.2)
        result["attacker_before"] = [_status(ATTACKER, url, wrong) for _ in range(scenario["failures"])]
        result["attacker_keyless"] = _status(ATTACKER, url, None)
        result["banned"] = wait_for(lambda: ATTACKER in jail_status(), 15, 0.2)
        result["jail_status"] = jail_status()

        def firewall() -> str:
            return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout

        # fail2ban lists an address as banned before its ban action has run: wait for the rule.
        result["in_firewall"] = wait_for(lambda: ATTACKER in firewall(), 15, 0.2)
        result["ruleset"] = firewall()
        # Banned: even the right key gets no connection from that address, on the proxy's port.
        result["attacker_after"] = _status(ATTACKER, url, key)
        result["good_client_after"] = _status(GOOD_CLIENT, url, key)
    finally:
        subprocess.run([*fail2ban, "stop"], capture_output=True, timeout=30)
        server.wait(timeout=30)
        caddy.terminate()
        caddy.wait(timeout=15)
        engine.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
