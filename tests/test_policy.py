"""The kimi-fleet-safety policy pack: pure validators (policy/validators.py), the offline runner
`check_resources`, and the pack wiring (policy/__main__.py) under the pulumi-policy SDK."""

from __future__ import annotations

import base64
import gzip
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from policy import validators as v  # noqa: E402

HF_TOKEN = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG"
PINNED_VLLM = "vllm/vllm-openai:v0.11.0"
REVISION = "0123456789abcdef0123456789abcdef01234567"



def sg(*rules):
    return v.validate_engine_port_not_exposed(v.SECURITY_GROUP, {"ingress": list(rules)})


def rule(from_port, to_port, protocol="tcp", cidrs=None, ipv6=None, **extra):
    item = {"fromPort": from_port, "toPort": to_port, "protocol": protocol}
    if cidrs is not None:
        item["cidrBlocks"] = cidrs
    if ipv6 is not None:
        item["ipv6CidrBlocks"] = ipv6
    item.update(extra)
    return item


# ------------------------------------------------------------------ engine-port-not-exposed
class TestEnginePortNotExposed:
    def test_https_and_http_to_world_ok(self):
        assert sg(rule(443, 443, cidrs=["0.0.0.0/0"], ipv6=["::/0"]), rule(80, 80, cidrs=["0.0.0.0/0"])) == []

    def test_quic_udp_443_to_world_ok(self):
        assert sg(rule(443, 443, "udp", cidrs=["0.0.0.0/0"])) == []

    def test_ssh_to_allowlist_ok(self):
        assert sg(rule(22, 22, cidrs=["203.0.113.7/32", "10.0.0.0/8"])) == []

    def test_ssh_world_open_violates(self):
        messages = sg(rule(22, 22, cidrs=["0.0.0.0/0"]))
        assert len(messages) == 1 and "SSH" in messages[0]

    def test_sglang_port_open_violates_even_to_a_private_cidr(self):
        messages = sg(rule(30000, 30000, cidrs=["10.0.0.0/16"]))
        assert len(messages) == 1 and "30000" in messages[0]

    def test_vllm_port_to_world_violates_twice(self):
        messages = sg(rule(8000, 8000, cidrs=["0.0.0.0/0"]))
        assert len(messages) == 2  # engine port, and non-80/443 to the Internet

    def test_extra_engine_port_violates(self):
        assert sg(rule(30001, 30001, cidrs=["192.168.1.0/24"]))

    def test_full_range_violates(self):
        messages = sg(rule(0, 65535, cidrs=["0.0.0.0/0"]))
        assert any("8000-8100" in m for m in messages) and any("30000-30100" in m for m in messages)
        assert any("SSH" in m for m in messages)

    def test_protocol_all_violates_regardless_of_ports(self):
        assert sg(rule(0, 0, protocol="-1", cidrs=["172.16.0.0/12"]))

    def test_ipv6_world_violates(self):
        messages = sg(rule(30000, 30000, ipv6=["::/0"]))
        assert len(messages) == 2 and all("::/0" in m for m in messages)

    def test_range_covering_engine_port_violates(self):
        assert sg(rule(7000, 9000, cidrs=["10.0.0.0/8"]))

    def test_floats_from_the_engine_are_ports(self):
        assert sg(rule(8000.0, 8000.0, cidrs=["10.0.0.0/8"]))

    def test_metrics_port_violates(self):
        assert sg(rule(9400, 9400, cidrs=["10.0.0.0/8"]))

    def test_all_traffic_from_the_group_itself_ok(self):
        # EFA/NCCL: all traffic between members of the same group.
        assert sg(rule(0, 0, protocol="-1", self=True)) == []

    def test_engine_port_from_another_group_violates(self):
        assert sg(rule(8000, 8000, securityGroups=["sg-0123"]))

    def test_vpc_ingress_rule(self):
        t = v.SG_INGRESS_RULE
        assert v.validate_engine_port_not_exposed(t, {"ipProtocol": "tcp", "fromPort": 443, "toPort": 443,
                                                      "cidrIpv4": "0.0.0.0/0"}) == []
        assert v.validate_engine_port_not_exposed(t, {"ipProtocol": "tcp", "fromPort": 30000, "toPort": 30000,
                                                      "cidrIpv6": "::/0"})
        assert v.validate_engine_port_not_exposed(t, {"ipProtocol": "-1", "cidrIpv4": "10.0.0.0/16"})
        assert v.validate_engine_port_not_exposed(t, {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22,
                                                      "cidrIpv4": "0.0.0.0/0"})
        assert v.validate_engine_port_not_exposed(t, {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22,
                                                      "cidrIpv4": "198.51.100.0/24"}) == []

    def test_security_group_rule(self):
        t = v.SECURITY_GROUP_RULE
        assert v.validate_engine_port_not_exposed(t, {"type": "ingress", "protocol": "tcp", "fromPort": 8000,
                                                      "toPort": 8000, "cidrBlocks": ["10.0.0.0/8"]})
        assert v.validate_engine_port_not_exposed(t, {"type": "egress", "protocol": "-1", "fromPort": 0,
                                                      "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}) == []

    def test_nodeport_service_on_engine_port_violates(self):
        props = {"spec": {"type": "NodePort", "ports": [{"port": 8000, "targetPort": 8000, "nodePort": 30080}]}}
        messages = v.validate_engine_port_not_exposed(v.K8S_SERVICE, props)
        assert messages and "ClusterIP" in messages[0]

    def test_loadbalancer_targeting_engine_port_violates(self):
        props = {"spec": {"type": "LoadBalancer", "ports": [{"port": 443, "targetPort": 30000}]}}
        assert v.validate_engine_port_not_exposed(v.K8S_SERVICE, props)

    def test_clusterip_engine_service_ok(self):
        props = {"spec": {"type": "ClusterIP", "ports": [{"port": 8000, "targetPort": 8000}]}}
        assert v.validate_engine_port_not_exposed(v.K8S_SERVICE, props) == []
        assert v.validate_engine_port_not_exposed(v.K8S_SERVICE, {"spec": {"ports": [{"port": 8000}]}}) == []

    def test_proxy_loadbalancer_on_443_ok(self):
        props = {"spec": {"type": "LoadBalancer", "ports": [{"port": 443, "targetPort": 8443}, {"port": 80}]}}
        assert v.validate_engine_port_not_exposed(v.K8S_SERVICE, props) == []

    def test_unrelated_resource_ignored(self):
        assert v.validate_engine_port_not_exposed("aws:s3/bucket:Bucket", {"ingress": [rule(0, 65535)]}) == []


# ------------------------------------------------------------------ proxy-requires-key
def good_proxy() -> dict:
    from kimi_fleet.caddy import render_proxy

    return render_proxy("kimi.example.com", ["127.0.0.1:8000", "127.0.0.1:8001"], "/health", local_port=9180,
                        ready_port=9181, ready_file="/run/kimi-fleet/ready",
                        status_file="/run/kimi-fleet/status.json").facts


class TestProxyRequiresKey:
    @staticmethod
    def check(proxy, **extra):
        return v.validate_proxy_requires_key(v.AUTH_PROXY, {"proxy": proxy, **extra})

    def test_the_rendered_proxy_passes(self):
        assert self.check(good_proxy()) == []

    def test_admin_api_on_violates(self):
        proxy = {**good_proxy(), "adminOff": False}
        (message,) = self.check(proxy)
        assert "admin off" in message

    def test_a_site_that_proxies_without_the_key_violates(self):
        proxy = good_proxy()
        proxy["sites"][0]["keyRequired"] = False
        assert any("without requiring the Bearer key" in m for m in self.check(proxy))
        proxy = good_proxy()
        proxy["sites"][1]["keyEnv"] = None  # a key from nowhere is no key
        assert any("without requiring the Bearer key" in m for m in self.check(proxy))

    def test_a_site_that_proxies_every_route_violates(self):
        proxy = good_proxy()
        proxy["sites"][0]["proxiedRoutes"] = []
        (message,) = self.check(proxy)
        assert "proxies every route" in message and "engine's controls" in message

    def test_lan_upstream_violates(self):
        proxy = good_proxy()
        proxy["sites"][0]["upstreams"] = ["192.168.1.20:8000"]
        (message,) = self.check(proxy)
        assert "192.168.1.20:8000" in message

    def test_cluster_service_upstream_needs_allowlist(self):
        proxy = good_proxy()
        proxy["sites"] = proxy["sites"][:1]
        proxy["sites"][0]["upstreams"] = ["kimi-engine.kimi.svc:8000"]
        assert self.check(proxy)
        assert self.check(proxy, allowedUpstreams=["kimi-engine.kimi.svc:8000"]) == []

    @pytest.mark.parametrize("edit", [
        lambda site: site["routes"][0].update(servesFile="/etc/kimi-fleet/node.env"),  # configuration
        lambda site: site["routes"][0].update(servesFile=None),  # a directory, or anything
        lambda site: site.update(upstreams=["127.0.0.1:8000"]),  # a keyless site that proxies
    ])
    def test_a_keyless_route_serves_one_runtime_file_only(self, edit):
        proxy = good_proxy()
        edit(proxy["sites"][2])
        assert self.check(proxy)

    def test_a_keyless_route_on_a_keyed_site_violates(self):
        proxy = good_proxy()
        proxy["sites"][0]["routes"][0]["keyRequired"] = False
        proxy["sites"][0]["routes"][0]["servesFile"] = "/run/kimi-fleet/status.json"
        assert any("serves without the key" in m for m in self.check(proxy))

    @staticmethod
    def host_proxy() -> dict:
        """A host's proxy: the tenants' sites plus its scrape endpoint and Caddy's loopback metrics site."""
        from kimi_fleet.launch import render_launch
        from kimi_fleet.node_files import render_proxy_for
        from kimi_fleet.resolve import Resolved
        from kimi_fleet.stackfile import load_stack_config, stack_file
        host = Resolved(load_stack_config(stack_file("rtxpro6000-int4-sglang")).spec())
        return render_proxy_for(host, render_launch(host), release="0123456789abcdef").facts

    def test_a_hosts_scrape_and_metrics_sites_are_held_to_the_same_rules(self):
        proxy = self.host_proxy()
        assert "scrapeSite" in proxy and "metricsSite" in proxy
        assert self.check(proxy) == []
        keyless = self.host_proxy()
        keyless["scrapeSite"]["keyRequired"] = False
        assert any("without requiring the Bearer key" in m for m in self.check(keyless))
        lan = self.host_proxy()
        lan["scrapeSite"]["upstreams"] = ["10.0.0.5:9400"]
        assert any("10.0.0.5:9400" in m for m in self.check(lan))
        public_metrics = self.host_proxy()
        public_metrics["metricsSite"]["bind"] = "0.0.0.0"
        assert any("metrics site" in m for m in self.check(public_metrics))

    def test_missing_facts_or_sites_violate(self):
        assert v.validate_proxy_requires_key(v.AUTH_PROXY, {"caddyfile": "x"})
        assert self.check({"adminOff": True, "sites": []})

    def test_other_types_ignored(self):
        assert v.validate_proxy_requires_key("kimi-fleet:engine:EngineRelease", {"proxy": {}}) == []


# ------------------------------------------------------------------ pinned-images-and-revision
class TestPinnedImagesAndRevision:
    @staticmethod
    def release(image, revision=REVISION):
        return v.validate_pinned_images_and_revision(v.ENGINE_RELEASE, {"image": image, "revision": revision})

    def test_pinned_tag_ok(self):
        assert self.release(PINNED_VLLM) == []
        assert self.release("lmsysorg/sglang:v0.5.9-rocm700-mi30x") == []
        assert self.release("registry.example.com:5000/team/vllm:v0.11.0") == []

    def test_digest_ok(self):
        assert self.release("vllm/vllm-openai@sha256:" + "a" * 64) == []
        assert self.release("vllm/vllm-openai:latest@sha256:" + "0" * 64) == []

    def test_latest_violates(self):
        messages = self.release("vllm/vllm-openai:latest")
        assert len(messages) == 1 and "latest" in messages[0]

    @pytest.mark.parametrize("image", ["vllm/vllm-openai", "registry.example.com:5000/vllm",
                                       "lmsysorg/sglang:nightly", "lmsysorg/sglang:dev", "x/y:main",
                                       "vllm/vllm-openai@sha256:abc"])
    def test_unpinned_violates(self, image):
        assert self.release(image)

    @pytest.mark.parametrize("revision", ["main", None, REVISION.upper(), REVISION[:12]])
    def test_revision_must_be_a_commit(self, revision):
        messages = self.release(PINNED_VLLM, revision)
        assert len(messages) == 1 and "revision" in messages[0]

    def test_deployment_containers(self):
        def deployment(image, init="busybox:1.36"):
            return {"spec": {"template": {"spec": {"containers": [{"name": "engine", "image": image}],
                                                   "initContainers": [{"name": "w", "image": init}]}}}}
        t = "kubernetes:apps/v1:Deployment"
        assert v.validate_pinned_images_and_revision(t, deployment(PINNED_VLLM)) == []
        assert v.validate_pinned_images_and_revision(t, deployment("vllm/vllm-openai:latest"))
        assert v.validate_pinned_images_and_revision(t, deployment(PINNED_VLLM, init="busybox"))

    def test_job_and_leaderworkerset(self):
        job = {"spec": {"template": {"spec": {"containers": [{"name": "dl", "image": "python"}]}}}}
        assert v.validate_pinned_images_and_revision("kubernetes:batch/v1:Job", job)
        lws_type = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
        lws = {"spec": {"leaderWorkerTemplate": {
            "leaderTemplate": {"spec": {"containers": [{"name": "leader", "image": PINNED_VLLM}]}},
            "workerTemplate": {"spec": {"containers": [{"name": "worker", "image": "vllm/vllm-openai:nightly"}]}},
        }}}
        messages = v.validate_pinned_images_and_revision(lws_type, lws)
        assert len(messages) == 1 and "workerTemplate" in messages[0]


# ------------------------------------------------------------------ interactive-not-spot-only
class TestInteractiveNotSpotOnly:
    @staticmethod
    def capacity(workload, market, base, replicas=2):
        return v.validate_interactive_not_spot_only(
            v.CAPACITY_POLICY, {"workload": workload, "market": market, "replicas": replicas, "onDemandBase": base})

    def test_interactive_spot_without_base_violates(self):
        assert self.capacity("interactive", "spot", 0)
        assert v.validate_interactive_not_spot_only(v.CAPACITY_POLICY, {"workload": "interactive", "market": "spot"})

    def test_interactive_spot_with_base_ok(self):
        assert self.capacity("interactive", "spot", 1) == []

    def test_batch_spot_ok(self):
        assert self.capacity("batch", "spot", 0) == []

    def test_interactive_on_demand_ok(self):
        assert self.capacity("interactive", "on-demand", 0) == []
        assert self.capacity("interactive", "capacity-block", 0) == []

    def test_spot_instance_tagged_interactive_violates(self):
        props = {"instanceMarketOptions": {"marketType": "spot"}, "tags": {v.WORKLOAD_TAG: "interactive"}}
        assert v.validate_interactive_not_spot_only(v.EC2_INSTANCE, props)
        props["tags"] = {v.WORKLOAD_TAG: "batch"}
        assert v.validate_interactive_not_spot_only(v.EC2_INSTANCE, props) == []

    def test_asg(self):
        def asg(base, above=0, workload="interactive"):
            return {"mixedInstancesPolicy": {"instancesDistribution": {
                "onDemandBaseCapacity": base, "onDemandPercentageAboveBaseCapacity": above}},
                "tags": [{"key": v.WORKLOAD_TAG, "value": workload, "propagateAtLaunch": True}]}
        t = v.AUTOSCALING_GROUP
        assert v.validate_interactive_not_spot_only(t, asg(0))
        assert v.validate_interactive_not_spot_only(t, asg(1)) == []
        assert v.validate_interactive_not_spot_only(t, asg(0, workload="batch")) == []
        assert v.validate_interactive_not_spot_only(t, asg(0, above=100)) == []  # no spot at all


# ------------------------------------------------------------------ no-secrets-in-user-data
class TestNoSecretsInUserData:
    @staticmethod
    def instance(user_data, field="userData", rtype=v.EC2_INSTANCE):
        return v.validate_no_secrets_in_user_data(rtype, {field: user_data})

    def test_plain_hf_token_violates(self):
        messages = self.instance(f"#!/bin/bash\nexport HF_TOKEN={HF_TOKEN}\nhf download moonshotai/Kimi-K2.6\n")
        assert messages and all("line 2" in m for m in messages)
        assert not any(HF_TOKEN in m for m in messages)  # never echo the secret

    def test_base64_hf_token_violates(self):
        encoded = base64.b64encode(f"#!/bin/bash\nhf auth login --token {HF_TOKEN}\n".encode()).decode()
        messages = self.instance(encoded, rtype=v.LAUNCH_TEMPLATE)
        assert messages and "base64-decoded" in messages[0]

    def test_gzip_base64_violates(self):
        encoded = base64.b64encode(gzip.compress(f"HF_TOKEN={HF_TOKEN}\n".encode())).decode()
        assert self.instance(encoded, field="userDataBase64")

    def test_ssm_reference_ok(self):
        script = ("#!/bin/bash\n"
                  'export HF_TOKEN="$(aws ssm get-parameter --name /kimi/hf-token --with-decryption '
                  '--query Parameter.Value --output text)"\n'
                  "export KIMI_API_KEY=${KIMI_API_KEY_FROM_SSM}\n"
                  "HF_TOKEN_FILE=/run/kimi/hf-token\n"
                  "vllm serve moonshotai/Kimi-K2.6 --api-key $KIMI_API_KEY\n")
        assert self.instance(script) == []
        assert self.instance(base64.b64encode(script.encode()).decode(), rtype=v.LAUNCH_TEMPLATE) == []

    @pytest.mark.parametrize("line", [
        "API_KEY=abcdefgh12345678",
        "export KIMI_API_KEY='0123456789abcdef'",
        "OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwxyz0123",
        "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "vllm serve m --api-key s3cr3tvalue",
        "  HF_TOKEN: hf_literal_but_short",
    ])
    def test_secret_shapes_violate(self, line):
        assert self.instance(f"#!/bin/bash\n{line}\n")

    def test_other_types_ignored(self):
        assert v.validate_no_secrets_in_user_data("aws:ssm/parameter:Parameter", {"value": HF_TOKEN}) == []

    def test_command_script_scanned(self):
        assert v.validate_no_secrets_in_user_data(v.REMOTE_COMMAND, {"create": f"echo {HF_TOKEN} > /tmp/t"})

    def test_kubernetes_env_literal_violates(self):
        def deployment(env):
            return {"spec": {"template": {"spec": {"containers": [{"name": "e", "image": PINNED_VLLM,
                                                                   "env": [env]}]}}}}
        t = "kubernetes:apps/v1:Deployment"
        assert v.validate_no_secrets_in_user_data(t, deployment({"name": "HF_TOKEN", "value": "abcdefghijk"}))
        assert v.validate_no_secrets_in_user_data(t, deployment(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}})) == []
        assert v.validate_no_secrets_in_user_data(t, deployment({"name": "HF_HUB_OFFLINE", "value": "1"})) == []

    def test_secret_values_verbatim_in_component_props(self):
        secret = "kimi-key-0123456789"
        props = {"secretValues": [secret], "startupScript": f"echo {secret}"}
        messages = v.validate_no_secrets_in_user_data("kimi-fleet:host:Host", props)
        assert len(messages) == 1 and "startupScript" in messages[0] and secret not in messages[0]
        assert v.validate_no_secrets_in_user_data("kimi-fleet:host:Host", {"secretValues": [secret],
                                                                            "startupScript": "echo ok"}) == []


