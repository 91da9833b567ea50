"""A fleet node's calls to its steward (kimi_fleet/node_scripts/steward_client.py, through the watchdog's
`steward`): the node's own scripts in a process of their own, its IMDSv2 on loopback (credentials of
the instance profile), a stub `aws` for the one SSM read, and the function URL on loopback that
authenticates the SigV4 signature by recomputing it with botocore (tests/fakes/steward.py) before
the real handler runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_fleet import health, node_files, node_metrics
from tests.fakes import steward as fake
from tests.fakes.imds import start_imds
from tests.test_node_metrics import _node_root

NODE_SCRIPTS = Path(node_files.__file__).parent / "node_scripts"
STACK = "h200-int4-vllm"  # an AWS fleet
REGION = "us-east-1"
ROLE = "kimi-h200-int4-vllm-node-role-0a1b2c"
INSTANCE, GROUP = "i-0123456789abcdef0", "kimi-h200-int4-vllm-group"
ENVIRONMENT = {"KIMI_STEWARD_GROUP": GROUP, "KIMI_STEWARD_NODE_ROLE_ARN": f"arn:aws:iam::{fake.ACCOUNT}:role/{ROLE}",
               "KIMI_STEWARD_ADMISSION_HOOK": health.ADMISSION_HOOK_NAME,
               "KIMI_STEWARD_DRAIN_HOOK": node_metrics.DRAIN_HOOK}
#: The stub `aws`: records its argv, answers the SSM read with the parameter's value from a file.
STUB_AWS = """#!{python}
import json, sys
open({calls!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["ssm", "get-parameter"]:
    print(open({value!r}).read())
"""
CALL = "import sys; sys.path.insert(0, sys.argv[1]); import watchdog; print(watchdog.steward(*sys.argv[2:]))"


@pytest.fixture
def node(tmp_path):
    root = tmp_path / "root"
    _node_root(root, STACK)
    bin_dir, value = tmp_path / "bin", tmp_path / "steward-url"
    bin_dir.mkdir()
    value.write_text(fake.function_url(REGION))
    (bin_dir / "aws").write_text(STUB_AWS.format(python=sys.executable, calls=str(tmp_path / "aws-calls"),
                                                 value=str(value)))
    (bin_dir / "aws").chmod(0o755)
    return {"root": root, "tmp": tmp_path, "url_value": value, "steward_calls": tmp_path / "steward-calls",
            "env": {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{bin_dir}:{os.environ['PATH']}"}}


def run(node, imds: str, endpoint: str, *args: str, on_start=None) -> subprocess.CompletedProcess:
    env = {**node["env"], "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds, "KIMI_STEWARD_ENDPOINT": endpoint}
    process = subprocess.Popen([sys.executable, "-c", CALL, str(NODE_SCRIPTS), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start:
        on_start(process)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_the_node_signs_its_request_and_its_credentials_stay_in_its_memory(node):
    """The URL's SigV4 signature matches botocore's for the same request; the body names the action
    only; the secret key and session token appear in no argv (the node's process, the aws CLI's), no
    environment and no file the call leaves."""
    verdicts, seen = [], {}
    client = {}

    def inspect_client(record):
        pid = client["process"].pid  # the caller waits for this answer: its process is alive
        seen["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")

    autoscaling = fake.RecordingAutoScaling(node["steward_calls"], lambda i: (GROUP, "Terminating:Wait"))
    with start_imds({"instance-id": INSTANCE, **fake.instance_metadata(ROLE)}) as imds, \
            fake.start_steward(REGION, ROLE, INSTANCE, autoscaling, ENVIRONMENT, verdicts, inspect_client) as url:
        done = run(node, imds, url, "complete-drain", "CONTINUE", on_start=lambda p: client.update(process=p))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"completed {node_metrics.DRAIN_HOOK} with CONTINUE"
    (record,) = verdicts
    assert record["authenticated"] and record["status"] == 200, record
    assert json.loads(record["body"]) == {"action": "complete-drain", "result": "CONTINUE"}
    assert fake.recorded(node["steward_calls"], "complete_lifecycle_action") == [{
        "operation": "complete_lifecycle_action", "AutoScalingGroupName": GROUP,
        "LifecycleHookName": node_metrics.DRAIN_HOOK, "InstanceId": INSTANCE, "LifecycleActionResult": "CONTINUE"}]
    secrets = (fake.CREDENTIALS["SecretAccessKey"], fake.CREDENTIALS["Token"])
    aws_argv = (node["tmp"] / "aws-calls").read_text()
    assert json.loads(aws_argv.splitlines()[0])[:4] == ["ssm", "get-parameter", "--name",
                                                        f"/kimi-fleet/{STACK}/steward-url"]
    for secret in secrets:
        assert secret not in seen["cmdline"] and secret not in seen["environ"] and secret not in aws_argv
        for path in node["tmp"].rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_a_wrong_signature_is_refused_by_the_url_and_nothing_is_done(node):
    """The check can fail: credentials the URL does not know (another secret) are a 403 before the
    handler, and the node reports the refusal."""
    verdicts = []
    wrong = {**fake.instance_metadata(ROLE)}
    wrong[f"iam/security-credentials/{ROLE}"] = json.dumps({**fake.CREDENTIALS, "SecretAccessKey": "not-the-key"})
    autoscaling = fake.RecordingAutoScaling(node["steward_calls"], lambda i: (GROUP, "InService"))
    with start_imds({"instance-id": INSTANCE, **wrong}) as imds, \
            fake.start_steward(REGION, ROLE, INSTANCE, autoscaling, ENVIRONMENT, verdicts) as url:
        done = run(node, imds, url, "protect")
    assert done.returncode != 0 and "the steward refused protect (403): Forbidden" in done.stderr
    assert [v["reason"] for v in verdicts] == ["signature mismatch"]
    assert not node["steward_calls"].exists()


@pytest.mark.parametrize("value", ["http://abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.on.aws/",
                                   "https://abcdefghijklmnopqrstuvwxyz012345.lambda-url.eu-west-1.on.aws/",
                                   "https://steward.example.com/", "https://x.lambda-url.us-east-1.on.aws.evil/"])
def test_a_parameter_that_is_not_a_function_url_of_the_nodes_region_gets_no_request(node, value):
    """The parameter is read as data: anything but a Lambda function URL in the node's region is refused
    before the credentials are read or signed for it."""
    node["url_value"].write_text(value)
    verdicts = []
    autoscaling = fake.RecordingAutoScaling(node["steward_calls"], lambda i: (GROUP, "InService"))
    with start_imds({"instance-id": INSTANCE, **fake.instance_metadata(ROLE)}) as imds, \
            fake.start_steward(REGION, ROLE, INSTANCE, autoscaling, ENVIRONMENT, verdicts) as url:
        done = run(node, imds, url, "protect")
    assert done.returncode != 0 and "not a Lambda function URL in us-east-1" in done.stderr
    assert verdicts == []


def test_the_handlers_refusal_reaches_the_node(node):
    """A signed request the steward refuses (no drain pending) is the node's error, with the reason."""
    autoscaling = fake.RecordingAutoScaling(node["steward_calls"], lambda i: (GROUP, "InService"))
    with start_imds({"instance-id": INSTANCE, **fake.instance_metadata(ROLE)}) as imds, \
            fake.start_steward(REGION, ROLE, INSTANCE, autoscaling, ENVIRONMENT) as url:
        done = run(node, imds, url, "complete-drain", "CONTINUE")
    assert done.returncode != 0
    assert f"the steward refused complete-drain (409): {INSTANCE} is InService, not Terminating:Wait" in done.stderr
    assert not node["steward_calls"].exists()


def test_node_env_names_the_parameter_the_stack_declares():
    from tests.test_node_metrics import files_of
    settings = dict(line.split("=", 1) for line in files_of(STACK)[node_files.NODE_ENV_FILE].content.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["STEWARD_URL_PARAMETER"] == node_files.steward_url_parameter(node_files.default_ssm_prefix(STACK))
    single = dict(line.split("=", 1) for line in files_of("h200-int4-sglang")[node_files.NODE_ENV_FILE].content
                  .splitlines() if "=" in line and not line.startswith("#"))
    assert single["STEWARD_URL_PARAMETER"] == ""  # one node: no group, no steward
