"""Pure validators behind the `kimi-fleet-safety` policy pack.

No `pulumi_policy` import here: every validator is a plain function
`validate_x(resource_type: str, props: Mapping) -> list[str]` (violation messages, empty = ok), so
it can be unit-tested directly and reused by the offline planner (`check_resources`).

Props are the resource *inputs* as the Pulumi engine sees them: camelCase names (`fromPort`,
`userData`, `instanceMarketOptions`), numbers possibly as floats (protobuf Struct), component
resources with exactly the props dict they pass to `ComponentResource.__init__`. Under the policy
SDK the props are read-only Mapping/Sequence proxies that raise on unknown (preview-time) values;
the validators therefore only use Mapping/Sequence operations and never swallow exceptions.

Component contracts (type token -> props the component must register for its policy to see it):
    kimi-fleet:proxy:AuthProxy        caddyfile: str, allowedUpstreams: list[str] (Kubernetes only)
    kimi-fleet:engine:EngineRelease   image: str, revision: str (40-hex Hugging Face commit)
    kimi-fleet:capacity:CapacityPolicy workload, market, replicas, onDemandBase
    kimi-fleet:fleet:Fleet            hourlyCostUsd: float|None, budgetPerHourUsd: float|None
    kimi-fleet:weights:WeightsMirror  mirror: {bucket, created, encryption, publicAccessBlock,
                                      abortIncompleteUploadsDays, liveCheckBeforeNodes}
    any component                     secretValues: list[str] (wrap in pulumi.Output.secret)
"""

from __future__ import annotations

import base64
import binascii
import gzip
import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator, NamedTuple

# --------------------------------------------------------------------------------------------
# Resource type tokens
# --------------------------------------------------------------------------------------------
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SECURITY_GROUP_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
SG_INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EC2_INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
AUTOSCALING_GROUP = "aws:autoscaling/group:Group"
K8S_SERVICE = "kubernetes:core/v1:Service"
LOCAL_COMMAND = "command:local:Command"
REMOTE_COMMAND = "command:remote:Command"

AUTH_PROXY = "kimi-fleet:proxy:AuthProxy"
ENGINE_RELEASE = "kimi-fleet:engine:EngineRelease"
S3_OBJECT = "aws:s3/bucketObjectv2:BucketObjectv2"
CAPACITY_POLICY = "kimi-fleet:capacity:CapacityPolicy"
WEIGHTS_MIRROR = "kimi-fleet:weights:WeightsMirror"
S3_PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
S3_ENCRYPTION = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
FLEET = "kimi-fleet:fleet:Fleet"
EBS_VOLUME = "aws:ebs/volume:Volume"

WORKLOAD_TAG = "kimi-fleet:workload"

# Where the pod templates live, per Kubernetes workload type.
_SPEC_TEMPLATE = ("spec", "template", "spec")
K8S_POD_SPEC_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "kubernetes:apps/v1:Deployment": (_SPEC_TEMPLATE,),
    "kubernetes:apps/v1:StatefulSet": (_SPEC_TEMPLATE,),
    "kubernetes:apps/v1:DaemonSet": (_SPEC_TEMPLATE,),
    "kubernetes:apps/v1:ReplicaSet": (_SPEC_TEMPLATE,),
    "kubernetes:batch/v1:Job": (_SPEC_TEMPLATE,),
    "kubernetes:batch/v1:CronJob": (("spec", "jobTemplate", "spec", "template", "spec"),),
    "kubernetes:core/v1:Pod": (("spec",),),
    # The real LWS API nests leader and worker templates; `spec.template.spec` is accepted too.
    "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet": (
        ("spec", "leaderWorkerTemplate", "leaderTemplate", "spec"),
        ("spec", "leaderWorkerTemplate", "workerTemplate", "spec"),
        _SPEC_TEMPLATE,
    ),
}

# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------
#: (first, last, what): never reachable from outside the host, not even from the VPC.
PROTECTED_PORTS: tuple[tuple[int, int, str], ...] = (
    (8000, 8100, "inference engine (vLLM 8000 and extra local engines)"),
    (30000, 30100, "inference engine (SGLang 30000 and extra local engines)"),
    (2019, 2019, "Caddy admin API"),
    (9090, 9090, "metrics (Prometheus)"),
    (9100, 9100, "metrics (node exporter)"),
    (9400, 9400, "metrics (DCGM exporter)"),
)
#: The only ports that may face the whole Internet (Caddy: ACME HTTP-01 / redirect, HTTPS, HTTP/3).
PUBLIC_PORTS = frozenset({80, 443})
SSH_PORT = 22
ALL_PORTS = (0, 65535)


