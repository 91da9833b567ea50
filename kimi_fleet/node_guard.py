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

from kimi_fleet import catalog, templates
from kimi_fleet.caddy import HTTP_PORT, HTTPS_PORT
from kimi_fleet.paths import ENGINE_SLICE

#: Caddy's JSON access log on a node; fail2ban reads it. /var/log/caddy belongs to Caddy's user.
ACCESS_LOG = "/var/log/caddy/kimi-access.log"
JAIL_NAME = "kimi-caddy-auth"
FAIL2BAN_FILTER_PATH = f"/etc/fail2ban/filter.d/{JAIL_NAME}.conf"
FAIL2BAN_JAIL_PATH = f"/etc/fail2ban/jail.d/{JAIL_NAME}.local"
FIREWALL_RULES_PATH = "/etc/kimi-fleet/firewall.nft"
FIREWALL_TABLE = "kimi_fleet"
ENGINE_GUARD_PATH = "/etc/kimi-fleet/engine-guard.nft"
ENGINE_GUARD_TABLE = "kimi_fleet_engines"
ENGINE_GUARD_UNIT_NAME = "kimi-engine-guard.service"
#: The kernel log line of a refused attempt (rate-limited): what an operator greps for.
ENGINE_GUARD_LOG_PREFIX = "kimi-fleet engine to metadata refused: "
NFT = "/usr/sbin/nft"
#: The host's bridge interface of the GPU exporter's own docker network (node_metrics.py creates the
#: network with this name; at most 15 characters): the guard matches it.
GPU_EXPORTER_BRIDGE = "kimi-gpuexp0"


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
    return templates.render("fail2ban-filter.conf", DATE_PATTERN=FILTER_DATE_PATTERN, FAIL_REGEX=FILTER_FAIL_REGEX)


def render_fail2ban_jail(*, log_path: str = ACCESS_LOG, policy: FailedKeyPolicy = FAILED_KEYS,
                         ports: tuple[int, ...] = (HTTP_PORT, HTTPS_PORT),
                         ban_action: str = "nftables-multiport") -> str:
    """The jail (polling: neither pyinotify nor the journal needed, so it works on every node OS).
    `log_path`, `ports` and `ban_action` are parameters so a test can run the same jail against a
    loopback Caddy."""
    return templates.render(
        "fail2ban-jail.local", JAIL=JAIL_NAME, LOG_PATH=log_path, MAX_FAILURES=policy.max_failures,
        WINDOW_SECONDS=policy.window_seconds, BAN_SECONDS=policy.ban_seconds, BAN_ACTION=ban_action,
        PORTS=",".join(str(p) for p in ports))


def render_firewall(*, enabled: bool, ssh_port: int, ssh_allowlist: tuple[str, ...], stack: str,
                    extra_public_ports: tuple[int, ...] = ()) -> str:
    """An nftables script that atomically replaces kimi-fleet's own table (declaring then deleting
    it makes the first run and every later run the same transaction). Enabled: HTTP(S) from
    anywhere, SSH only from the allowlist, established traffic, loopback, ICMP (neighbour discovery,
    path MTU) and DHCP replies; everything else dropped. `extra_public_ports`: more TCP ports open to
    anyone, each a keyed TLS site of the proxy (a host's scrape endpoint). Disabled: the table is
    removed (opting out undoes an opt-in)."""
    header = templates.render("firewall-header.nft", NFT=NFT, STACK=stack, TABLE=FIREWALL_TABLE)
    if not enabled:
        return header + f"# firewall: false (target.host.firewall): no {FIREWALL_TABLE} table\n"
    networks = [ipaddress.ip_network(cidr, strict=True) for cidr in ssh_allowlist]

    def elements(version: int) -> str:
        chosen = [str(n) for n in networks if n.version == version]
        return f"\n\t\telements = {{ {', '.join(chosen)} }}" if chosen else ""

    return header + templates.render(
        "firewall-rules.nft", TABLE=FIREWALL_TABLE, V4_ELEMENTS=elements(4), V6_ELEMENTS=elements(6),
        PUBLIC_PORTS=", ".join(str(p) for p in (HTTP_PORT, HTTPS_PORT, *extra_public_ports)), SSH_PORT=ssh_port)


FIREWALL_UNIT = templates.render("kimi-firewall.service", RULES=FIREWALL_RULES_PATH, NFT=NFT)


def render_engine_guard(*, stack: str, cgroup_path: str = ENGINE_SLICE) -> str:
    """nftables: every process whose cgroup is under `cgroup_path` (relative to the cgroup2 mount,
    level 1: the slice and everything in it) is refused the instance metadata addresses, with a
    rate-limited kernel log line; the GPU exporter's bridge (GPU_EXPORTER_BRIDGE) forwards nothing
    and opens no connection to the host. `cgroup_path` is a parameter so a test can load the same rules
    against a cgroup of its own."""
    rules = []
    for address in catalog.INSTANCE_METADATA_ADDRESSES:
        family = "ip6" if ":" in address else "ip"
        match = f'socket cgroupv2 level 1 "{cgroup_path}" {family} daddr {address}'
        rules.append(f'\t\t{match} limit rate 6/minute log prefix "{ENGINE_GUARD_LOG_PREFIX}"')
        rules.append(f"\t\t{match} counter reject")
    return templates.render("engine-guard.nft", NFT=NFT, STACK=stack, SLICE=ENGINE_SLICE,
                            TABLE=ENGINE_GUARD_TABLE, RULES="\n".join(rules), BRIDGE=GPU_EXPORTER_BRIDGE)


ENGINE_SLICE_UNIT = templates.render("kimi-engines.slice")
ENGINE_GUARD_UNIT = templates.render("kimi-engine-guard.service", RULES=ENGINE_GUARD_PATH, NFT=NFT,
                                     SLICE=ENGINE_SLICE)