# ------------------------------------------------------------------ hourly-cost-within-budget
class TestHourlyCost:
    def test_over_budget_is_a_violation(self):
        messages = v.validate_hourly_cost_within_budget(v.FLEET, {"hourlyCostUsd": 126.6, "budgetPerHourUsd": 100.0})
        assert len(messages) == 1 and "$126.60/h" in messages[0]

    @pytest.mark.parametrize("props", [{"hourlyCostUsd": 63.3, "budgetPerHourUsd": 100.0},
                                       {"hourlyCostUsd": 63.3, "budgetPerHourUsd": None},
                                       {"hourlyCostUsd": None, "budgetPerHourUsd": 10.0}, {}])
    def test_within_or_unknown_ok(self, props):
        assert v.validate_hourly_cost_within_budget(v.FLEET, props) == []

    def test_is_advisory(self):
        assert [s.name for s in v.ADVISORY] == ["hourly-cost-within-budget"]
        assert v.enforcement_of("hourly-cost-within-budget") == "advisory"


# ------------------------------------------------------------------ changes-reach-nodes
class TestChangesReachNodes:
    def test_instance_on_latest_violates_and_a_version_number_passes(self):
        props = {"launchTemplate": {"id": "lt-1", "version": "$Latest"}}
        (message,) = v.validate_changes_reach_nodes(v.EC2_INSTANCE, props)
        assert "launchTemplate.version is '$Latest'" in message
        assert v.validate_changes_reach_nodes(v.EC2_INSTANCE, {"launchTemplate": {"id": "lt-1", "version": "7"}}) == []

    def test_group_needs_a_number_and_its_refresh_is_the_gates(self):
        spec = {"mixedInstancesPolicy": {"launchTemplate": {"launchTemplateSpecification": {
            "launchTemplateId": "lt-1", "version": "$Default"}}}}
        (message,) = v.validate_changes_reach_nodes(v.AUTOSCALING_GROUP, spec)
        assert "'$Default'" in message
        spec["mixedInstancesPolicy"]["launchTemplate"]["launchTemplateSpecification"]["version"] = "3"
        # No provider refresh: the fleet gate starts it (scripts/await_fleet_release.py, #34189).
        assert v.validate_changes_reach_nodes(v.AUTOSCALING_GROUP, spec) == []

    def test_other_resources_are_not_read(self):
        assert v.validate_changes_reach_nodes(v.LAUNCH_TEMPLATE, {"version": "$Latest"}) == []