# --------------------------------------------------------------------------------------------
# Small helpers (Mapping/Sequence aware: the policy SDK hands out read-only proxies)
# --------------------------------------------------------------------------------------------
def _is_map(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _get(obj: Any, *path: Any, default: Any = None) -> Any:
    for key in path:
        if _is_map(obj):
            if key not in obj:
                return default
            obj = obj[key]
        elif _is_seq(obj) and isinstance(key, int):
            if not -len(obj) <= key < len(obj):
                return default
            obj = obj[key]
        else:
            return default
    return default if obj is None else obj


def _items(value: Any) -> list[Any]:
    return list(value) if _is_seq(value) else []


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except ValueError:
            return None
    return None


def _tags(props: Mapping) -> dict[str, str]:
    """Tags as a dict: EC2 style `tags: {k: v}` or Auto Scaling style `tags: [{key, value}]`."""
    tags = _get(props, "tags")
    out: dict[str, str] = {}
    if _is_map(tags):
        for key in tags:
            out[str(key)] = str(tags[key])
    elif _is_seq(tags):
        for tag in tags:
            if _is_map(tag) and "key" in tag:
                out[str(tag["key"])] = str(_get(tag, "value", default=""))
    return out


def _string_leaves(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path or "<value>", value
    elif _is_map(value):
        for key in value:
            yield from _string_leaves(value[key], f"{path}.{key}" if path else str(key))
    elif _is_seq(value):
        for i, item in enumerate(value):
            yield from _string_leaves(item, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------
# engine-port-not-exposed
# --------------------------------------------------------------------------------------------
class _Ingress(NamedTuple):
    label: str
    protocol: str  # "tcp" | "udp" | "all" | "icmp" | "other"
    first: int
    last: int
    sources: list[tuple[str, str]]  # (kind, value): kind in ipv4/ipv6/sg/self/prefix-list


def _protocol(value: Any) -> str:
    text = str(value if value is not None else "").strip().lower()
    number = _int(text)
    if number is not None:
        text = str(number)
    if text in ("-1", "all"):
        return "all"
    if text in ("tcp", "6"):
        return "tcp"
    if text in ("udp", "17"):
        return "udp"
    if text in ("icmp", "1", "icmpv6", "58"):
        return "icmp"
    return "other"


def _port_range(protocol: str, from_port: Any, to_port: Any) -> tuple[int, int]:
    if protocol == "all":
        return ALL_PORTS
    first, last = _int(from_port), _int(to_port)
    if first is None and last is None:
        return ALL_PORTS
    first = first if first is not None else last
    last = last if last is not None else first
    assert first is not None and last is not None
    if first < 0:
        first = 0
    if last < 0:
        last = 65535
    return (min(first, last), max(first, last))


def _cidr_sources(kind: str, values: Any) -> list[tuple[str, str]]:
    if isinstance(values, str):
        values = [values]
    return [(kind, str(v)) for v in _items(values) if v not in (None, "")]


def _is_world(cidr: str) -> bool:
    """0.0.0.0/0 and ::/0, and anything nearly as wide (IPv4 shorter than /8, IPv6 than /16)."""
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        return False
    return net.prefixlen < (8 if net.version == 4 else 16)


def _protected_hits(first: int, last: int) -> list[str]:
    hits = []
    for lo, hi, what in PROTECTED_PORTS:
        if first <= hi and lo <= last:
            span = str(lo) if lo == hi else f"{lo}-{hi}"
            hits.append(f"{span} ({what})")
    return hits


def _describe_sources(sources: list[tuple[str, str]]) -> str:
    return ", ".join(value if kind in ("ipv4", "ipv6") else f"{kind} {value}" for kind, value in sources)


def _check_ingress(rule: _Ingress) -> list[str]:
    if rule.protocol in ("icmp", "other") or not rule.sources:
        return []
    messages = []
    span = f"{rule.first}-{rule.last}" if rule.first != rule.last else str(rule.first)
    what = f"{rule.label}: {'all protocols' if rule.protocol == 'all' else rule.protocol} port(s) {span}"
    hits = _protected_hits(rule.first, rule.last) if rule.protocol in ("tcp", "all") else []
    # An all-traffic rule whose only source is the group itself is the intra-fleet rule NCCL/EFA
    # needs; every other source (CIDR, prefix list, another group) is an exposure.
    external = [s for s in rule.sources if s[0] != "self"]
    if hits and external:
        messages.append(
            f"{what} open to {_describe_sources(external)} covers {', '.join(hits)}. Engines and "
            "metrics listen on loopback behind the authenticated Caddy proxy; never open their ports "
            "(the engines' own --api-key guards only some routes)."
        )
    world = [s for s in rule.sources if s[0] in ("ipv4", "ipv6") and _is_world(s[1])]
    if world:
        public_only = rule.protocol in ("tcp", "udp") and rule.first == rule.last and rule.first in PUBLIC_PORTS
        if not public_only:
            ssh = " including SSH (22): allow SSH only from specific admin CIDRs or use SSM Session Manager" \
                if rule.first <= SSH_PORT <= rule.last and rule.protocol in ("tcp", "all") else ""
            messages.append(
                f"{what} open to the Internet ({_describe_sources(world)}){ssh}. Only 80 and 443 "
                "(the Caddy proxy) may be open to 0.0.0.0/0 or ::/0."
            )
    return messages


def _security_group_ingress(props: Mapping) -> list[_Ingress]:
    rules = []
    for i, item in enumerate(_items(_get(props, "ingress"))):
        if not _is_map(item):
            continue
        protocol = _protocol(_get(item, "protocol"))
        first, last = _port_range(protocol, _get(item, "fromPort"), _get(item, "toPort"))
        sources = _cidr_sources("ipv4", _get(item, "cidrBlocks")) + _cidr_sources(
            "ipv6", _get(item, "ipv6CidrBlocks"))
        sources += _cidr_sources("prefix-list", _get(item, "prefixListIds"))
        sources += _cidr_sources("sg", _get(item, "securityGroups"))
        if _get(item, "self") is True:
            sources.append(("self", "self"))
        rules.append(_Ingress(f"ingress[{i}]", protocol, first, last, sources))
    return rules


def _group_source(props: Mapping, key: str) -> list[tuple[str, str]]:
    """A rule whose source is a security group: its own group (fleet-internal) or another one."""
    group = _get(props, key)
    if not group:
        return []
    return [("self", "self") if group == _get(props, "securityGroupId") else ("sg", str(group))]


def _security_group_rule(props: Mapping) -> list[_Ingress]:
    if str(_get(props, "type", default="")).lower() != "ingress":
        return []
    protocol = _protocol(_get(props, "protocol"))
    first, last = _port_range(protocol, _get(props, "fromPort"), _get(props, "toPort"))
    sources = _cidr_sources("ipv4", _get(props, "cidrBlocks")) + _cidr_sources(
        "ipv6", _get(props, "ipv6CidrBlocks"))
    sources += _cidr_sources("prefix-list", _get(props, "prefixListIds"))
    if _get(props, "self") is True:
        sources.append(("self", "self"))
    sources += _group_source(props, "sourceSecurityGroupId")
    return [_Ingress("ingress rule", protocol, first, last, sources)]


def _vpc_ingress_rule(props: Mapping) -> list[_Ingress]:
    protocol = _protocol(_get(props, "ipProtocol"))
    first, last = _port_range(protocol, _get(props, "fromPort"), _get(props, "toPort"))
    sources = _cidr_sources("ipv4", _get(props, "cidrIpv4")) + _cidr_sources("ipv6", _get(props, "cidrIpv6"))
    sources += _cidr_sources("prefix-list", _get(props, "prefixListId"))
    sources += _group_source(props, "referencedSecurityGroupId")
    return [_Ingress("ingress rule", protocol, first, last, sources)]


def _service_messages(props: Mapping) -> list[str]:
    service_type = str(_get(props, "spec", "type", default="ClusterIP"))
    external_ips = _items(_get(props, "spec", "externalIPs"))
    exposed = service_type in ("NodePort", "LoadBalancer") or bool(external_ips)
    if not exposed:
        return []
    how = service_type if service_type in ("NodePort", "LoadBalancer") else "ClusterIP with externalIPs"
    messages = []
    for i, port in enumerate(_items(_get(props, "spec", "ports"))):
        if not _is_map(port):
            continue
        number, target = _int(_get(port, "port")), _int(_get(port, "targetPort"))
        for field, value in (("port", number), ("targetPort", target)):
            if value is None:
                continue
            hits = _protected_hits(value, value)
            if hits:
                messages.append(
                    f"{how} Service exposes spec.ports[{i}].{field} {value} ({', '.join(hits)}): the "
                    "engine Service must be ClusterIP, reached only by the authenticated proxy."
                )
        if number is not None and number not in PUBLIC_PORTS:
            messages.append(
                f"{how} Service exposes spec.ports[{i}].port {number}: only the proxy may be exposed, "
                "on 443 (and 80)."
            )
    return messages


def validate_engine_port_not_exposed(resource_type: str, props: Mapping) -> list[str]:
    """Security groups and Services must not expose engine/metrics ports; only 80/443 face the
    Internet; SSH only from specific CIDRs."""
    if resource_type == SECURITY_GROUP:
        rules = _security_group_ingress(props)
    elif resource_type == SECURITY_GROUP_RULE:
        rules = _security_group_rule(props)
    elif resource_type == SG_INGRESS_RULE:
        rules = _vpc_ingress_rule(props)
    elif resource_type == K8S_SERVICE:
        return _service_messages(props)
    else:
        return []
    return [message for rule in rules for message in _check_ingress(rule)]


# --------------------------------------------------------------------------------------------
# proxy-requires-key
# --------------------------------------------------------------------------------------------
#: A keyless route may serve one file from a runtime directory (the watchdog's ready file), never
#: configuration or data.
_RUNTIME_FILE = re.compile(r"^/run/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)+$")
_LOCAL_HOSTS = ("localhost",)


def _upstream_host(upstream: str) -> str:
    text = upstream.strip()
    for scheme in ("http://", "https://", "h2c://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    text = text.split("/", 1)[0]
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def _upstream_allowed(upstream: str, allowed: list[str]) -> bool:
    if upstream.startswith("unix/"):
        return True
    if upstream in allowed:
        return True
    host = _upstream_host(upstream)
    if not host or "{" in host:
        return False
    if host.lower() in _LOCAL_HOSTS:
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in {_upstream_host(a) for a in allowed}


def validate_proxy_requires_key(resource_type: str, props: Mapping) -> list[str]:
    """The AuthProxy's registered facts (`proxy`, rendered with the Caddyfile and held against
    Caddy's own adaptation of it in tests): the admin API off; every site that reaches an upstream
    requires the Bearer key first and passes only the promised routes; upstreams on loopback (or an
    allowed cluster Service); a route without the key serves one runtime file only, from a site that
    proxies nothing."""
    if resource_type != AUTH_PROXY:
        return []
    proxy = _get(props, "proxy")
    if not _is_map(proxy):
        return ["AuthProxy has no `proxy` facts: the proxy configuration cannot be checked."]
    allowed = [str(a) for a in _items(_get(props, "allowedUpstreams"))]
    messages: list[str] = []
    if _get(proxy, "adminOff") is not True:
        messages.append("the proxy must run with `admin off` (the admin API on :2019 can rewrite the config "
                        "without any key).")
    sites = _items(_get(proxy, "sites"))
    if not sites:
        messages.append("the proxy describes no site.")
    # A host's scrape endpoint is a keyed site of its own (its own key, the loopback exporters): held
    # to the same rules as the tenants' sites.
    scrape = _get(proxy, "scrapeSite")
    for site in sites + ([scrape] if _is_map(scrape) else []):
        label = str(_get(site, "address", default="?"))
        upstreams = [str(u) for u in _items(_get(site, "upstreams"))]
        keyed = _get(site, "keyRequired") is True and bool(_get(site, "keyEnv"))
        if upstreams and not keyed:
            messages.append(f"site {label!r} proxies to {', '.join(upstreams)} without requiring the Bearer key "
                            "first: requests without the key would reach the engine.")
        for upstream in upstreams:
            if not _upstream_allowed(upstream, allowed):
                where = "127.0.0.1/localhost/[::1]" + (f" or one of {allowed}" if allowed else "")
                messages.append(f"site {label!r}: upstream {upstream!r} is not on {where}: the engine must listen "
                                "on loopback (a LAN address can change and bypasses the key).")
        if upstreams and not _items(_get(site, "proxiedRoutes")):
            messages.append(f"site {label!r} proxies every route to {', '.join(upstreams)}: it must pass only the "
                            "promised routes (a tenant's key would reach the engine's controls).")
        for route in _items(_get(site, "routes")):
            path = _get(route, "path", default="?")
            if _get(route, "keyRequired") is True and keyed:
                continue
            served = _get(route, "servesFile")
            if upstreams or not (isinstance(served, str) and _RUNTIME_FILE.match(served)):
                messages.append(f"site {label!r} route {path!r} serves without the key: only one file under /run "
                                "may, from a site that proxies nothing.")
    metrics = _get(proxy, "metricsSite")
    if metrics is not None:
        # Caddy's own metrics have no key: only a loopback-bound site may serve them.
        if not _is_map(metrics) or _get(metrics, "bind") not in ("127.0.0.1", "::1", "localhost") or \
                _items(_get(metrics, "upstreams")):
            messages.append(f"the proxy's metrics site {_get(metrics, 'address', default='?')!r} must bind loopback and "
                            "proxy nothing: it serves without a key.")
    return messages


# --------------------------------------------------------------------------------------------
# pinned-images-and-revision
# --------------------------------------------------------------------------------------------
_REVISION = re.compile(r"^[0-9a-f]{40}$")


def _load_pinning():
    """kimi_fleet/pinning.py, the spec's own predicate, loaded by path (the pack imports no package)."""
    name = "kimi_fleet_policy_pinning"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "kimi_fleet", "pinning.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


image_problem = _load_pinning().image_problem


def _pod_specs(resource_type: str, props: Mapping) -> Iterator[tuple[str, Mapping]]:
    for path in K8S_POD_SPEC_PATHS.get(resource_type, ()):
        spec = _get(props, *path)
        if _is_map(spec):
            yield ".".join(path), spec


def _containers(resource_type: str, props: Mapping) -> Iterator[tuple[str, Mapping]]:
    for where, spec in _pod_specs(resource_type, props):
        for kind in ("initContainers", "containers", "ephemeralContainers"):
            for i, container in enumerate(_items(_get(spec, kind))):
                if _is_map(container):
                    yield f"{where}.{kind}[{i}]", container


def validate_pinned_images_and_revision(resource_type: str, props: Mapping) -> list[str]:
    """EngineRelease image and Hugging Face revision pinned; every workload container image pinned."""
    messages = []
    if resource_type == ENGINE_RELEASE:
        problem = image_problem(_get(props, "image"))
        if problem:
            messages.append(f"EngineRelease: {problem}.")
        revision = _get(props, "revision")
        if not isinstance(revision, str) or not _REVISION.match(revision):
            messages.append(
                f"EngineRelease revision {revision!r} is not a 40-hex Hugging Face commit: a branch "
                "name (main) moves under the fleet; pin `--revision <sha>`."
            )
    for where, container in _containers(resource_type, props):
        problem = image_problem(_get(container, "image"))
        if problem:
            messages.append(f"{where} ({_get(container, 'name', default='?')}): {problem}.")
    return messages


# --------------------------------------------------------------------------------------------
# interactive-not-spot-only
# --------------------------------------------------------------------------------------------
def validate_interactive_not_spot_only(resource_type: str, props: Mapping) -> list[str]:
    """Interactive capacity keeps at least one on-demand replica: spot can vanish with two
    minutes' notice and an interactive endpoint would go dark."""
    if resource_type == CAPACITY_POLICY:
        workload, market = _get(props, "workload"), _get(props, "market")
        base = _int(_get(props, "onDemandBase")) or 0
        if workload == "interactive" and market == "spot" and base < 1:
            return [f"interactive workload on spot with onDemandBase={base} (replicas="
                    f"{_get(props, 'replicas')}): keep at least 1 on-demand replica, or use "
                    "market on-demand / capacity-block."]
        return []
    # Read tags only on the types checked: elsewhere they may be unknown during preview, and the
    # SDK would turn that into a "can't run policy" diagnostic on every resource.
    if resource_type not in (EC2_INSTANCE, LAUNCH_TEMPLATE, AUTOSCALING_GROUP):
        return []
    if _tags(props).get(WORKLOAD_TAG) != "interactive":
        return []
    if resource_type in (EC2_INSTANCE, LAUNCH_TEMPLATE):
        if str(_get(props, "instanceMarketOptions", "marketType", default="")).lower() == "spot":
            kind = "instance" if resource_type == EC2_INSTANCE else "launch template"
            return [f"spot {kind} tagged {WORKLOAD_TAG}=interactive: interactive serving needs "
                    "on-demand (or capacity-block) capacity underneath."]
    if resource_type == AUTOSCALING_GROUP:
        distribution = _get(props, "mixedInstancesPolicy", "instancesDistribution")
        if _get(props, "mixedInstancesPolicy") is not None:
            base = _int(_get(distribution, "onDemandBaseCapacity")) or 0
            above = _int(_get(distribution, "onDemandPercentageAboveBaseCapacity"))
            above = 100 if above is None else above  # the AWS default: all on-demand
            if base < 1 and above < 100:
                return [f"Auto Scaling group tagged {WORKLOAD_TAG}=interactive has onDemandBaseCapacity="
                        f"{base} and {above}% on-demand above base: set onDemandBaseCapacity >= 1."]
    return []


# --------------------------------------------------------------------------------------------
# no-secrets-in-user-data
# --------------------------------------------------------------------------------------------
# Limits: heuristics. A secret split across lines, encoded twice, or hidden in an unusual
# variable name is not found; anything that matches the patterns but is not a secret is reported.
SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a Hugging Face token (hf_...)", re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")),
    ("an API key (sk-...)", re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9][A-Za-z0-9_-]{19,}")),
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])")),
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")),
)
_SECRET_NAME = r"[A-Za-z0-9_]*(?:API_KEY|APIKEY|TOKEN|SECRET|SECRET_KEY|SECRET_ACCESS_KEY|PASSWORD|PASSWD|PASSPHRASE)"
_SECRET_NAME_FULL = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
_VALUE = r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s;&|]*)"
_ASSIGNMENT = re.compile(
    rf"(?<![A-Za-z0-9_.-])(?P<name>{_SECRET_NAME})(?:=|:[ \t]+){_VALUE}", re.IGNORECASE)
