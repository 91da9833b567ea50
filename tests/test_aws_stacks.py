"""The AWS stacks under Pulumi's mock runtime: what AwsEndpoint declares for each of them.

Mocks do not validate provider inputs, so these tests check what matters here: exposure, secrets,
the market policy, the fleet shape, the volume's lifetime and DNS.
"""

from __future__ import annotations

import base64
import json

import pulumi
import pytest

from kimi_fleet import lifecycle_rights
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tooling.mock_run import EBS_VOLUME_ID as VOLUME_ID
from tooling.mock_run import MockRun, is_secret, run_components

AWS_STACKS = ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang"]
API_KEY = "kimi-test-api-key-9d2c41f0a7b35e86"
HF_TOKEN = "hf_testtokenNotRealAbCdEfGhIjKlMnOpQrStUv"
ENGINE_PORTS = range(8000, 8100), range(30000, 30100)

SG = "aws:ec2/securityGroup:SecurityGroup"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
ASG = "aws:autoscaling/group:Group"
SSM_PARAMETER = "aws:ssm/parameter:Parameter"


def resolved(stack: str, **aws_overrides) -> Resolved:
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    if not aws_overrides:
        return r
    spec = r.spec
    target = spec.target.model_copy(update={"aws": spec.target.aws.model_copy(update=aws_overrides)})
    return Resolved(spec.model_copy(update={"target": target}))


def with_capacity(r: Resolved, **capacity) -> Resolved:
    spec = r.spec
    merged = spec.capacity.model_dump() | capacity
    return Resolved(spec.model_copy(update={"capacity": type(spec.capacity).model_validate(merged)}))


def run_endpoint(r: Resolved, *, hf_token: str | None = None) -> MockRun:
    from components.aws_endpoint import AwsEndpoint, AwsEndpointArgs

    names = ["endpoint_url", "openai_base_url", "node_ids", "public_address", "market", "hourly_cost_usd",
             "dns_record", "weights_volume_id"]

    def declare():
        endpoint = AwsEndpoint("kimi", AwsEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r), api_key=pulumi.Output.secret(API_KEY),
            hf_token=pulumi.Output.secret(hf_token) if hf_token else None,
        ))
        return {n: getattr(endpoint, n) for n in names}

    run = run_components(declare, r.spec.stack)
    # The managed mirror (its bucket, fill instance and wait) is tested in test_managed_mirror.py;
    # here: the endpoint's own resources.
    mirror = {"kimi-mirror", "kimi-fill"}
    while grown := {x["name"] for x in run.resources if x["parent"] in mirror} - mirror:
        mirror |= grown
    run.resources = [x for x in run.resources if x["name"] not in mirror]
    return run


@pytest.fixture(scope="module", params=AWS_STACKS)
def stack_run(request) -> tuple[str, MockRun]:
    return request.param, run_endpoint(resolved(request.param), hf_token=HF_TOKEN)


def _user_data(run: MockRun) -> str:
    """The launch template's user data as a node sees it: base64 of the gzip-compressed cloud-config."""
    import gzip

    (template,) = run.of_type(LT)
    sent = base64.b64decode(template["inputs"]["userData"])
    assert len(sent) <= 16 * 1024
    return gzip.decompress(sent).decode()


def _decoded_files(user_data: str) -> str:
    import yaml

    return "\n".join(entry["content"] for entry in yaml.safe_load(user_data)["write_files"])


def node_files_text(run: MockRun) -> str:
    """Every node file as the node receives it: the release bundle in S3 (one node, applied in
    place) or the user data (a fleet's launch template)."""
    import json

    bundles = run.of_type("aws:s3/bucketObjectv2:BucketObjectv2")
    if bundles:
        (bundle,) = bundles
        return "\n".join(entry["content"] for entry in json.loads(bundle["inputs"]["content"])["files"])
    return _decoded_files(_user_data(run))


# --- every AWS stack -------------------------------------------------------------------------

def test_children_are_parented_and_tagged(stack_run):
    stack, run = stack_run
    (endpoint,) = run.of_type("kimi-fleet:aws:AwsEndpoint")
    for registration in run.resources:
        if registration is not endpoint:
            assert registration["parent"], f"{registration['name']} has no parent"
    for typ in (SG, LT, "aws:ssm/parameter:Parameter"):
        for resource in run.of_type(typ):
            tags = resource["inputs"]["tags"]
            assert tags["kimi-fleet:stack"] == stack and tags["kimi-fleet:workload"] in ("interactive", "batch")
    (proxy,) = run.of_type("kimi-fleet:proxy:AuthProxy")
    assert proxy["inputs"]["caddyfile"].startswith("{\n\tadmin off")
    assert all(u.startswith("127.0.0.1:") for u in proxy["inputs"]["allowedUpstreams"])