# ------------------------------------------------------------------ registry and check_resources
def test_registry_names():
    assert [s.name for s in v.MANDATORY] == [
        "engine-port-not-exposed", "proxy-requires-key", "pinned-images-and-revision",
        "interactive-not-spot-only", "changes-reach-nodes", "buckets-private-and-encrypted",
        "no-secrets-in-user-data", "weights-volume-protected"]
    for spec in v.MANDATORY + v.ADVISORY:
        assert spec.description and callable(spec.validator)


def test_check_resources_shape_and_cross_resource_secrets():
    secret = "kimi-api-key-0123456789abcdef"
    resources = [
        {"type": v.SECURITY_GROUP, "name": "engine-sg", "props": {"ingress": [rule(443, 443, cidrs=["0.0.0.0/0"])]}},
        {"type": v.ENGINE_RELEASE, "name": "engine", "props": {"image": "vllm/vllm-openai:latest",
                                                                 "revision": REVISION}},
        {"type": v.FLEET, "name": "fleet", "props": {"hourlyCostUsd": 200.0, "budgetPerHourUsd": 100.0}},
        {"type": "kimi-fleet:proxy:AuthProxy", "name": "proxy",
         "props": {"proxy": good_proxy(), "secretValues": [secret]}},
        {"type": v.EC2_INSTANCE, "name": "node-0", "props": {"userData": f"#!/bin/sh\necho '{secret}' > /etc/k\n"}},
    ]
    violations = v.check_resources(resources)
    assert all(set(x) == {"policy", "enforcement", "resource", "message"} for x in violations)
    by = {(x["policy"], x["resource"], x["enforcement"]) for x in violations}
    assert by == {("pinned-images-and-revision", "engine", "mandatory"),
                  ("hourly-cost-within-budget", "fleet", "advisory"),
                  ("no-secrets-in-user-data", "node-0", "mandatory")}
    assert not any(secret in x["message"] for x in violations)
    assert v.check_resources(resources[:1]) == []