_CLI_FLAG = re.compile(rf"--(?P<name>api-key|hf-token|token|password)(?:=|[ \t]+){_VALUE}")
_NOT_SECRET = frozenset({"true", "false", "none", "null", "yes", "no", "0", "1"})
#: Secret values shorter than this are not searched for verbatim (too many false matches).
MIN_SECRET_LENGTH = 8

USER_DATA_FIELDS = ("userData", "userDataBase64")
COMMAND_FIELDS = ("create", "update", "delete")


def _is_literal(value: str) -> bool:
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text or text.lower() in _NOT_SECRET:
        return False
    # $(aws ssm get-parameter ...), ${VAR}, $VAR, `cmd`, {{ template }}, {env.X}, <(cmd), next flag
    return not text.startswith(("$", "`", "{{", "{env.", "<(", "-"))


def decode_user_data(value: str) -> list[tuple[str, str]]:
    """[(how, text)]: the value itself and, when it is valid base64 (optionally gzip), its decoding."""
    texts = [("", value)]
    compact = re.sub(r"\s+", "", value)
    if compact and len(compact) % 4 == 0 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        try:
            raw = base64.b64decode(compact, validate=True)
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            texts.append((" (base64-decoded)", raw.decode("utf-8")))
        except (binascii.Error, ValueError, OSError, EOFError):
            pass
    return texts