def test_security_group_opens_only_https_and_acme(stack_run):
    stack, run = stack_run
    (group,) = run.of_type(SG)
    ingress = group["inputs"]["ingress"]
    public = [rule for rule in ingress if "0.0.0.0/0" in rule.get("cidrBlocks", [])]
    assert sorted((rule["fromPort"], rule["toPort"]) for rule in public) == [(80, 80), (443, 443)]
    # A fleet's nodes also answer their NLB's health check on the ready listener, from the VPC only.
    private = [rule for rule in ingress if rule not in public]
    fleet = resolved(stack).spec.capacity.replicas > 1
    assert [(r["fromPort"], r["cidrBlocks"]) for r in private] == ([(9181, ["172.31.0.0/16"])] if fleet else [])
    for rule in ingress:
        assert rule["protocol"] == "tcp"
        for ports in ENGINE_PORTS:
            assert rule["fromPort"] not in ports
    assert not [r for r in run.resources if r["type"].startswith("aws:vpc/securityGroupIngressRule")]


def test_secrets_are_secure_strings_and_absent_from_user_data(stack_run):
    stack, run = stack_run
    parameters = {p["inputs"]["name"]: p for p in run.of_type(SSM_PARAMETER) if p["inputs"]["type"] == "SecureString"}
    assert set(parameters) == {f"/kimi-fleet/{stack}/api-key", f"/kimi-fleet/{stack}/hf-token"}
    for parameter in parameters.values():
        assert is_secret(parameter["wire"]["value"]), "the parameter value is not marked secret"
    # Anything else in SSM is the release pointer (a plain S3 address and digest), fleets included, and a
    # fleet's steward URL (where its nodes call it: components/fleet_steward.py).
    others = [p for p in run.of_type(SSM_PARAMETER) if p["inputs"]["type"] != "SecureString"]
    fleet = resolved(stack).spec.capacity.is_fleet
    assert [p["inputs"]["name"] for p in others] == [f"/kimi-fleet/{stack}/release"] + (
        [f"/kimi-fleet/{stack}/steward-url"] if fleet else [])
    associations = run.of_type("aws:ssm/association:Association")
    assert len(associations) == (0 if resolved(stack).spec.capacity.replicas > 1 else 1)  # fleets refresh
    user_data = _user_data(run)
    files = node_files_text(run)
    for secret in (API_KEY, HF_TOKEN):
        assert secret not in user_data and secret not in files
    for name in parameters:
        assert f"={name}\n" in files  # the node learns where to read them, not what they are


def test_no_secret_value_in_plain_anywhere(stack_run):
    _, run = stack_run

    def plain_strings(node):
        if is_secret(node):
            return
        if isinstance(node, dict):
            for value in node.values():
                yield from plain_strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from plain_strings(value)
        elif isinstance(node, str):
            yield node

    for registration in run.resources:
        for text in plain_strings(registration["wire"]):
            assert API_KEY not in text and HF_TOKEN not in text, registration["name"]


def test_imdsv2_role_and_ami_from_ssm(stack_run):
    _, run = stack_run
    (template,) = run.of_type(LT)
    assert template["inputs"]["metadataOptions"]["httpTokens"] == "required"
    assert template["inputs"]["imageId"] == "ami-0123456789abcdef0"
    # One hop: a container on a bridge network gets no IMDS token (tests/test_node_iam.py: the rest).
    assert template["inputs"]["metadataOptions"]["httpPutResponseHopLimit"] == 1
    (policy,) = [p for p in run.of_type("aws:iam/rolePolicy:RolePolicy") if p["name"].endswith("-node")]
    assert "parameter/kimi-fleet/" in policy["inputs"]["policy"] and '"ssm:GetParameter"' in policy["inputs"]["policy"]
    assert not run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")


def test_client_outputs(stack_run):
    stack, run = stack_run
    r = resolved(stack)
    assert run.outputs["endpoint_url"] == f"https://{r.spec.domain}"
    assert run.outputs["openai_base_url"] == f"https://{r.spec.domain}/v1"
    assert run.outputs["market"] == r.spec.capacity.effective_market
    assert run.outputs["node_ids"]
    assert run.outputs["public_address"]


# --- market policy and shapes ----------------------------------------------------------------

