"""Scale to zero on Kubernetes (issue 24): the wake front of a batch stack with capacity.scaling.minReplicas 0.
Pure: plain dicts and text, no Pulumi (k8s_manifests places them, components/kubernetes_endpoint.py
declares them).

With no engine pod there is no proxy to take a request and no engine to count it, so nothing would
bring a replica back. The wake front is the pattern of Knative's activator and SkyPilot serve's
always-on controller: a small CPU-only Deployment that is always up, answers while nothing serves
and counts the demand.

- It is selected by the SAME public Service as the engine pods (its pods carry the Service's selector
  labels, k8s_manifests.labels(stack, "engine"), plus ROLE_LABEL), and its readiness is "no engine pod
  is Ready" (pod_scripts/wake_ready.sh: busybox nslookup of READY_SERVICE, a headless Service of the
  scaled Deployment's pods with publishNotReadyAddresses false, which resolves to Ready pods only).
  With any engine Ready it leaves the Service's endpoints; with none it is the only one.
- It is a Caddy (the pod proxy's pinned image) with the pod proxy's site (caddy.render_wake: the same
  name and certificate source, k8s_manifests.proxy_tls; the same key and a rotation's previous key;
  the same promised routes): a promised route with an accepted key gets 503, a short Retry-After
  (RETRY_AFTER_SECONDS) and an OpenAI-shaped error saying the stack's time to ready
  (autoscaling.time_to_ready_terms); a wrong key 401,
  an unknown route 404 (a scan or a wrong key never wakes a GPU).
- The demand is Caddy's own count of those 503s (any promised route: the verification gate waits with
  a GET of the model list, and a release deployed at zero is verified on the replica it wakes), scraped
  by its own PodMonitor (job WAKE_JOB: never mixed with the engines' kimi-proxy series the error alerts
  read) on a port only the cluster's Prometheus reaches. KEDA's `wake` trigger reads it with the engines' running requests.

The trigger and the PodMonitor are k8s_manifests' (wake_trigger, wake_pod_monitor: the ScaledObject
and the monitoring objects are rendered there), with KEDA v2.20.2's semantics they rest on, cited.
"""

from __future__ import annotations

import copy
import hashlib
import json

import yaml

from kimi_fleet import catalog, observability
from kimi_fleet import k8s_manifests as m
from kimi_fleet.autoscaling import ScalingPolicy, scaling_policy
from kimi_fleet.caddy import HTTP_PORT, HTTPS_PORT, PREVIOUS_API_KEY_ENV, WAKE_STATUS, RenderedProxy, render_wake
from kimi_fleet.launch import Launch
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

WAKE = "kimi-wake"
#: The Deployment and its ConfigMap share the name; its series carry job WAKE_JOB (k8s_manifests).
WAKE_CONFIGMAP = WAKE
WAKE_POD_MONITOR = m.WAKE_POD_MONITOR
WAKE_JOB = m.WAKE_JOB
ROLE_LABEL = m.WAKE_ROLE_LABEL
DEMAND_WINDOW = m.WAKE_DEMAND_WINDOW
DEMAND_WINDOW_MINUTES = m.WAKE_DEMAND_WINDOW_SECONDS // 60
#: The headless Service whose DNS name resolves to the Ready engine pods only.
READY_SERVICE = "kimi-engine-ready"
#: The headless Service of every engine pod, Ready or not (publishNotReadyAddresses): with a public
#: certificate the front forwards the CA's HTTP-01 challenges to it, so a waking engine pod (not Ready, not
#: in the public Service) gets its certificate before it is Ready and the front leaves.
ACME_SERVICE = "kimi-engine-acme"
WAKE_INGRESS_POLICY = "kimi-wake-ingress"
WAKE_EGRESS_POLICY = "kimi-wake-egress"
#: Caddy's metrics site on the front's pod IP (9180-9184 are the nodes' and the engine pod's).
WAKE_METRICS_PORT = 9185
WAKE_METRICS_PORT_NAME = m.WAKE_METRICS_PORT_NAME
WAKE_MOUNT = "/etc/kimi-wake"
READY_SCRIPT = "wake_ready.sh"
#: The readiness script's last verdict (an emptyDir: the root file system is read-only).
READY_STATE = "/tmp/wake-ready"
#: Where the image's Caddy keeps its certificates (its XDG_DATA_HOME; an emptyDir here).
CADDY_DATA = "/data"
#: The nobody user: the front binds 80/443 through the pod's ip_unprivileged_port_start sysctl, not as root.
WAKE_USER = 65534
#: busybox nslookup tries a server for up to 5 s, twice: the probe's timeout covers both.
READY_PROBE_PERIOD_SECONDS = 10
READY_PROBE_TIMEOUT_SECONDS = 15
#: The front's Retry-After: short, not the time to ready. The front cannot tell how far a wake has come (20
#: minutes in, the time to ready would still say 22 more), and once an engine pod is Ready the front keeps
#: answering a few requests until its own probe sees it (up to READY_PROBE_PERIOD_SECONDS, plus the
#: endpoints' propagation): a client told the whole time to ready would wait that long for nothing. A client
#: that retries every minute also keeps the wake trigger active all along the wake (shorter than
#: k8s_manifests.WAKE_DEMAND_WINDOW_SECONDS: tests/test_k8s_wake.py); the time to ready goes in the message.
RETRY_AFTER_SECONDS = m.WAKE_RETRY_AFTER_SECONDS
#: What the front asks of the cluster: all a scale-to-zero stack costs at zero.
WAKE_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
#: The pod template's digest of its ConfigMap: a changed Caddyfile or script rolls the front (and only it).
CONFIG_ANNOTATION = "kimi-fleet/wake-config"