# ------------------------------------------------------------------ the pack under the SDK
def _load_pack():
    return runpy.run_path(str(ROOT / "policy" / "__main__.py"), run_name="kimi_fleet_policy_pack_test")


@pytest.mark.timeout(60)  # PolicyPack() would start the analyzer server and block forever
def test_pack_builds_without_serving():
    from pulumi_policy import EnforcementLevel, ResourceValidationPolicy

    module = _load_pack()
    policies = module["POLICIES"]
    assert all(isinstance(p, ResourceValidationPolicy) for p in policies)
    levels = {p.name: p.enforcement_level for p in policies}
    assert levels == {**{s.name: EnforcementLevel.MANDATORY for s in v.MANDATORY},
                      **{s.name: EnforcementLevel.ADVISORY for s in v.ADVISORY}}


def test_pack_reports_through_the_sdk_proxies():
    """The SDK hands validators read-only Mapping/Sequence proxies, not dicts and lists."""
    from pulumi_policy import PolicyCustomTimeouts, PolicyResourceOptions, ResourceValidationArgs
    from pulumi_policy.proxy import unknown_checking_proxy

    policies = {p.name: p for p in _load_pack()["POLICIES"]}
    props = unknown_checking_proxy({"ingress": [rule(30000.0, 30000.0, cidrs=["0.0.0.0/0"])]})
    opts = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])
    args = ResourceValidationArgs(v.SECURITY_GROUP, props, "urn:pulumi:s::p::t::sg", "sg", opts, None)
    reported = []
    policies["engine-port-not-exposed"].validate(args, lambda message, urn=None: reported.append(message))
    assert len(reported) == 2
    reported.clear()
    policies["hourly-cost-within-budget"].validate(args, lambda message, urn=None: reported.append(message))
    assert reported == []


