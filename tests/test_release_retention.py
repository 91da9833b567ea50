"""Issue 20: what a node needs is where it needs it. The release bucket keeps the last
RETAINED_BUNDLES bundles (a node launched from an older template version boots its own), and the
API key is refused where it is set (the stack or the secret), with the same rule the node's proxy
applies, rather than by the proxy after the deploy."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import pulumi
import pytest
from moto import mock_aws

from components.node_release import (BUNDLE_PREFIX, RETAINED_BUNDLES, prune_bundles, prune_command)
from kimi_fleet import node_files
from tests.test_aws_stacks import resolved, run_endpoint

BUNDLE = "aws:s3/bucketObjectv2:BucketObjectv2"
COMMAND = "command:local:Command"
REPO = Path(__file__).resolve().parents[1]


@mock_aws
def test_the_bucket_keeps_the_newest_bundles_and_always_the_current_one():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="releases")
    s3.put_object(Bucket="releases", Key="other/kept.txt", Body=b"not a bundle")
    keys = [f"{BUNDLE_PREFIX}{n:064x}.json" for n in range(6)]
    for key in keys:  # oldest first: LastModified has a resolution of one second
        s3.put_object(Bucket="releases", Key=key, Body=b"{}")
        time.sleep(1.05)
    deleted = prune_bundles(s3, "releases", keep=3, current_key=keys[0])  # a rollback to the oldest
    assert sorted(deleted) == sorted(keys[1:3])
    left = {item["Key"] for item in s3.list_objects_v2(Bucket="releases")["Contents"]}
    assert left == {keys[0], *keys[3:], "other/kept.txt"}
    # Pruned again: the newest three and the current one are what is left, nothing goes.
    assert prune_bundles(s3, "releases", keep=3, current_key=keys[0]) == []
    # The pointer moves on to the newest: the one rolled back to is now simply the oldest.
    assert prune_bundles(s3, "releases", keep=3, current_key=keys[5]) == [keys[0]]
    with pytest.raises(ValueError):
        prune_bundles(s3, "releases", keep=0, current_key=keys[0])


@mock_aws
def test_failed_releases_in_a_row_never_prune_the_bundle_the_nodes_run():
    """A fleet the gate kept on its last good version while eleven new releases failed: the pointer
    names the newest, the newest RETAINED_BUNDLES are failures, and the bundle the running nodes
    name (their release tag) is kept; another stack's instances protect nothing here."""
    from components.node_release import STACK_TAG, bundles_in_use
    from kimi_fleet.boot_stub import RELEASE_TAG

    s3 = boto3.client("s3", region_name="us-east-1")
    ec2 = boto3.client("ec2", region_name="us-east-1")
    s3.create_bucket(Bucket="releases")
    digests = [f"{n:064x}" for n in range(RETAINED_BUNDLES + 2)]
    for digest in digests:  # the first is the last good release; all later ones failed the gate
        s3.put_object(Bucket="releases", Key=f"{BUNDLE_PREFIX}{digest}.json", Body=b"{}")
        time.sleep(1.05)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    for stack, digest in (("fleet", digests[0]), ("fleet", digests[0]), ("other", digests[1])):
        ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [{"Key": STACK_TAG, "Value": stack}, {"Key": RELEASE_TAG, "Value": digest}]}])
    in_use = bundles_in_use(ec2, "fleet")
    assert in_use == {f"{BUNDLE_PREFIX}{digests[0]}.json"}
    deleted = prune_bundles(s3, "releases", keep=RETAINED_BUNDLES, current_key=f"{BUNDLE_PREFIX}{digests[-1]}.json",
                            in_use=in_use)
    assert deleted == [f"{BUNDLE_PREFIX}{digests[1]}.json"]
    left = {item["Key"] for item in s3.list_objects_v2(Bucket="releases")["Contents"]}
    assert f"{BUNDLE_PREFIX}{digests[0]}.json" in left and len(left) == RETAINED_BUNDLES + 1


def test_a_replaced_bundle_is_retained_and_each_release_prunes_to_k():
    run = run_endpoint(resolved("h200-int4-sglang"))
    (bundle,) = run.of_type(BUNDLE)
    # Replacing the object (a new release's key) must not delete the old bundle: older template
    # versions still name it.
    assert bundle["retain_on_delete"] is True
    (prune,) = [c for c in run.of_type(COMMAND) if c["name"].endswith("-release-prune")]
    digest = bundle["inputs"]["key"].removeprefix(BUNDLE_PREFIX).removesuffix(".json")
    assert prune["inputs"]["create"].endswith(f"--keep {RETAINED_BUNDLES} --current {BUNDLE_PREFIX}{digest}.json "
                                              "--stack h200-int4-sglang")
    assert prune["inputs"]["triggers"] == [digest]
    assert RETAINED_BUNDLES >= 2  # at least the previous release