#: The front's DNS goes to the cluster's DNS pods only (one peer: that namespace AND those pods).
CLUSTER_DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": catalog.K8S_CLUSTER_DNS_NAMESPACE}},
    "podSelector": {"matchLabels": dict(catalog.K8S_CLUSTER_DNS_POD_LABELS)}}
#: Its HTTP(S) (the CA) to public IPv4 addresses only: not the node's metadata, the API server's in-cluster
#: address or the cluster (a public EKS endpoint is a public address: the front has no token for it).
INTERNET_PEER = {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(catalog.NON_PUBLIC_IPV4_CIDRS)}}


def scales_to_zero(r: Resolved, sizing: Sizing) -> bool:
    policy = scaling_policy(r, sizing)
    return policy is not None and policy.scales_to_zero


pod_labels = m.wake_pod_labels


def ready_service_host(r: Resolved) -> str:
    """The headless Service's name in the cluster's DNS, absolute (the trailing dot: no search list is tried)."""
    return f"{READY_SERVICE}.{r.spec.target.kubernetes.namespace}.svc.{catalog.K8S_CLUSTER_DOMAIN}."


def acme_service_upstream(r: Resolved) -> str:
    """The front's upstream for the CA's challenges: every engine pod's Caddy on port 80 (absolute name)."""
    return f"{ACME_SERVICE}.{r.spec.target.kubernetes.namespace}.svc.{catalog.K8S_CLUSTER_DOMAIN}.:{HTTP_PORT}"


def wake_message(policy: ScalingPolicy) -> str:
    minutes = max(1, round(policy.instance_warmup_seconds / 60))
    return (f"no replica is serving: this batch endpoint scales to zero when idle. This request starts one, "
            f"ready in about {minutes} min; retry after the Retry-After seconds until it serves")


def render_wake_proxy(r: Resolved, sizing: Sizing, launch: Launch, **listen) -> RenderedProxy:
    """The front's Caddyfile: the pod proxy's site (render_pod_proxy's name, TLS, keys and routes)
    answering WAKE_STATUS with Retry-After RETRY_AFTER_SECONDS and the time to ready in its message.
    `listen` overrides where it listens (domain, tls, https_port, http_port, bind_host, metrics_port,
    challenge_upstream: a test on loopback), nothing else. With a public certificate the CA's HTTP-01 challenges go on to the engine pods
    (acme_service_upstream)."""
    policy = scaling_policy(r, sizing)
    if policy is None or not policy.scales_to_zero:
        raise ValueError("the wake front is for a stack that scales to zero (capacity.scaling.minReplicas 0)")
    unknown = set(listen) - {"domain", "tls", "https_port", "http_port", "bind_host", "metrics_port",
                             "challenge_upstream"}
    if unknown:
        raise ValueError(f"render_wake_proxy overrides where the front listens only, not {sorted(unknown)}")
    acme = m.proxy_tls(r) == "acme"
    site = {"domain": r.spec.domain, "tls": m.proxy_tls(r), "metrics_port": WAKE_METRICS_PORT,
            "challenge_upstream": acme_service_upstream(r) if acme else None, **listen}
    return render_wake(
        site.pop("domain"), launch.instances[0].probe.path, retry_after_seconds=RETRY_AFTER_SECONDS,
        message=wake_message(policy), acme_email=r.spec.acme_email,
        previous_key_env=PREVIOUS_API_KEY_ENV if r.spec.api_key_rotation.accept_previous else None, **site,
    )


def ready_probe_command(r: Resolved) -> list[str]:
    """The readiness probe: the headless Service's name and the verdict file; with a public certificate
    also where Caddy keeps it and Caddy's process (PID 1: its command is the container's), which the
    script restarts when the front is alone without one (Caddy's ACME retries back off for hours)."""
    command = ["sh", f"{WAKE_MOUNT}/{READY_SCRIPT}", ready_service_host(r), READY_STATE]
    if m.proxy_tls(r) == "acme":
        command += [f"{CADDY_DATA}/caddy/certificates", r.spec.domain, "1"]
    return command