def test_unrelated_resources_never_read_props():
    """Under the SDK, reading an unknown (preview-time) prop raises; policies must not touch the
    props of resource types they do not check."""
    from pulumi_policy.proxy import UNKNOWN_STRING_VALUE as UNKNOWN, unknown_checking_proxy

    props = unknown_checking_proxy({key: UNKNOWN for key in (
        "tags", "ingress", "userData", "spec", "caddyfile", "image", "hourlyCostUsd", "secretValues_")})
    for spec in v.MANDATORY + v.ADVISORY:
        assert spec.validator("aws:s3/bucket:Bucket", props) == []


def test_policy_project_files():
    yaml = pytest.importorskip("yaml")
    project = yaml.safe_load((ROOT / "policy" / "PulumiPolicy.yaml").read_text())
    assert project["runtime"]["name"] == "python"
    requirements = (ROOT / "policy" / "requirements.txt").read_text().split()
    assert "pulumi-policy==1.21.0" in requirements and "pulumi==3.272.0" in requirements
    source = (ROOT / "policy" / "validators.py").read_text()
    assert "import pulumi" not in source and "from pulumi" not in source


# ------------------------------------------------------------------ one pinning rule
@pytest.mark.parametrize("image, pinned", [
    ("vllm/vllm-openai:v0.22.1", True),
    ("lmsysorg/sglang:v0.5.12.post1-cu130", True),
    ("vllm/vllm-openai@sha256:" + "a" * 64, True),
    ("vllm/vllm-openai:latest", False),
    ("vllm/vllm-openai:master", False),
    ("vllm/vllm-openai:stable", False),
    ("vllm/vllm-openai:nightly-2026-11-30", False),
    ("vllm/vllm-openai", False),
    ("registry.example.com:5000/vllm-openai", False),
    ("vllm/vllm-openai@sha256:abc", False),
])
def test_spec_and_policy_agree_on_pinned_images(image, pinned):
    from pydantic import ValidationError

    from kimi_fleet.spec import EngineSpec

    policy = v.validate_pinned_images_and_revision(v.ENGINE_RELEASE, {"image": image, "revision": "a" * 40})
    assert (policy == []) is pinned, policy
    try:
        EngineSpec(name="vllm", image=image)
        spec_accepts = True
    except ValidationError:
        spec_accepts = False
    assert spec_accepts is pinned