def find_secret_patterns(text: str) -> list[tuple[int, str]]:
    """[(line number, what)] for things in `text` that look like secrets (values never returned)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in SECRET_PATTERNS:
            if pattern.search(line):
                found.append((number, what))
        for regex in (_ASSIGNMENT, _CLI_FLAG):
            for match in regex.finditer(line):
                if _is_literal(match.group("value")):
                    name = match.group("name")
                    flag = "--" if regex is _CLI_FLAG else ""
                    found.append((number, f"a literal value assigned to {flag}{name}"))
    return found


def _scan_fields(resource_type: str, props: Mapping) -> list[tuple[str, str]]:
    """(label, text) of the fields that end up on a machine or in logs: user data (decoded too),
    command scripts, container commands/args/env values."""
    fields: list[tuple[str, str]] = []
    if resource_type in (EC2_INSTANCE, LAUNCH_TEMPLATE):
        for name in USER_DATA_FIELDS:
            value = _get(props, name)
            if isinstance(value, str):
                fields += [(f"{name}{how}", text) for how, text in decode_user_data(value)]
    elif resource_type in (LOCAL_COMMAND, REMOTE_COMMAND):
        for name in COMMAND_FIELDS:
            value = _get(props, name)
            if isinstance(value, str):
                fields.append((name, value))
    elif resource_type == S3_OBJECT:
        # A node's release bundle: every file it runs, readable by whoever reads the bucket.
        value = _get(props, "content")
        if isinstance(value, str):
            fields += _bundle_fields(value)
    for where, container in _containers(resource_type, props):
        for kind in ("command", "args"):
            items = [str(x) for x in _items(_get(container, kind)) if isinstance(x, str)]
            if items:
                fields.append((f"{where}.{kind}", "\n".join(items)))
        for i, env in enumerate(_items(_get(container, "env"))):
            if _is_map(env) and isinstance(_get(env, "value"), str):
                fields.append((f"{where}.env[{i}]", f"{_get(env, 'name', default='')}={_get(env, 'value')}"))
    return fields


#: This project's package: a bundle file that is a verbatim copy of its source (the verification
#: suite a node runs against itself) is reviewed code, not stack input.
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "kimi_fleet")


def _project_source(path: str, content: str) -> bool:
    head, sep, relative = path.partition("/kimi_fleet/")
    if not sep or ".." in relative.split("/"):
        return False
    source = os.path.join(_PACKAGE_DIR, *relative.split("/"))
    try:
        with open(source, encoding="utf-8") as stream:
            return stream.read() == content
    except OSError:
        return False


def _bundle_fields(value: str) -> list[tuple[str, str]]:
    """A release bundle ({"files": [{path, content}]}) file by file; any other object whole."""
    try:
        import json

        files = json.loads(value).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, list):
        return [("content", value.replace("\\n", "\n"))]
    fields = []
    for entry in files:
        path, content = str(entry.get("path", "?")), entry.get("content")
        if isinstance(content, str) and not _project_source(path, content):
            fields.append((f"content {path}", content))
    return fields


def _verbatim_hits(fields: list[tuple[str, str]], secrets: list[str]) -> list[str]:
    messages = []
    for label, text in fields:
        for index, secret in enumerate(secrets):
            if len(secret) >= MIN_SECRET_LENGTH and secret in text:
                messages.append(f"{label} contains secretValues[{index}] verbatim: pass secrets by "
                                "reference (SSM Parameter Store, Secrets Manager, a Kubernetes Secret).")
    return messages


def _secret_values(props: Mapping) -> list[str]:
    return [v for v in _items(_get(props, "secretValues")) if isinstance(v, str)]


def validate_no_secrets_in_user_data(resource_type: str, props: Mapping) -> list[str]:
    """No secrets in EC2 user data / launch templates / command scripts / container specs, and a
    component's `secretValues` never appear verbatim in its other props."""
    messages = []
    for label, text in _scan_fields(resource_type, props):
        for number, what in find_secret_patterns(text):
            messages.append(
                f"{label} line {number} contains {what}: user data is readable by anyone who can "
                "describe the instance; fetch it at boot (e.g. $(aws ssm get-parameter "
                "--with-decryption ...)) or mount a Secret."
            )
    for where, container in _containers(resource_type, props):
        for i, env in enumerate(_items(_get(container, "env"))):
            if not _is_map(env):
                continue
            name, value = str(_get(env, "name", default="")), _get(env, "value")
            if _SECRET_NAME_FULL.match(name) and isinstance(value, str) and _is_literal(value):
                messages.append(f"{where}.env[{i}] {name} has a literal value: use valueFrom.secretKeyRef.")
    secrets = _secret_values(props)
    if secrets:
        others = [(label, text) for key in props if key != "secretValues"
                  for label, text in _string_leaves(props[key], str(key))]
        others += _scan_fields(resource_type, props)
        messages += _verbatim_hits(others, secrets)
    return sorted(set(messages), key=messages.index)