def test_the_prune_command_runs_as_written(tmp_path):
    """The command string Pulumi runs parses with the module's own command line (no cloud call)."""
    from components.node_release import main

    command = prune_command("b", "us-east-1", "releases/x.json", "s").split()
    assert command[:3] == [".venv/bin/python", "-m", "components.node_release"]
    with pytest.raises(SystemExit):
        main(["prune", "--bucket", "b"])  # missing arguments are refused


@pytest.mark.parametrize("key", ["my-key!", "abcdefghijklmnop*", "x" * 20 + "{env.HOME}"])
def test_a_secret_with_a_key_the_proxy_cannot_use_is_refused_where_it_is_set(key):
    from components.node_secrets import NodeSecrets, NodeSecretsArgs
    from tooling.mock_run import run_components

    def declare():
        secrets = NodeSecrets("s", NodeSecretsArgs(prefix="/kimi-fleet/x", api_key=pulumi.Output.secret(key),
                                                   hf_token=None, tags={}))
        return {"parameter": secrets.api_key_parameter}

    with pytest.raises(Exception) as refused:
        run_components(declare, "x")
    assert "must be 16-256 characters" in str(refused.value) and key not in str(refused.value)


def test_a_good_key_is_stored():
    from components.node_secrets import NodeSecrets, NodeSecretsArgs
    from tooling.mock_run import run_components

    def declare():
        secrets = NodeSecrets("s", NodeSecretsArgs(prefix="/kimi-fleet/x", api_key=pulumi.Output.secret("k" * 40),
                                                   hf_token=None, tags={}))
        return {"parameter": secrets.api_key_parameter}

    run = run_components(declare, "x")
    (parameter,) = run.of_type("aws:ssm/parameter:Parameter")
    assert parameter["inputs"]["type"] == "SecureString"


def test_the_node_refuses_a_key_caddy_cannot_use_in_one_line_without_the_key(tmp_path):
    """The proxy's pre-start (kimi-caddy-env) on a key that reached the node anyway: one line saying
    what and what to do, the same in the node status, and never the key itself."""
    files = {path: f for path, f in node_files.render_node_files(
        *_stack("h200-int4-sglang"), secrets=node_files.SecretsSource("files"), ebs_volume_id="vol-1").items()}
    root = tmp_path / "root"
    for path in (node_files.SETTINGS_LIBRARY, node_files.NODE_STATUS, node_files.NODE_ENV_FILE):
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(files[path].content)
    key_file = tmp_path / "api-key"
    key_file.write_text("my-key!")
    node_env = root / node_files.NODE_ENV_FILE.lstrip("/")
    node_env.write_text(node_env.read_text().replace(f"API_KEY_FILE={node_files.API_KEY_FILE}",
                                                     f"API_KEY_FILE={key_file}"))
    script = tmp_path / "kimi-caddy-env"
    script.write_text(files["/usr/local/sbin/kimi-caddy-env"].content)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "KIMI_ROOT": str(root)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kimi-caddy-env: refused: the API key in {key_file} is not "
                                                  "16-256 characters") and "restart caddy" in lines[0]
    assert "my-key!" not in result.stderr
    refused = json.loads((root / "run/kimi-fleet/status.json").read_text())["refused"]
    assert refused["by"] == "caddy.service" and "my-key!" not in refused["reason"]


def _stack(name: str):
    from kimi_fleet.launch import render_launch
    from kimi_fleet.sizing import size

    r = resolved(name)
    return r, render_launch(r), size(r)


@pytest.mark.parametrize("target", ["host", "kubernetes"])
def test_every_target_refuses_a_key_its_proxy_cannot_use_where_it_is_set(target):
    """The same rule on a host (the key file the deploy copies) and on Kubernetes (the Secret)."""
    bad = "my-key-is-long-enough!"
    with pytest.raises(Exception) as refused:
        if target == "host":
            from tests.test_host_target import resolved as host_resolved, run_host_endpoint
            run_host_endpoint_with_key(host_resolved("rtxpro6000-int4-sglang"), bad, run_host_endpoint)
        else:
            from tests.test_k8s_component import run_kubernetes_endpoint
            run_kubernetes_endpoint("mi355x-int4-sglang", api_key=bad)
    assert "must be 16-256 characters" in str(refused.value) and bad not in str(refused.value)


def run_host_endpoint_with_key(r, key, runner):
    import tests.test_host_target as host

    original = host.API_KEY
    host.API_KEY = key
    try:
        return runner(r)
    finally:
        host.API_KEY = original