def test_a_release_bundle_with_a_secret_in_it_is_refused():
    bundle = json.dumps({"files": [{"path": "/etc/kimi-fleet/engine-0.env", "mode": "0644",
                                    "content": "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789\n"}]})
    messages = v.validate_no_secrets_in_user_data(v.S3_OBJECT, {"content": bundle})
    assert messages and "content" in messages[0]
    clean = json.dumps({"files": [{"path": "/etc/kimi-fleet/node.env", "mode": "0644", "content": "STACK=x\n"}]})
    assert v.validate_no_secrets_in_user_data(v.S3_OBJECT, {"content": clean}) == []


def test_only_verbatim_project_source_in_a_bundle_goes_unscanned():
    """The node's copy of the verification suite is this project's code (its auth check sends wrong
    keys on purpose): skipped only while it is byte-identical to the source; an edited copy is scanned."""
    source = (ROOT / "kimi_fleet" / "verification" / "checks.py").read_text()
    path = "/usr/local/lib/kimi-fleet/verifier/kimi_fleet/verification/checks.py"
    verbatim = json.dumps({"files": [{"path": path, "mode": "0644", "content": source}]})
    assert v.validate_no_secrets_in_user_data(v.S3_OBJECT, {"content": verbatim}) == []
    edited = source + '\nHF_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"\n'
    tampered = json.dumps({"files": [{"path": path, "mode": "0644", "content": edited}]})
    assert v.validate_no_secrets_in_user_data(v.S3_OBJECT, {"content": tampered})
    escaping = json.dumps({"files": [{"path": "/x/kimi_fleet/../../etc/passwd", "mode": "0644",
                                      "content": "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789\n"}]})
    assert v.validate_no_secrets_in_user_data(v.S3_OBJECT, {"content": escaping})