# --------------------------------------------------------------------------------------------
# hourly-cost-within-budget (advisory)
# --------------------------------------------------------------------------------------------
def validate_hourly_cost_within_budget(resource_type: str, props: Mapping) -> list[str]:
    """The fleet's estimated hourly cost stays within the stack's hourly budget."""
    if resource_type != FLEET:
        return []
    cost, budget = _get(props, "hourlyCostUsd"), _get(props, "budgetPerHourUsd")
    if not isinstance(cost, (int, float)) or not isinstance(budget, (int, float)):
        return []
    if isinstance(cost, bool) or isinstance(budget, bool):
        return []
    if cost > budget:
        return [f"estimated fleet cost ${cost:,.2f}/h exceeds the budget ${budget:,.2f}/h "
                f"(+${cost - budget:,.2f}/h, ~${(cost - budget) * 730:,.0f}/month)."]
    return []


# --------------------------------------------------------------------------------------------
# Registry and offline runner
# --------------------------------------------------------------------------------------------
#: Launch template versions that never change: a new template version never reaches the nodes.
FROZEN_TEMPLATE_VERSIONS = ("$Latest", "$Default")


def _template_versions(props: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if _is_map(props):
        for key, value in props.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "version" and "aunchTemplate" in path:
                yield where, value
            else:
                yield from _template_versions(value, where)
    elif _is_seq(props):
        for index, value in enumerate(props):
            yield from _template_versions(value, f"{path}[{index}]")


def validate_changes_reach_nodes(resource_type: str, props: Mapping) -> list[str]:
    """An instance or Auto Scaling group pinned to "$Latest"/"$Default" of its launch template keeps
    its old nodes when the template changes (a new engine, flag or key is "deployed" and nothing
    changes): use the template's latest version number. A group's refresh is not the provider's
    (its auto-rollback relaunches the new version, terraform-provider-aws #34189): the fleet gate
    starts it with the new version as desired configuration (scripts/await_fleet_release.py)."""
    if resource_type not in (EC2_INSTANCE, AUTOSCALING_GROUP):
        return []
    messages = [f"{where} is {value!r}: a changed launch template never reaches the running "
                "node(s); use the template's latest_version" for where, value in _template_versions(props)
                if value in FROZEN_TEMPLATE_VERSIONS]
    return messages


#: S3 default encryption that counts (SSE-S3, SSE-KMS, DSSE-KMS).
SSE_ALGORITHMS = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})
PUBLIC_ACCESS_BLOCKS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")