def _container(r: Resolved) -> dict:
    env = [m._secret_env("KIMI_API_KEY", m.API_KEY_SECRET, m.API_KEY_SECRET_KEY),
           m._secret_env(PREVIOUS_API_KEY_ENV, m.API_KEY_SECRET, m.PREVIOUS_API_KEY_SECRET_KEY, optional=True)]
    return {
        "name": "wake",
        "image": catalog.CADDY_IMAGE,
        "command": ["caddy", "run", "--config", f"{WAKE_MOUNT}/Caddyfile", "--adapter", "caddyfile"],
        "env": env,
        "ports": [{"name": "https", "containerPort": HTTPS_PORT}, {"name": "http", "containerPort": HTTP_PORT},
                  {"name": WAKE_METRICS_PORT_NAME, "containerPort": WAKE_METRICS_PORT}],
        "resources": WAKE_RESOURCES,
        # Not root: 80/443 are bound through the pod's ip_unprivileged_port_start sysctl, with no effective
        # capability. The image's file capability stays in the bounding set only, or its caddy cannot be
        # executed (catalog.CADDY_IMAGE_FILE_CAPABILITIES); no_new_privs keeps a non-root exec from gaining it.
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": WAKE_USER, "runAsGroup": WAKE_USER,
                            "capabilities": {"drop": ["ALL"], "add": list(catalog.CADDY_IMAGE_FILE_CAPABILITIES)}},
        "readinessProbe": {
            "exec": {"command": ready_probe_command(r)},
            "periodSeconds": READY_PROBE_PERIOD_SECONDS, "timeoutSeconds": READY_PROBE_TIMEOUT_SECONDS,
            "successThreshold": 1, "failureThreshold": 1},
        "livenessProbe": {"tcpSocket": {"port": "https"}, "periodSeconds": 20, "failureThreshold": 3},
        "volumeMounts": [{"name": "wake", "mountPath": WAKE_MOUNT, "readOnly": True},
                         {"name": "caddy-data", "mountPath": CADDY_DATA},
                         {"name": "caddy-config", "mountPath": "/config"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def _network_policies(r: Resolved, stack: str) -> list[dict]:
    """In: 80/443 from anywhere (as the engine pods' proxy), the metrics port from the monitoring
    namespace's Prometheus pods only. Out: DNS to the cluster's DNS pods only (the readiness probe, ACME)
    and, with a public certificate, HTTP(S) to public addresses only (the CA: ACME, OCSP) and HTTP to the
    engine pods (the CA's challenges for a waking one); nothing else: no in-cluster address and no token
    for the API server (a public endpoint, as EKS's can be, is a public address), no instance metadata,
    no other pod or Service."""
    ns, selector = r.spec.target.kubernetes.namespace, {"matchLabels": pod_labels(stack)}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": m.prometheus_namespace(r)}},
                  "podSelector": {"matchLabels": dict(m.PROMETHEUS_POD_LABELS)}}
    egress = [{"to": [copy.deepcopy(CLUSTER_DNS_PEER)],
               "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]
    if m.proxy_tls(r) == "acme":
        egress.append({"to": [copy.deepcopy(INTERNET_PEER)],
                       "ports": [{"port": HTTPS_PORT, "protocol": "TCP"}, {"port": HTTP_PORT, "protocol": "TCP"}]})
        # The CA's HTTP-01 challenges, forwarded to a waking engine pod's Caddy: its plain-HTTP port only.
        egress.append({"to": [{"podSelector": {"matchLabels": m.labels(stack, "engine")}}],
                       "ports": [{"port": HTTP_PORT, "protocol": "TCP"}]})
    return [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": m._meta(WAKE_INGRESS_POLICY, ns, stack, "network"),
         "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": [
             {"ports": [{"port": "https", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]},
             {"from": [prometheus], "ports": [{"port": WAKE_METRICS_PORT_NAME, "protocol": "TCP"}]}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": m._meta(WAKE_EGRESS_POLICY, ns, stack, "network"),
         "spec": {"podSelector": selector, "policyTypes": ["Egress"], "egress": egress}},
    ]


def render_wake_objects(r: Resolved, sizing: Sizing, launch: Launch, *, stack: str) -> list[dict]:
    """The front's objects in apply order (none unless the stack scales to zero): its ConfigMap, the
    headless Service of Ready engine pods, with a public certificate the headless Service of all engine
    pods (ACME_SERVICE), its NetworkPolicies, its Deployment. Not in the release's
    digest (a change here restarts no engine pod) and not waited for by the gate (the front is not
    Ready while an engine is)."""
    if not scales_to_zero(r, sizing):
        return []
    if r.multi_node:
        raise ValueError("a multi-node replica does not scale (targets/kubernetes.py refuses it)")
    ns = r.spec.target.kubernetes.namespace
    data = {"Caddyfile": render_wake_proxy(r, sizing, launch).text, READY_SCRIPT: pod_script(READY_SCRIPT)}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    labels = pod_labels(stack)
    engines = {**m.labels(stack, "engine"), "kimi-fleet/capacity-type": m.scaled_market(r)}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": m._meta(WAKE_CONFIGMAP, ns, stack, "wake"),
         "data": data},
        {"apiVersion": "v1", "kind": "Service", "metadata": m._meta(READY_SERVICE, ns, stack, "wake"),
         # Headless, Ready pods only: its name resolves to an address exactly while an engine pod is Ready.
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": False, "selector": engines,
                  "ports": [{"name": "https", "port": HTTPS_PORT, "targetPort": "https", "protocol": "TCP"}]}},
        *([{"apiVersion": "v1", "kind": "Service", "metadata": m._meta(ACME_SERVICE, ns, stack, "wake"),
            # Headless, every engine pod: a waking one answers the CA's challenge it asked for.
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": engines,
                     "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]}}]
          if m.proxy_tls(r) == "acme" else []),
        *_network_policies(r, stack),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": m._meta(WAKE, ns, stack, "wake"),
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             # Its one pod is not Ready while an engine serves: a rolling update would wait for it.
             "strategy": {"type": "Recreate"},
             "template": {
                 "metadata": {"labels": labels, "annotations": {CONFIG_ANNOTATION: digest}},
                 "spec": {
                     "automountServiceAccountToken": False,
                     "enableServiceLinks": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": WAKE_USER, "runAsGroup": WAKE_USER,
                                         "seccompProfile": {"type": "RuntimeDefault"},
                                         # A safe sysctl (kubernetes.io/docs/tasks/administer-cluster/sysctl-cluster)
                                         "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
                     "terminationGracePeriodSeconds": 15,
                     "containers": [_container(r)],
                     "volumes": [{"name": "wake", "configMap": {"name": WAKE_CONFIGMAP}},
                                 {"name": "caddy-data", "emptyDir": {}},
                                 {"name": "caddy-config", "emptyDir": {}},
                                 {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
                 },
             },
         }},
    ]


def plan_lines(r: Resolved, sizing: Sizing) -> list[str]:
    """What scaling from zero means, for the plan."""
    policy = scaling_policy(r, sizing)
    if policy is None or not policy.scales_to_zero:
        return []
    ready = max(1, round(policy.instance_warmup_seconds / 60))
    cpu, memory = WAKE_RESOURCES["requests"]["cpu"], WAKE_RESOURCES["requests"]["memory"]
    return [
        f"at 0 replicas the wake front ({WAKE}, one CPU pod: {cpu} CPU, {memory}) answers the endpoint: a request "
        f"with the key gets {WAKE_STATUS} with Retry-After {RETRY_AFTER_SECONDS} s and a JSON error "
        f"saying it scales from zero, and starts one replica, which serves about {ready} min later (its time "
        "to ready): a client must retry after Retry-After until it serves. A wrong key gets 401 and an unknown "
        "route 404: neither wakes a GPU; a monitor polling with the key keeps a replica up",
        f"at 0 the stack costs the front's CPU pod only; it returns to 0 {policy.scale_in_cooldown_seconds // 60} "
        f"min (KEDA's cooldownPeriod) after the last request queued, running or answered {WAKE_STATUS} by the front",
        "a wake that does not end (the woken pod Pending for capacity or quota, failing, KEDA not acting) fires "
        f"{observability.STUCK_AT_ZERO_ALERT} once the front has answered retries for "
        f"{observability.stuck_at_zero_minutes(policy.instance_warmup_seconds)} min",
    ]


def render_wake_artifacts(r: Resolved, sizing: Sizing, launch: Launch) -> dict[str, str]:
    """File name -> text for build/<stack>/ (none unless the stack scales to zero): the front's objects as
    one YAML, applied after kubernetes.yaml (its key Secret and the engines' Service)."""
    objects = render_wake_objects(r, sizing, launch, stack=r.spec.stack)
    if not objects:
        return {}
    header = [f"# kimi-fleet stack {r.spec.stack}: the wake front of a stack that scales to zero; apply after "
              "kubernetes.yaml (it reads the same API key Secret and joins the Service "
              f"{m.PROXY_SERVICE} while no engine pod is Ready)"]
    documents = yaml.dump_all(objects, Dumper=m._NoAliasDumper, sort_keys=False, width=120)
    return {"kubernetes-wake.yaml": "\n".join(header) + "\n" + documents}