def test_interactive_single_node_is_on_demand_with_eip_and_retained_ebs():
    run = run_endpoint(resolved("h200-int4-sglang"))
    (template,) = run.of_type(LT)
    assert "instanceMarketOptions" not in template["inputs"]
    assert len(run.of_type(INSTANCE)) == 1 and not run.of_type(ASG)
    assert run.of_type("aws:ec2/eipAssociation:EipAssociation")
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    assert volume["retain_on_delete"]
    assert volume["inputs"]["type"] == "gp3" and volume["inputs"]["throughput"] == 1000
    assert volume["inputs"]["availabilityZone"] == "us-east-1a"
    (attachment,) = run.of_type("aws:ec2/volumeAttachment:VolumeAttachment")
    assert attachment["inputs"]["volumeId"] == VOLUME_ID
    assert f"EBS_VOLUME_ID={VOLUME_ID}" in node_files_text(run)
    assert run.outputs["public_address"] == "203.0.113.10"
    assert run.outputs["hourly_cost_usd"] > 63.30  # on-demand p5en plus the volume


def test_batch_single_node_is_a_persistent_spot_request_that_stops():
    run = run_endpoint(with_capacity(resolved("h200-int4-sglang"), workload="batch"))
    (template,) = run.of_type(LT)
    market = template["inputs"]["instanceMarketOptions"]
    assert market["marketType"] == "spot"
    assert market["spotOptions"] == {"spotInstanceType": "persistent", "instanceInterruptionBehavior": "stop"}
    assert len(run.of_type(INSTANCE)) == 1


def test_max_spot_price_and_override_are_honoured():
    r = with_capacity(resolved("h200-int4-sglang"), workload="batch", max_spot_price_usd=12.5)
    (template,) = run_endpoint(r).of_type(LT)
    assert template["inputs"]["instanceMarketOptions"]["spotOptions"]["maxPrice"] == "12.5"
    on_demand = run_endpoint(with_capacity(resolved("h200-int4-sglang"), workload="batch", market="on-demand"))
    (template,) = on_demand.of_type(LT)
    assert "instanceMarketOptions" not in template["inputs"]
    assert on_demand.outputs["market"] == "on-demand"


def test_capacity_block_uses_the_reservation():
    r = with_capacity(resolved("h200-int4-sglang"), market="capacity-block", capacity_reservation_id="cr-0123abcd")
    run = run_endpoint(r)
    (template,) = run.of_type(LT)
    assert template["inputs"]["instanceMarketOptions"] == {"marketType": "capacity-block"}
    target = template["inputs"]["capacityReservationSpecification"]["capacityReservationTarget"]
    assert target["capacityReservationId"] == "cr-0123abcd"