def validate_buckets_private_and_encrypted(resource_type: str, props: Mapping) -> list[str]:
    """A weights mirror holds 595 GB the stack pays for and nodes trust: its bucket is encrypted by
    default and blocks every kind of public access (so does any public-access block declared)."""
    if resource_type == S3_PUBLIC_ACCESS_BLOCK:
        open_ = [name for name in PUBLIC_ACCESS_BLOCKS if _get(props, name) is not True]
        return [f"public access block leaves {', '.join(open_)} off: the bucket could be made public"] if open_ else []
    if resource_type == S3_ENCRYPTION:
        algorithms = {_get(rule, "applyServerSideEncryptionByDefault", "sseAlgorithm") for rule in _items(_get(props, "rules"))}
        return [] if algorithms & SSE_ALGORITHMS else [f"default encryption {sorted(map(str, algorithms))}: "
                                                         f"use one of {sorted(SSE_ALGORITHMS)}"]
    if resource_type != WEIGHTS_MIRROR:
        return []
    facts = _get(props, "mirror") or {}
    bucket = _get(facts, "bucket", default="?")
    if not _get(facts, "created"):
        # Adopted: another stack declares it; the fill's wait checks the live bucket before any node.
        return [] if _get(facts, "liveCheckBeforeNodes") is True else [
            f"adopted mirror bucket {bucket} is used without checking its encryption and public access"]
    messages = []
    if _get(facts, "encryption") not in SSE_ALGORITHMS:
        messages.append(f"mirror bucket {bucket} has no default encryption ({_get(facts, 'encryption')!r})")
    block = _get(facts, "publicAccessBlock") or {}
    open_ = [name for name in PUBLIC_ACCESS_BLOCKS if _get(block, name) is not True]
    if open_:
        messages.append(f"mirror bucket {bucket} allows public access: {', '.join(open_)} not set")
    if not _int(_get(facts, "abortIncompleteUploadsDays")):
        messages.append(f"mirror bucket {bucket} keeps incomplete multipart uploads (billed) forever")
    return messages


