"""The managed weights mirror (issue 10): under the mock runtime a managed stack declares the bucket
(private, encrypted, retained), the fill (a self-terminating instance whose role writes only its
checkpoint, and the wait) and GPU nodes that depend on the fill; two stacks in a region share one
bucket; the policy pack refuses a bucket without encryption or with public access; the fill's user
data passes cloud-init's schema and shellcheck; the wait (scripts/await_mirror.py) is run against a
real S3 API (moto) and refuses an unprotected bucket, reports a failed fill, and succeeds on the
manifest."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from components.gpu_node import _role_policy
from kimi_fleet import catalog
from kimi_fleet.launch import render_launch
from kimi_fleet.mirror import plan_mirror, render_fill_user_data, shared_mirror_problems
from kimi_fleet.node_files import (
    MANIFEST_SHA256_PLACEHOLDER, NODE_ENV_FILE, compile_cache_archive, compile_cache_candidate_key,
    compile_cache_candidate_prefix, compile_cache_candidates_pattern, compile_cache_launch_digest,
    compile_cache_pin_parameter, compile_cache_pinned_key, default_ssm_prefix, user_data_bytes,
)
from kimi_fleet.resolve import Resolved
from kimi_fleet.spec import StackSpecError
from kimi_fleet.stackfile import stack_names
from policy import validators as v
from tests.fakes.aws_api import moto_server
from tests.test_node_files import node_files, resolved, tool
from tooling.mock_run import run_stack

ROOT = Path(__file__).resolve().parents[1]
CREATOR, ADOPTER = "h200-int4-vllm", "b300-int4-sglang"
BUCKET = "kimi-fleet-weights-us-east-1"


@pytest.fixture(scope="module")
def runs():
    return {name: run_stack(name) for name in (CREATOR, ADOPTER)}


def _children(run, component: str) -> list[dict]:
    return [r for r in run.resources if r["parent"] == component]


def test_the_creating_stack_declares_a_private_encrypted_retained_bucket(runs):
    run = runs[CREATOR]
    assert run.error is None, run.error
    (bucket,) = [r for r in run.of_type("aws:s3/bucket:Bucket") if r["inputs"].get("bucket") == BUCKET]
    assert bucket["retain_on_delete"] is True
    parts = {r["type"]: r["inputs"] for r in _children(run, "kimi-aws-mirror")}
    block = parts[v.S3_PUBLIC_ACCESS_BLOCK]
    assert all(block[name] is True for name in v.PUBLIC_ACCESS_BLOCKS)
    (rule,) = parts[v.S3_ENCRYPTION]["rules"]
    assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    rules = {rule["id"]: rule for rule in
             parts["aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"]["rules"]}
    assert rules["abort-incomplete-uploads"]["abortIncompleteMultipartUpload"]["daysAfterInitiation"] >= 1
    # Shared compile caches expire; the checkpoints beside them never do.
    assert rules["expire-compile-caches"]["filter"]["prefix"] == "hf/.compile-cache/"
    assert rules["expire-compile-caches"]["expiration"]["days"] == catalog.MIRROR_COMPILE_CACHE_EXPIRY_DAYS
    assert all("expiration" not in rule for name, rule in rules.items() if name != "expire-compile-caches")
    policy = json.loads(parts["aws:s3/bucketPolicy:BucketPolicy"]["policy"])
    assert policy["Statement"][0]["Effect"] == "Deny" and "SecureTransport" in json.dumps(policy)


@pytest.mark.parametrize("stack", [CREATOR, ADOPTER])
def test_gpu_nodes_depend_on_a_fill_that_terminates_itself(runs, stack):
    run = runs[stack]
    assert run.error is None, run.error
    plan = plan_mirror(resolved(stack))
    (instance,) = [r for r in run.of_type("aws:ec2/instance:Instance") if plan.fill_id in r["name"]]
    assert instance["inputs"]["instanceInitiatedShutdownBehavior"] == "terminate"
    assert instance["inputs"]["instanceType"] == "c6id.8xlarge"
    assert "instanceMarketOptions" not in instance["inputs"]  # on demand: nobody restarts a stranded fill
    (wait,) = [r for r in run.of_type("command:local:Command") if r["name"].endswith("-await")]
    assert "scripts/await_mirror.py" in wait["inputs"]["create"]
    assert f"--manifest-key hf/moonshotai/Kimi-K2.6/{plan.revision}/kimi-fleet-manifest.json" in wait["inputs"]["create"]
    assert int(wait["timeouts"]["create"].rstrip("s")) > plan.deadline_minutes * 60
    # No GPU capacity before the mirror holds the checkpoint.
    assert wait["name"] in run.named("kimi-aws-node")["dependencies"]
    # The fill's role writes its checkpoint's prefix and nothing else of the bucket.
    (role_policy,) = [r for r in run.of_type("aws:iam/rolePolicy:RolePolicy") if plan.fill_id in r["name"]]
    statements = json.loads(role_policy["inputs"]["policy"])["Statement"]
    writes = next(s for s in statements if "s3:PutObject" in s["Action"])
    assert writes["Resource"].endswith(f"/hf/moonshotai/Kimi-K2.6/{plan.revision}/*")
    assert not any(s["Action"] == "s3:*" or s["Resource"].endswith(":::" + BUCKET + "/*") for s in statements)


def _actions(statement: dict) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def _resources(statement: dict) -> list[str]:
    return [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]


@pytest.mark.parametrize("stack", [CREATOR, ADOPTER])
def test_nodes_write_only_candidates_of_their_own_stack_and_read_no_candidate(runs, stack):
    """Issue 21, item 1 (the IAM side is components/gpu_node.py's): a node's only write is a
    candidate under CACHE/candidates/<its stack>/, and no node reads any candidate."""
    r = resolved(stack)
    cache_prefix = f"hf/.compile-cache/{r.compile_cache_dir_name}"
    assert compile_cache_candidate_prefix(r) == f"{cache_prefix}/candidates/{stack}"
    assert compile_cache_candidates_pattern(r) == "hf/.compile-cache/*/candidates/*"
    node_policies = [json.loads(p["inputs"]["policy"]) for p in runs[stack].of_type("aws:iam/rolePolicy:RolePolicy")
                     if plan_mirror(r).fill_id not in p["name"]]
    statements = [statement for policy in node_policies for statement in policy["Statement"]]
    writes = [s for s in statements if s["Effect"] == "Allow"
              and any(a.startswith("s3:") and a not in ("s3:GetObject", "s3:ListBucket") for a in _actions(s))]
    # Under the node's own ${aws:userid} (<role id>:<instance id>): no node overwrites another's candidate.
    assert [_resources(s) for s in writes] == [
        [f"arn:aws:s3:::{BUCKET}/{compile_cache_candidate_prefix(r)}/${{aws:userid}}/*"]]
    assert set(_actions(writes[0])) <= {"s3:PutObject", "s3:AbortMultipartUpload"}
    denied = [s for s in statements if s["Effect"] == "Deny" and "s3:GetObject" in _actions(s)]
    assert [_resources(s) for s in denied] == [[f"arn:aws:s3:::{BUCKET}/{compile_cache_candidates_pattern(r)}"]]


@pytest.mark.parametrize("stack", [CREATOR, ADOPTER])
def test_nodes_are_told_their_launchs_cache_pin_and_the_manifest_pin(runs, stack):
    r = resolved(stack)
    launch = render_launch(r)
    cache_prefix = f"hf/.compile-cache/{r.compile_cache_dir_name}"
    settings = dict(line.split("=", 1) for line in node_files(stack)[NODE_ENV_FILE].content.splitlines()
                    if "=" in line and not line.startswith("#"))
    digest = compile_cache_launch_digest(launch, stack)
    assert settings["COMPILE_CACHE_ARCHIVE"] == compile_cache_archive(r, launch) == f"s3://{BUCKET}/{cache_prefix}/{digest}.tar"
    assert settings["COMPILE_CACHE_DIR"].endswith(f"/compile-cache/{r.compile_cache_dir_name}")
    assert settings["COMPILE_CACHE_PIN_PARAMETER"] == compile_cache_pin_parameter(default_ssm_prefix(stack), digest)
    assert settings["COMPILE_CACHE_PIN_PARAMETER"] == f"/kimi-fleet/{stack}/compile-cache/{digest}"
    # The names the node derives (compile_cache.py) are the names the deployer and the IAM policy use.
    from kimi_fleet.node_scripts import compile_cache

    archive = settings["COMPILE_CACHE_ARCHIVE"]
    assert compile_cache.candidate_uri(archive, stack, "i-0abc") == f"s3://{BUCKET}/" + compile_cache_candidate_key(
        r, launch, "i-0abc")
    assert compile_cache.pinned_uri(archive, "f" * 64) == f"s3://{BUCKET}/" + compile_cache_pinned_key(r, "f" * 64)
    # The planner renders the manifest pin as a placeholder (every node refuses it); `pulumi up`
    # fills in the digest the fill's wait printed.
    assert settings["MIRROR_MANIFEST_SHA256"] == MANIFEST_SHA256_PLACEHOLDER
    (wait,) = [r for r in runs[stack].of_type("command:local:Command") if r["name"].endswith("-await")]
    fill = next(x for x in runs[stack].resources if x["type"] == "kimi-fleet:weights:MirrorFill")
    assert fill["name"] in wait["parent"] or wait["parent"] == fill["name"]


def test_the_shared_cache_is_named_by_the_launch_and_needs_a_managed_mirror():
    r = resolved(CREATOR)
    spec = r.spec
    archive = compile_cache_archive(r, render_launch(r))

    def changed(part: str, **update) -> Resolved:
        return Resolved(spec.model_copy(update={part: getattr(spec, part).model_copy(update=update)}))

    # Another memory knob is another launch: its kernels and graphs get their own archive.
    flag = changed("engine", memory_fraction=0.85 if spec.engine.memory_fraction != 0.85 else 0.8)
    assert compile_cache_archive(flag, render_launch(flag)) not in (None, archive)
    # What does not reach the engine (the gate's timeout) keeps the archive.
    gate = Resolved(spec.model_copy(update={"verification": spec.verification.model_copy(
        update={"timeout_seconds": spec.verification.timeout_seconds + 1})}))
    assert compile_cache_archive(gate, render_launch(gate)) == archive
    # An external mirror is not the program's bucket: nothing shared, no write access to it.
    external = changed("weights", mirror="external")
    assert compile_cache_archive(external, render_launch(external)) is None
    policy = json.loads(_role_policy(external, "/kimi-fleet/x"))
    assert not [s for s in policy["Statement"] if "s3:PutObject" in json.dumps(s)]


def test_the_fill_goes_into_a_subnet_of_a_zone_that_sells_its_instance_type(runs):
    from components.mirror_fill import choose_fill_subnet

    # Under the mocks: one of the stack's own subnets.
    (fill,) = [r for r in runs[CREATOR].of_type("aws:ec2/instance:Instance") if "-fill-" in r["name"]]
    assert fill["inputs"]["subnetId"].startswith("subnet-")
    # The stack's subnet first, then (default subnets) any default subnet of a zone that sells it.
    assert choose_fill_subnet(["subnet-b", "subnet-a"], ["subnet-c"], ["us-east-1a"], "us-east-1") == "subnet-a"
    assert choose_fill_subnet([], ["subnet-c"], ["us-east-1c"], "us-east-1") == "subnet-c"
    with pytest.raises(ValueError, match=r"sells c6id\.8xlarge \(us-east-1c, us-east-1d\).*target\.aws\.subnetIds"):
        choose_fill_subnet([], [], ["us-east-1d", "us-east-1c"], "us-east-1")


def test_two_stacks_in_a_region_share_one_bucket_and_one_fill(runs):
    creator, adopter = plan_mirror(resolved(CREATOR)), plan_mirror(resolved(ADOPTER))
    assert (creator.bucket, creator.manifest_key) == (adopter.bucket, adopter.manifest_key)
    assert creator.fill_id == adopter.fill_id  # one checkpoint: the second fill finds the manifest and exits
    assert creator.create_bucket and not adopter.create_bucket
    # The adopter declares no bucket of its own: it looks the creator's up.
    assert not [r for r in runs[ADOPTER].of_type("aws:s3/bucket:Bucket") if r["inputs"].get("bucket") == BUCKET]
    specs = [spec for spec in _valid_specs() if spec.weights.mirror == "managed"]
    assert {s.stack for s in specs} == {CREATOR, ADOPTER, "h200-int4-sglang", "b200-nvfp4-vllm", "b300-nvfp4-vllm"}
    assert shared_mirror_problems(specs) == []
    # Another checkpoint in the same bucket: its own prefix and fill.
    nvfp4 = plan_mirror(resolved("b200-nvfp4-vllm"))
    assert nvfp4.bucket == creator.bucket and nvfp4.fill_id != creator.fill_id
    assert nvfp4.manifest_key.startswith(f"hf/{nvfp4.repo}/{nvfp4.revision}/")
    # The two NVFP4 stacks share that checkpoint's one fill, as the INT4 ones share theirs.
    assert plan_mirror(resolved("b300-nvfp4-vllm")).fill_id == nvfp4.fill_id


def _valid_specs():
    for name in stack_names():
        try:
            yield resolved(name).spec
        except StackSpecError:
            continue  # a stack file kept as the record of a refusal


def test_pairing_problems_are_named():
    creator, adopter = resolved(CREATOR).spec, resolved(ADOPTER).spec
    two_creators = adopter.model_copy(update={"weights": adopter.weights.model_copy(update={"mirror_bucket": "create"})})
    assert "created by b300-int4-sglang, h200-int4-vllm" in shared_mirror_problems([creator, two_creators])[0]
    assert "no stack creates it" in shared_mirror_problems([adopter])[0]


@pytest.mark.parametrize("stack", [CREATOR, ADOPTER])
def test_every_mandatory_policy_passes_with_a_managed_mirror(runs, stack):
    resources = [{"type": r["type"], "name": r["name"], "props": r["inputs"]} for r in runs[stack].resources]
    assert [x for x in v.check_resources(resources) if x["enforcement"] == "mandatory"] == []


def test_the_policy_rejects_a_mirror_without_encryption_or_with_public_access(runs):
    (mirror,) = runs[CREATOR].of_type(v.WEIGHTS_MIRROR)
    facts = mirror["inputs"]["mirror"]
    assert v.validate_buckets_private_and_encrypted(v.WEIGHTS_MIRROR, {"mirror": facts}) == []
    unencrypted = {**facts, "encryption": None}
    assert "has no default encryption" in v.validate_buckets_private_and_encrypted(
        v.WEIGHTS_MIRROR, {"mirror": unencrypted})[0]
    public = {**facts, "publicAccessBlock": {**facts["publicAccessBlock"], "restrictPublicBuckets": False}}
    assert "allows public access: restrictPublicBuckets" in v.validate_buckets_private_and_encrypted(
        v.WEIGHTS_MIRROR, {"mirror": public})[0]
    unchecked = {**facts, "created": False, "liveCheckBeforeNodes": False}
    assert v.validate_buckets_private_and_encrypted(v.WEIGHTS_MIRROR, {"mirror": unchecked})
    # The resources themselves, whatever declares them.
    assert v.validate_buckets_private_and_encrypted(v.S3_PUBLIC_ACCESS_BLOCK, {
        "blockPublicAcls": True, "blockPublicPolicy": False, "ignorePublicAcls": True, "restrictPublicBuckets": True})
    assert v.validate_buckets_private_and_encrypted(v.S3_ENCRYPTION, {"rules": [{}]})


@tool("cloud-init")
@tool("shellcheck")
def test_the_fill_user_data_is_valid_cloud_config_and_its_script_passes_shellcheck(tmp_path):
    plan = plan_mirror(resolved(CREATOR))
    text = render_fill_user_data(plan)
    assert len(user_data_bytes(text)) <= 16384  # what EC2 receives (gzip; cloud-init unpacks it)
    (fill,) = [r for r in run_stack(CREATOR).of_type("aws:ec2/instance:Instance") if plan.fill_id in r["name"]]
    assert gzip.decompress(base64.b64decode(fill["inputs"]["userDataBase64"])).decode() == text
    (tmp_path / "fill.yaml").write_text(text)
    schema = subprocess.run(["cloud-init", "schema", "--config-file", str(tmp_path / "fill.yaml")],
                            capture_output=True, text=True)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
    script = next(content for path, content in files.items() if path.endswith("fill.sh"))
    (tmp_path / "fill.sh").write_text(script)
    checked = subprocess.run(["shellcheck", "-s", "bash", str(tmp_path / "fill.sh")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout
    assert f"shutdown -h +{plan.deadline_minutes}" in script and "--require-hashes" in script
    assert f"--revision '{plan.revision}'" in script


# --- the wait, against a real S3 API --------------------------------------------------------

REGION = "us-east-1"
KEY = "hf/moonshotai/Kimi-K2.6/" + "c" * 40


@pytest.fixture
def s3():
    with moto_server(REGION) as env:
        client = boto3.client("s3", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="test", aws_secret_access_key="test")
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                           aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket=BUCKET)
        instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        yield env, client, ec2, instance


def _protect(client):
    client.put_public_access_block(Bucket=BUCKET, PublicAccessBlockConfiguration=dict.fromkeys(
        ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"), True))
    client.put_bucket_encryption(Bucket=BUCKET, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})


def _wait(env, instance, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "await_mirror.py"), "--bucket", BUCKET,
         "--manifest-key", f"{KEY}/kimi-fleet-manifest.json", "--failure-key", f"{KEY}/kimi-fleet-fill-failed.txt",
         "--repo", "moonshotai/Kimi-K2.6", "--revision", "c" * 40, "--region", REGION, "--instance-id", instance,
         "--timeout", str(timeout), "--poll", "0.2"], env=env, capture_output=True, text=True, timeout=120)


def test_the_wait_refuses_a_bucket_open_to_the_public(s3):
    env, client, _, instance = s3
    client.put_bucket_encryption(Bucket=BUCKET, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    result = _wait(env, instance)
    assert result.returncode == 1 and "refused: no public access block" in result.stderr


def test_the_wait_reports_a_failed_fill_and_a_fill_instance_that_ended(s3):
    env, client, ec2, instance = s3
    _protect(client)
    client.put_object(Bucket=BUCKET, Key=f"{KEY}/kimi-fleet-fill-failed.txt", Body=b"hf: 401 Unauthorized\n")
    failed = _wait(env, instance)
    assert failed.returncode == 1 and "the fill failed" in failed.stderr and "401 Unauthorized" in failed.stderr
    client.delete_object(Bucket=BUCKET, Key=f"{KEY}/kimi-fleet-fill-failed.txt")
    ec2.terminate_instances(InstanceIds=[instance])
    ended = _wait(env, instance)
    assert ended.returncode == 1 and "is terminated" in ended.stderr and "did not finish" in ended.stderr


def test_the_wait_succeeds_on_this_revisions_manifest_only(s3):
    """(The Hub check of the manifest and its digest line: tests/test_manifest_pin.py.)"""
    import hashlib
    import http.server
    import threading

    from kimi_fleet.mirror import manifest_sha256_from
    from kimi_fleet.node_scripts.weights_manifest import manifest_document
    from tests.test_manifest_pin import CHECKPOINT, _Hub

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env, client, _, instance = s3
    env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}
    _protect(client)
    files = {p: (len(c), hashlib.sha256(c).hexdigest()) for p, c in CHECKPOINT.items()}
    manifest = manifest_document("moonshotai/Kimi-K2.6", "d" * 40, files)
    client.put_object(Bucket=BUCKET, Key=f"{KEY}/kimi-fleet-manifest.json", Body=json.dumps(manifest).encode())
    wrong = _wait(env, instance)
    assert wrong.returncode == 1 and "describes moonshotai/Kimi-K2.6@" + "d" * 40 in wrong.stderr
    manifest["revision"] = "c" * 40
    body = json.dumps(manifest).encode()
    client.put_object(Bucket=BUCKET, Key=f"{KEY}/kimi-fleet-manifest.json", Body=body)
    done = _wait(env, instance)
    hub.shutdown()
    assert done.returncode == 0, done.stderr
    assert f"mirror: filled: {len(CHECKPOINT)} files" in done.stdout
    assert manifest_sha256_from(done.stdout) == hashlib.sha256(body).hexdigest()