def test_fleet_has_on_demand_base_and_spot_remainder_behind_a_load_balancer():
    run = run_endpoint(resolved("b300-int4-sglang"))
    assert not run.of_type(INSTANCE) and not run.of_type("aws:ec2/eip:Eip")
    (group,) = run.of_type(ASG)
    inputs = group["inputs"]
    assert inputs["minSize"] == inputs["maxSize"] == inputs["desiredCapacity"] == 2
    assert inputs["capacityRebalance"] is True
    distribution = inputs["mixedInstancesPolicy"]["instancesDistribution"]
    assert distribution["onDemandBaseCapacity"] == 1
    assert distribution["onDemandPercentageAboveBaseCapacity"] == 0
    assert distribution["spotAllocationStrategy"] == "price-capacity-optimized"
    assert sorted(inputs["vpcZoneIdentifiers"]) == ["subnet-a", "subnet-b"]
    (template,) = run.of_type(LT)
    assert "instanceMarketOptions" not in template["inputs"]  # the group picks the market
    assert len(inputs["targetGroupArns"]) == 2
    listeners = run.of_type("aws:lb/listener:Listener")
    assert sorted(listener["inputs"]["port"] for listener in listeners) == [80, 443]
    assert all(listener["inputs"]["protocol"] == "TCP" for listener in listeners)  # Caddy terminates TLS
    # The NLB routes to a node only once its watchdog admitted it by real generations.
    for target_group in run.of_type("aws:lb/targetGroup:TargetGroup"):
        check = target_group["inputs"]["healthCheck"]
        assert (check["protocol"], check["port"], check["path"], check["matcher"]) == (
            "HTTP", "9181", "/kimi-fleet/ready", "200")
    # EC2: the load balancer stops routing to a busy or reloading node, only a dead node (which marks
    # itself unhealthy) is replaced; the refresh is the gate's, not the provider's (#34189).
    assert inputs["healthCheckType"] == "EC2"
    assert "instanceRefresh" not in inputs
    # A node serves only once admitted: the launch hook holds it until its watchdog completes it. And a
    # fixed fleet's terminating node (an instance refresh) drains first, as a scaling fleet's does.
    hooks = {h["inputs"]["lifecycleTransition"]: h["inputs"] for h in run.of_type("aws:autoscaling/lifecycleHook:LifecycleHook")}
    assert set(hooks) == {"autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"}
    hook = hooks["autoscaling:EC2_INSTANCE_LAUNCHING"]
    assert hook["defaultResult"] == "ABANDON" and 0 < int(hook["heartbeatTimeout"]) <= 7200
    drain = hooks["autoscaling:EC2_INSTANCE_TERMINATING"]
    assert drain["defaultResult"] == "CONTINUE" and drain["name"] == "kimi-drain"
    # The pre-steward policy of the direct writes is never declared (its state's copy goes at the end of a
    # successful `pulumi up`: lifecycle_rights.py); the node calls its steward under another name.
    policies = run.of_type("aws:iam/rolePolicy:RolePolicy")
    assert not [p for p in policies if p["name"].endswith(lifecycle_rights.RETIRED_POLICY_SUFFIX)]
    (admission,) = [p for p in policies if p["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX)]
    actions = {action: s["Resource"] for s in json.loads(admission["inputs"]["policy"])["Statement"]
               for action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    # Its lifecycle actions and scale-in protection through the fleet's steward only (test_fleet_steward.py).
    assert "autoscaling:CompleteLifecycleAction" not in actions and "autoscaling:SetInstanceProtection" not in actions
    assert actions["lambda:InvokeFunctionUrl"] == actions["lambda:InvokeFunction"]
    # No node may mark instances unhealthy: that would cover every node of the group.
    assert all("SetInstanceHealth" not in p["inputs"]["policy"] for p in run.of_type("aws:iam/rolePolicy:RolePolicy"))
    assert not run.of_type("aws:ebs/volume:Volume")  # replicas use their own instance store
    assert run.outputs["public_address"] == "kimi-nlb-123.elb.us-east-1.amazonaws.com"
    assert "no hosted zone configured" in run.outputs["dns_record"]


def test_batch_fleet_without_base_is_all_spot():
    (group,) = run_endpoint(resolved("h200-int4-vllm")).of_type(ASG)
    distribution = group["inputs"]["mixedInstancesPolicy"]["instancesDistribution"]
    assert distribution["onDemandBaseCapacity"] == 0 and distribution["onDemandPercentageAboveBaseCapacity"] == 0


def test_ssh_only_from_the_allowlist():
    run = run_endpoint(resolved("h200-int4-sglang", ssh_allowlist=("203.0.113.7/32", "2001:db8::/64")))
    (group,) = run.of_type(SG)
    (ssh,) = [rule for rule in group["inputs"]["ingress"] if rule["fromPort"] == 22]
    assert ssh["cidrBlocks"] == ["203.0.113.7/32"] and ssh["ipv6CidrBlocks"] == ["2001:db8::/64"]
    for rule in group["inputs"]["ingress"]:
        if rule["fromPort"] != 22:
            assert rule["fromPort"] in (80, 443)


def test_dns_record_in_the_hosted_zone():
    run = run_endpoint(resolved("h200-int4-sglang", hosted_zone_id="Z0123456789ABC"))
    (record,) = run.of_type("aws:route53/record:Record")
    assert record["inputs"]["zoneId"] == "Z0123456789ABC"
    assert record["inputs"]["name"] == "kimi-h200.example.com" and record["inputs"]["type"] == "A"
    assert record["inputs"]["records"] == ["203.0.113.10"]
    fleet = run_endpoint(resolved("b300-int4-sglang", hosted_zone_id="Z0123456789ABC"))
    (alias,) = fleet.of_type("aws:route53/record:Record")
    assert alias["inputs"]["aliases"][0]["name"] == "kimi-nlb-123.elb.us-east-1.amazonaws.com"


def test_given_subnets_place_the_volume_in_their_zone():
    run = run_endpoint(resolved("h200-int4-sglang", subnet_ids=("subnet-given",)))
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    assert volume["inputs"]["availabilityZone"] == "us-east-1c"
    (instance,) = run.of_type(INSTANCE)
    assert instance["inputs"]["subnetId"] == "subnet-given"