#: The weights volume's tag for a stack that accepts its replacement (components/weight_volume.py).
ALLOW_VOLUME_REPLACEMENT_TAG = "kimi-fleet:allow-volume-replacement"


def validate_weights_volume_protected(resource_type: str, props: Mapping, options: Mapping | None = None) -> list[str]:
    """An EBS volume (here always the weights volume) is `protect`ed: Pulumi then refuses any plan
    that would replace or delete it, so a change of its zone or encryption cannot silently throw
    away ~595 GB of verified weights. A stack opts out with weights.allowVolumeReplacement (the tag)."""
    if resource_type != EBS_VOLUME:
        return []
    protect = (options or {}).get("protect")
    if _tags(props).get(ALLOW_VOLUME_REPLACEMENT_TAG) == "true" or protect is True:
        return []
    return [f"EBS volume is not protected (protect={protect!r}): a change that replaces it "
            "(zone, encryption, snapshot) would delete the verified weights and download them again; protect it "
            "or set weights.allowVolumeReplacement: true to accept that"]


Validator = Callable[..., list]


class PolicySpec(NamedTuple):
    name: str
    description: str
    validator: Validator
    #: the validator also takes the resource's options ({"protect": bool, "ignoreChanges": [...]})
    reads_options: bool = False


MANDATORY: tuple[PolicySpec, ...] = (
    PolicySpec("engine-port-not-exposed",
               "Engine (8000-8100, 30000-30100) and metrics ports are never opened by security groups "
               "or NodePort/LoadBalancer Services; only 80/443 face the Internet; SSH only from "
               "specific CIDRs.", validate_engine_port_not_exposed),
    PolicySpec("proxy-requires-key",
               "The Caddy proxy (its registered facts, held against Caddy's own adaptation in tests) has "
               "`admin off`, rejects requests without the Bearer key with 401 before reaching any upstream, "
               "proxies only to loopback (or allowed cluster Services) and serves at most one runtime file "
               "without the key.",
               validate_proxy_requires_key),
    PolicySpec("pinned-images-and-revision",
               "Engine and workload container images have a release tag or digest (no latest/"
               "nightly/main/dev) and the model revision is a 40-hex commit.",
               validate_pinned_images_and_revision),
    PolicySpec("interactive-not-spot-only",
               "Interactive capacity keeps at least one on-demand replica under spot.",
               validate_interactive_not_spot_only),
    PolicySpec("changes-reach-nodes",
               "Instances and Auto Scaling groups follow their launch template's latest version "
               "number (never $Latest/$Default); a group's refresh is started by the fleet gate.",
               validate_changes_reach_nodes),
    PolicySpec("buckets-private-and-encrypted",
               "The managed weights mirror's bucket has default encryption, blocks all public access and "
               "aborts incomplete uploads (an adopted one is checked live before any node); no declared "
               "public-access block leaves a setting off.",
               validate_buckets_private_and_encrypted),
    PolicySpec("no-secrets-in-user-data",
               "User data, command scripts and container specs carry no tokens, keys or the stack's "
               "secret values; secrets are fetched at boot or mounted.",
               validate_no_secrets_in_user_data),
    PolicySpec("weights-volume-protected",
               "The EBS weights volume is protected (no plan may replace or delete it) unless the stack sets "
               "weights.allowVolumeReplacement.",
               validate_weights_volume_protected, reads_options=True),
)
ADVISORY: tuple[PolicySpec, ...] = (
    PolicySpec("hourly-cost-within-budget",
               "The fleet's estimated hourly cost is within budgetPerHourUsd.",
               validate_hourly_cost_within_budget),
)
POLICIES: dict[str, PolicySpec] = {spec.name: spec for spec in MANDATORY + ADVISORY}


