"""Defence in depth on a node, as files: failed API keys throttled per client address (fail2ban
reading Caddy's JSON access log, banning through nftables) and the opt-in host firewall.

Stock Caddy has no rate limiter (mholt/caddy-ratelimit needs a custom build, and nodes run the
distribution's Caddy), so the throttle is fail2ban: packaged on every node OS, it watches the
access log Caddy already writes and bans an address at the kernel for a while. Pure text
rendering, checked by the real consumers in the tests (fail2ban-regex, fail2ban-server, nft).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kimi_fleet.caddy import HTTP_PORT, HTTPS_PORT

#: Caddy's JSON access log on a node; fail2ban reads it. /var/log/caddy belongs to Caddy's user.
ACCESS_LOG = "/var/log/caddy/kimi-access.log"
JAIL_NAME = "kimi-caddy-auth"
FAIL2BAN_FILTER_PATH = f"/etc/fail2ban/filter.d/{JAIL_NAME}.conf"
FAIL2BAN_JAIL_PATH = f"/etc/fail2ban/jail.d/{JAIL_NAME}.local"
FIREWALL_RULES_PATH = "/etc/kimi-fleet/firewall.nft"
FIREWALL_TABLE = "kimi_fleet"
NFT = "/usr/sbin/nft"


@dataclass(frozen=True)
class FailedKeyPolicy:
    """An address that fails `max_failures` times within `window_seconds` is refused on the proxy's
    ports for `ban_seconds`. A client with the right key never fails; the gate's auth check sends 3
    wrong keys per run, well under the limit."""

    max_failures: int = 10
    window_seconds: int = 60
    ban_seconds: int = 600


FAILED_KEYS = FailedKeyPolicy()

# Caddy's access log (2.6 to 2.11) writes one JSON object per line that starts
#   {"level":"error","ts":1796166334.5785534,"logger":"http.log.access.log0","msg":"handled request",
#    "request":{"remote_ip":"203.0.113.7",...},...,"status":401,...}
# The date pattern takes the line up to the whole seconds; fail2ban matches the failure regex
# against what is left, so the anchor sits right after the timestamp, where nothing a client
# sends can appear. remote_ip is the request's first field (headers come later, JSON-escaped, so a
# forged `"remote_ip":"..."` in a header cannot match), and `"status":401` with bare quotes
# appears only as the top-level field.
FILTER_DATE_PATTERN = r'^\{"level":"[a-z]+","ts":{EPOCH}'
FILTER_FAIL_REGEX = (
    r'^(?:\.\d+)?,"logger":"http\.log\.access[^"]*","msg":"handled request",'
    r'"request":\{"remote_ip":"<ADDR>",.*"status":401[,}]'
)


def render_fail2ban_filter() -> str:
    return "\n".join([
        "# kimi-fleet: a request Caddy answered 401 (missing or wrong API key), by client address.",
        "[Definition]",
        f"datepattern = {FILTER_DATE_PATTERN}",
        f"failregex = {FILTER_FAIL_REGEX}",
        "ignoreregex =",
        "",
    ])


def render_fail2ban_jail(*, log_path: str = ACCESS_LOG, policy: FailedKeyPolicy = FAILED_KEYS,
                         ports: tuple[int, ...] = (HTTP_PORT, HTTPS_PORT),
                         ban_action: str = "nftables-multiport") -> str:
    """The jail: `log_path`, `ports` and `ban_action` are parameters so a test can run the same
    jail against a loopback Caddy."""
    return "\n".join([
        "# kimi-fleet: throttle failed API keys per client address (see kimi-fleet's README).",
        f"[{JAIL_NAME}]",
        "enabled = true",
        f"filter = {JAIL_NAME}",
        f"logpath = {log_path}",
        # Polling needs neither pyinotify nor the journal: the same jail works on every node OS.
        "backend = polling",
        f"maxretry = {policy.max_failures}",
        f"findtime = {policy.window_seconds}",
        f"bantime = {policy.ban_seconds}",
        f"banaction = {ban_action}",
        f"port = {','.join(str(p) for p in ports)}",
        "protocol = tcp",
        "",
    ])


def render_firewall(*, enabled: bool, ssh_port: int, ssh_allowlist: tuple[str, ...], stack: str) -> str:
    """An nftables script that atomically replaces kimi-fleet's own table. Enabled: HTTP(S) from
    anywhere, SSH only from the allowlist, established traffic, loopback, ICMP and DHCP replies;
    everything else dropped. Disabled: the table is removed (opting out undoes an opt-in)."""
    header = [
        f"#!{NFT} -f",
        f"# kimi-fleet host firewall for stack {stack}. Applied by kimi-firewall.service; other tables",
        "# (Docker's, fail2ban's) are untouched. A packet dropped here is dropped whatever they accept.",
        # Declaring then deleting makes the first run and every later run the same transaction.
        f"table inet {FIREWALL_TABLE}",
        f"delete table inet {FIREWALL_TABLE}",
    ]
    if not enabled:
        return "\n".join(header + [f"# firewall: false (target.host.firewall): no {FIREWALL_TABLE} table", ""])
    networks = [ipaddress.ip_network(cidr, strict=True) for cidr in ssh_allowlist]
    v4 = [str(n) for n in networks if n.version == 4]
    v6 = [str(n) for n in networks if n.version == 6]

    def address_set(name: str, kind: str, elements: list[str]) -> list[str]:
        lines = [f"\tset {name} {{", f"\t\ttype {kind}", "\t\tflags interval"]
        if elements:
            lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
        return lines + ["\t}"]

    body = [
        f"table inet {FIREWALL_TABLE} {{",
        *address_set("ssh_allow_v4", "ipv4_addr", v4),
        *address_set("ssh_allow_v6", "ipv6_addr", v6),
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        '\t\tiif "lo" accept',
        # IPv6 neighbour discovery and path MTU need ICMPv6; ping and PMTU need ICMP.
        "\t\tmeta l4proto { icmp, ipv6-icmp } accept",
        "\t\tudp sport 67 udp dport 68 accept",
        "\t\tudp sport 547 udp dport 546 accept",
        f"\t\ttcp dport {{ {HTTP_PORT}, {HTTPS_PORT} }} accept",
        f"\t\tip saddr @ssh_allow_v4 tcp dport {ssh_port} accept",
        f"\t\tip6 saddr @ssh_allow_v6 tcp dport {ssh_port} accept",
        "\t}",
        "}",
        "",
    ]
    return "\n".join(header + body)


FIREWALL_UNIT = f"""[Unit]
Description=kimi-fleet host firewall ({FIREWALL_RULES_PATH})
Documentation=file://{FIREWALL_RULES_PATH}
# In place before the network comes up on boot, so no port is ever open unfiltered.
DefaultDependencies=no
Before=network-pre.target shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={NFT} -f {FIREWALL_RULES_PATH}

[Install]
WantedBy=multi-user.target
"""
