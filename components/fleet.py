"""Fleet: one stack's endpoint, whatever the target, with its release, capacity policy and gate.

Picks the target component (AWS, Kubernetes, existing host), records the engine release and the
capacity policy for the policy pack, generates the API key when the stack gives none, and wires
the post-deploy verification after the endpoint exists.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import pulumi
import pulumi_random as random

from components.aws_endpoint import AwsEndpoint, AwsEndpointArgs
from components.capacity_policy import CapacityPolicy, CapacityPolicyArgs
from components.endpoint_outputs import TargetSecrets
from components.engine_release import EngineRelease, EngineReleaseArgs
from components.host_endpoint import HostEndpoint, HostEndpointArgs
from components.kubernetes_endpoint import KubernetesEndpoint, KubernetesEndpointArgs
from components.verification_gate import VerificationGate, VerificationGateArgs, k8s_rollout_wait_seconds
from kimi_fleet import health, k8s_manifests
from kimi_fleet.cost import Cost
from kimi_fleet.launch import Launch
from kimi_fleet.node_files import ADMISSION_DEADLINE_SECONDS, drain_timeout_seconds
from kimi_fleet.release import stack_release
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing, verification_concurrency

ENDPOINTS = {
    "aws": (AwsEndpoint, AwsEndpointArgs),
    "kubernetes": (KubernetesEndpoint, KubernetesEndpointArgs),
    "host": (HostEndpoint, HostEndpointArgs),
}
#: 48 letters and digits: no character Caddy's header matcher treats as a wildcard.
API_KEY_LENGTH = 48
#: Hex digits of a key's published fingerprint: enough to tell keys apart.
FINGERPRINT_HEX_DIGITS = 8


def api_key_fingerprint(salt: str, key: str) -> str:
    """HMAC-SHA-256 under the stack's own secret salt: the output tells keys apart, but nobody
    without the state can test guesses at a chosen key against it."""
    return "hmac-sha256:" + hmac.new(salt.encode(), key.encode(), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_DIGITS]


def generated_api_keys(name: str, generation: int, opts: pulumi.ResourceOptions
                       ) -> tuple[pulumi.Output[str], pulumi.Output[str] | None]:
    """The generated key of `generation` and the one before it (None at generation 0).

    Two slots take turns: slot A holds the even generations, slot B the odd ones. Bumping the
    generation regenerates only the slot it lands on (its keepers change), so the other slot still
    holds the previous key, straight from state. Slot A is the original resource with no keepers
    at generation 0: a stack that never rotates keeps its key."""
    def slot(resource_name: str, slot_generation: int) -> pulumi.Output[str]:
        keepers = {"generation": str(slot_generation)} if slot_generation else None
        return pulumi.Output.secret(random.RandomPassword(
            resource_name, length=API_KEY_LENGTH, special=False, keepers=keepers, opts=opts).result)

    even = generation - generation % 2
    slot_a = slot(f"{name}-api-key", even)
    if generation == 0:
        return slot_a, None
    slot_b = slot(f"{name}-api-key-b", generation if generation % 2 else generation - 1)
    return (slot_b, slot_a) if generation % 2 else (slot_a, slot_b)


def _aws_rollout_seconds(r: Resolved, sizing: Sizing) -> int:
    """An AWS fleet's instance refresh: every replica it may have (a scaling fleet may be at the top of
    its range when the release lands) replaced one after another, and each old replica may hold its
    termination in the drain hook for up to the drain timeout (every fleet has the hook)."""
    capacity = r.spec.capacity
    seconds = health.fleet_rollout_seconds(health.windows(
        sizing, verification_seconds=ADMISSION_DEADLINE_SECONDS, fleet=True), capacity.most_replicas)
    return seconds + capacity.most_replicas * (drain_timeout_seconds(r, sizing) or 0)


@dataclass
class FleetArgs:
    resolved: Resolved
    sizing: Sizing
    launch: Launch
    cost: Cost
    api_key: pulumi.Input[str] | None = None
    #: the secret kimi-fleet:apiKeyPrevious: with a chosen key, the one a rotation still accepts
    previous_api_key: pulumi.Input[str] | None = None
    hf_token: pulumi.Input[str] | None = None
    target_secrets: TargetSecrets = field(default_factory=TargetSecrets)


class Fleet(pulumi.ComponentResource):
    endpoint_url: pulumi.Output[str]
    openai_base_url: pulumi.Output[str]
    api_key: pulumi.Output[str]
    node_ids: pulumi.Output[list[str]]
    market: pulumi.Output[str]
    hourly_cost_usd: pulumi.Output[float | None]
    dns: pulumi.Output[str]
    release: pulumi.Output[str]
    verification: pulumi.Output[str]
    time_to_ready_measured: pulumi.Output[str | None]
    throughput_measured: pulumi.Output[str | None]
    #: Where to look (issue 24): the dashboard's console page (AWS; None where the target has none)
    #: and where the metrics are (cloudwatch://, podmonitor://, or a host's private scrape URL); the
    #: SNS topic an AWS stack's alarms notify (None elsewhere).
    dashboard_url: pulumi.Output[str | None]
    metrics_location: pulumi.Output[str | None]
    alarm_topic_arn: pulumi.Output[str | None]
    #: a host's scrape-endpoint key, a secret (None where the target has no scrape endpoint)
    metrics_key: pulumi.Output[str | None]

    def __init__(self, name: str, args: FleetArgs, opts: pulumi.ResourceOptions | None = None):
        r, spec = args.resolved, args.resolved.spec
        props = {
            "stack": spec.stack,
            "target": spec.target.kind,
            # The policy pack's budget check: a scaling stack may cost the top of its range every hour.
            "hourlyCostUsd": (args.cost.scaling_range["high_usd_per_hour"] if args.cost.scaling_range
                              else args.cost.fleet_usd_per_hour),
            "budgetPerHourUsd": spec.budget_per_hour_usd,
        }
        super().__init__("kimi-fleet:fleet:Fleet", name, props, opts)
        child = pulumi.ResourceOptions(parent=self)

        rotation = spec.api_key_rotation
        previous_key: pulumi.Input[str] | None = None
        if args.api_key is None:
            current, previous = generated_api_keys(name, rotation.generation, child)
            self.api_key = current
            if rotation.accept_previous:
                previous_key = previous
        else:
            self.api_key = pulumi.Output.secret(args.api_key)
            if rotation.accept_previous:
                previous_key = pulumi.Output.secret(args.previous_api_key)
        #: a non-secret fingerprint of the key clients must use: `pulumi preview` shows a rotation
        salt = random.RandomPassword(f"{name}-api-key-fingerprint-salt", length=32, special=False, opts=child)
        self.api_key_fingerprint = pulumi.Output.unsecret(pulumi.Output.all(salt.result, self.api_key).apply(
            lambda values: api_key_fingerprint(*values)))

        release = EngineRelease(f"{name}-release", EngineReleaseArgs(
            engine=spec.engine.name,
            image=args.launch.image,
            repo=r.repo,
            revision=r.revision,
            served_name=spec.model.served_name,
            commands=[list(i.argv) for i in args.launch.instances],
        ), child)
        CapacityPolicy(f"{name}-capacity", CapacityPolicyArgs(
            workload=spec.capacity.workload,
            market=spec.capacity.effective_market,
            replicas=spec.capacity.replicas,
            on_demand_base=spec.capacity.effective_on_demand_base,
            max_spot_price_usd=spec.capacity.max_spot_price_usd,
        ), child)

        release_id = stack_release(r, args.sizing, args.launch)
        #: what every proxied answer carries in X-Kimi-Fleet-Release once the rollout is done
        self.release = pulumi.Output.from_input(release_id)
        endpoint_class, endpoint_args = ENDPOINTS[spec.target.kind]
        endpoint = endpoint_class(
            f"{name}-{spec.target.kind}",
            endpoint_args(r, args.sizing, args.launch, self.api_key, args.hf_token, args.target_secrets,
                          previous_key),
            pulumi.ResourceOptions(parent=self, depends_on=[release]),
        )
        self.endpoint_url = endpoint.endpoint_url
        self.openai_base_url = endpoint.openai_base_url
        self.node_ids = endpoint.node_ids
        self.market = endpoint.market
        self.hourly_cost_usd = endpoint.hourly_cost_usd
        # Each endpoint says where its dashboard and metrics are (the contract's attributes).
        self.dashboard_url = pulumi.Output.from_input(getattr(endpoint, "dashboard_url", None))
        self.metrics_location = pulumi.Output.from_input(getattr(endpoint, "metrics_location", None))
        self.alarm_topic_arn = pulumi.Output.from_input(getattr(endpoint, "alarm_topic_arn", None))
        key = getattr(endpoint, "metrics_key", None)
        self.metrics_key = pulumi.Output.secret(key) if key is not None else pulumi.Output.from_input(None)
        # AWS says which record it made (or what to create by hand); other targets name their mechanism.
        self.dns = getattr(endpoint, "dns_record", None) or pulumi.Output.from_input(
            args.resolved.target.dns_mechanism(spec))

        if spec.verification.enabled:
            ready_timeout = args.sizing.cold_start_seconds * 2
            gate = VerificationGate(f"{name}-gate", VerificationGateArgs(
                stack=spec.stack,
                base_url=endpoint.openai_base_url,
                api_key=self.api_key,
                previous_api_key=previous_key,
                model=spec.model.served_name,
                engine=spec.engine.name,
                engine_release=r.image_entry.package_version if r.image_entry else None,
                ready_timeout_seconds=ready_timeout,
                request_timeout_seconds=spec.verification.timeout_seconds,
                context_tokens=spec.context_length,
                concurrency=verification_concurrency(args.sizing, spec.capacity.replicas),
                checks=list(spec.verification.checks),
                load=spec.verification.load,
                usd_per_hour=args.cost.fleet_usd_per_hour,
                release=release_id,
                replicas=spec.capacity.replicas,
                fleet_rollout=getattr(endpoint, "fleet_rollout", None),
                compile_cache_promotion=getattr(endpoint, "compile_cache_promotion", None),
                # kubectl on the deployer's machine uses the stack's kubeconfig, as the provider does.
                kubeconfig=args.target_secrets.kubeconfig if r.target.renders_manifests else None,
                # An instance refresh replaces the replicas one after another, each its launch and its
                # whole grace period (the refresh's warm-up): shorter, and every good release rolls back.
                rollout_timeout_seconds=(
                    k8s_rollout_wait_seconds(k8s_manifests.rollout_wait(r, args.sizing))
                    if r.target.renders_manifests else _aws_rollout_seconds(r, args.sizing)),
                # A new release, new nodes or a rotated key: verify again.
                triggers=[endpoint.node_ids, release_id, self.api_key],
            ), pulumi.ResourceOptions(parent=self, depends_on=[endpoint]))
            self.verification = gate.summary
            self.time_to_ready_measured = gate.time_to_ready_measured
            self.throughput_measured = gate.throughput_measured
        else:
            self.verification = pulumi.Output.from_input("disabled by verification.enabled: false")
            self.time_to_ready_measured = pulumi.Output.from_input(None)
            self.throughput_measured = pulumi.Output.from_input(None)

        self.register_outputs({
            "endpoint_url": self.endpoint_url,
            "openai_base_url": self.openai_base_url,
            "node_ids": self.node_ids,
            "market": self.market,
            "hourly_cost_usd": self.hourly_cost_usd,
            "dns": self.dns,
            "release": self.release,
            "time_to_ready_measured": self.time_to_ready_measured,
            "throughput_measured": self.throughput_measured,
            "verification": self.verification,
            "api_key_fingerprint": self.api_key_fingerprint,
            "dashboard_url": self.dashboard_url,
            "metrics_location": self.metrics_location,
            "alarm_topic_arn": self.alarm_topic_arn,
            "metrics_key": self.metrics_key,
        })