def enforcement_of(name: str) -> str:
    return "mandatory" if any(spec.name == name for spec in MANDATORY) else "advisory"


def check_resources(resources: list[dict]) -> list[dict]:
    """Run every policy over `resources` ([{"type", "name", "props", "options"}], options as the
    engine's resource options: protect, ignoreChanges) and return violations
    [{"policy", "enforcement", "resource", "message"}] ("mandatory" | "advisory"), in resource
    order. Besides the per-resource checks (what the policy pack does), `secretValues` declared on
    any resource are searched for in every resource's user data / scripts / container specs."""
    violations: list[dict] = []
    all_secrets: list[str] = []
    for resource in resources:
        all_secrets += _secret_values(resource.get("props") or {})
    for resource in resources:
        rtype = resource.get("type", "")
        name = resource.get("name") or resource.get("urn") or "?"
        props = resource.get("props") or {}
        for level, specs in (("mandatory", MANDATORY), ("advisory", ADVISORY)):
            for spec in specs:
                messages = list(spec.validator(rtype, props, resource.get("options") or {}) if spec.reads_options
                                else spec.validator(rtype, props))
                if spec.name == "no-secrets-in-user-data" and all_secrets:
                    for message in _verbatim_hits(_scan_fields(rtype, props), all_secrets):
                        # Indices refer to the stack-wide list here, not the resource's own.
                        message = re.sub(r"secretValues\[\d+\]", "a stack secret value", message)
                        if not any(m.startswith(message.split(" contains ")[0] + " contains secretValues")
                                   for m in messages) and message not in messages:
                            messages.append(message)
                for message in messages:
                    violations.append({"policy": spec.name, "enforcement": level,
                                       "resource": name, "message": message})
    return violations
