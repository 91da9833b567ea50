"""What a node's role may do, read from the IAM every AWS stack declares under the mocks.

A node runs third-party code (engines with --trust-remote-code, JIT kernels, a checkpoint's Python
files), so its role is what a compromised engine holds. The rules: no AWS-managed policy on a role
that EC2 instances assume; SSM parameter reads (and the KMS decrypt behind SecureStrings) only under
the stack's own prefix; and no S3 key that one node may write and any node (of any stack) may read.
"""

from __future__ import annotations

import fnmatch
import itertools
import json

import pytest

from components.gpu_node import _role_policy, ssm_prefix_arn
from kimi_fleet import node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tooling.mock_run import run_stack

AWS_STACKS = ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang"]
ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"


def resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


@pytest.fixture(scope="module", params=AWS_STACKS)
def declared(request):
    return request.param, run_stack(request.param)


def _ec2_roles(run) -> list[dict]:
    def assumed_by_ec2(role):
        document = json.loads(role["inputs"]["assumeRolePolicy"])
        return any(s.get("Principal", {}).get("Service") == "ec2.amazonaws.com" for s in document["Statement"])
    return [role for role in run.of_type(ROLE) if assumed_by_ec2(role)]


def _statements(policy: str) -> list[dict]:
    return json.loads(policy)["Statement"]


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def test_no_aws_managed_policy_on_any_role_an_instance_assumes(declared):
    stack, run = declared
    assert run.error is None, run.error
    roles = _ec2_roles(run)
    assert roles, stack
    attachments = run.of_type(ATTACHMENT) + run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    assert not [a["inputs"]["policyArn"] for a in attachments], f"{stack}: managed policies attached"
    for role in roles:
        assert not role["inputs"].get("managedPolicyArns"), role["name"]


def test_parameter_reads_and_decrypts_only_under_the_stacks_own_prefix(declared):
    stack, run = declared
    r = resolved(stack)
    own = ssm_prefix_arn(r.spec.target.aws.region, r.spec.target.aws.ssm_prefix or node_files.default_ssm_prefix(stack))
    node_policies = [p for p in run.of_type(ROLE_POLICY) if p["name"].endswith("-node")]
    assert len(node_policies) == 1, [p["name"] for p in run.of_type(ROLE_POLICY)]
    for statement in _statements(node_policies[0]["inputs"]["policy"]):
        actions = _listed(statement["Action"])
        assert not any(a in ("*", "ssm:*", "s3:*", "kms:*") for a in actions), statement
        if any(a.startswith("ssm:GetParameter") for a in actions):
            assert statement["Resource"] == own, statement
        if "kms:Decrypt" in actions:
            condition = statement["Condition"]
            assert condition["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"] == own
            assert condition["StringEquals"]["kms:ViaService"].startswith("ssm.")
    assert own.endswith(f"parameter/kimi-fleet/{stack}/*")
    # The node's own account, as an IAM policy variable: not another account's shared parameter.
    assert f":{r.spec.target.aws.region}:${{aws:PrincipalAccount}}:parameter" in own


def _key_patterns(statements: list[dict], action: str, effect: str) -> list[str]:
    """S3 object-key patterns (bucket/key globs) a statement set gives `action` with `effect`."""
    found = []
    for statement in statements:
        if statement["Effect"] == effect and action in _listed(statement["Action"]):
            found += [arn.removeprefix("arn:aws:s3:::") for arn in _listed(statement["Resource"])]
    return found


def _example_keys(pattern: str) -> list[str]:
    """Concrete keys a write pattern allows (IAM's * matches across slashes)."""
    return [pattern.replace("*", filler) for filler in ("x", "i-0abc/0123abcd.tar", "a/candidates/b")]


def _readable(key: str, statements: list[dict]) -> bool:
    allowed = any(fnmatch.fnmatchcase(key, p) for p in _key_patterns(statements, "s3:GetObject", "Allow"))
    denied = any(fnmatch.fnmatchcase(key, p) for p in _key_patterns(statements, "s3:GetObject", "Deny"))
    return allowed and not denied


def test_no_node_reads_what_any_node_may_write():
    policies = {stack: _statements(_role_policy(resolved(stack), node_files.default_ssm_prefix(stack)))
                for stack in AWS_STACKS}
    writes = {stack: _key_patterns(statements, "s3:PutObject", "Allow") for stack, statements in policies.items()}
    assert any(writes.values()), "no stack uploads compile-cache candidates: the check would test nothing"
    for writer, reader in itertools.product(AWS_STACKS, AWS_STACKS):
        for pattern in writes[writer]:
            for key in _example_keys(pattern):
                assert not _readable(key, policies[reader]), (
                    f"a {writer} node may write {key}, which a {reader} node may read")


def test_the_only_write_is_the_stacks_own_candidate_prefix():
    for stack in AWS_STACKS:
        r = resolved(stack)
        written = _key_patterns(_statements(_role_policy(r, node_files.default_ssm_prefix(stack))), "s3:PutObject",
                                "Allow")
        candidates = node_files.compile_cache_candidate_prefix(r)
        bucket = r.spec.weights.s3_mirror_location[0] if candidates else None
        # Each node under its own IAM user id (<role id>:<instance id>): none can overwrite another's.
        assert written == ([f"{bucket}/{candidates}/${{aws:userid}}/*"] if candidates else []), stack
        if candidates:
            assert candidates.endswith(f"/candidates/{stack}")


def test_an_ssm_prefix_that_would_cover_other_stacks_is_refused():
    from kimi_fleet.rules import check_rules

    base = resolved("h200-int4-sglang")
    for prefix, ok in [("/kimi-fleet", False), ("/", False), ("/kimi-fleet/h200-int4-sglang/extra", False),
                       ("/kimi-fleet/other-stack", False), ("/team-a/h200-int4-sglang", True),
                       ("/kimi-fleet/h200-int4-sglang", True)]:
        if prefix == "/":
            continue  # not even an SSM path: the spec's shape refuses it first
        spec = base.spec
        target = spec.target.model_copy(update={"aws": spec.target.aws.model_copy(update={"ssm_prefix": prefix})})
        problems, _ = check_rules(Resolved(spec.model_copy(update={"target": target})))
        named = [p for p in problems if "ssmPrefix" in p]
        assert bool(named) != ok, (prefix, problems)
        if named:
            assert prefix in named[0] and "/<namespace>/h200-int4-sglang" in named[0]