# ------------------------------------------------------------------ the weights volume cannot be replaced silently
VOLUME_PROPS = {"availabilityZone": "us-east-1a", "size": 1000, "tags": {"Name": "s-weights"}}


def test_an_unprotected_weights_volume_is_refused_unless_the_stack_opts_in():
    refused = v.validate_weights_volume_protected(v.EBS_VOLUME, VOLUME_PROPS, {"protect": False})
    assert len(refused) == 1 and "not protected (protect=False)" in refused[0]
    assert "weights.allowVolumeReplacement" in refused[0]
    assert v.validate_weights_volume_protected(v.EBS_VOLUME, VOLUME_PROPS, {"protect": True}) == []
    opted_in = {**VOLUME_PROPS, "tags": {**VOLUME_PROPS["tags"], v.ALLOW_VOLUME_REPLACEMENT_TAG: "true"}}
    assert v.validate_weights_volume_protected(v.EBS_VOLUME, opted_in, {"protect": False}) == []
    # Options unknown (an older caller): refused, never assumed protected.
    assert v.validate_weights_volume_protected(v.EBS_VOLUME, VOLUME_PROPS)
    assert v.validate_weights_volume_protected(v.SECURITY_GROUP, VOLUME_PROPS, {"protect": False}) == []


def test_check_resources_passes_the_options_to_the_volume_policy():
    volume = {"type": v.EBS_VOLUME, "name": "w", "props": VOLUME_PROPS}
    found = v.check_resources([{**volume, "options": {"protect": False}}])
    assert [(x["policy"], x["enforcement"]) for x in found] == [("weights-volume-protected", "mandatory")]
    assert v.check_resources([{**volume, "options": {"protect": True}}]) == []


def test_the_pack_reads_protect_from_the_sdk_options():
    from pulumi_policy import PolicyCustomTimeouts, PolicyResourceOptions, ResourceValidationArgs
    from pulumi_policy.proxy import unknown_checking_proxy

    policy = {p.name: p for p in _load_pack()["POLICIES"]}["weights-volume-protected"]
    for protect, expected in ((False, 1), (True, 0)):
        opts = PolicyResourceOptions(protect, ["availabilityZone"], None, [], PolicyCustomTimeouts(0, 0, 0), [])
        args = ResourceValidationArgs(v.EBS_VOLUME, unknown_checking_proxy(VOLUME_PROPS), "urn:pulumi:s::p::t::w",
                                      "w", opts, None)
        reported = []
        policy.validate(args, lambda message, urn=None: reported.append(message))
        assert len(reported) == expected, (protect, reported)
