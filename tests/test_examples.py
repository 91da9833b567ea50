"""examples/client-deployment under Pulumi's mocks: a kimi-fleet stack's outputs, read through a
StackReference, reach a Kubernetes client; the API key stays a secret all the way."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pulumi
import pytest
from pulumi.runtime import mocks
from pulumi.runtime.sync_await import _sync_await

from tooling.mock_run import (EchoMocks, MockRun, RecordingMonitor, collect_outputs, forget_previous_run, is_secret,
                               secret_paths)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "client-deployment"
PROJECT = "kimi-fleet-client"
FLEET_STACK = "organization/kimi-fleet/h200-int4-sglang"
IMAGE = "registry.example.com/my-agent:1.4.2"
KEY = "fleet-key-0123456789abcdefghijklmnopqrstuvwxyz01"
FLEET_OUTPUTS = {
    "endpoint": "https://kimi-h200.example.com",
    "openai_base_url": "https://kimi-h200.example.com/v1",
    "model": "kimi-k2.6",
    "api_key": KEY,
    "api_key_fingerprint": "hmac-sha256:49ec2b67",
    "max_context_tokens": 262144,
}


class FleetMocks(EchoMocks):
    """Echo every resource; the StackReference answers with the fleet's outputs, as the engine does."""

    def __init__(self, outputs: dict, secret_names: list[str]):
        super().__init__()
        self.outputs, self.secret_names = outputs, secret_names
        self.referenced: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        if args.typ == "pulumi:pulumi:StackReference":
            self.referenced.append(args.resource_id)
            return args.resource_id, {"name": args.resource_id, "outputs": self.outputs,
                                      "secretOutputNames": self.secret_names}
        return super().new_resource(args)


def run_example(outputs: dict = FLEET_OUTPUTS, secret_names: list[str] | None = None) -> tuple[MockRun, FleetMocks]:
    run = MockRun("dev")
    fleet = FleetMocks(outputs, ["api_key"] if secret_names is None else secret_names)
    pulumi.runtime.set_all_config({f"{PROJECT}:fleetStack": FLEET_STACK, f"{PROJECT}:clientImage": IMAGE}, [])
    mocks.set_mocks(fleet, project=PROJECT, stack="dev", preview=False,
                    monitor=RecordingMonitor(run, fleet, reveal=True))
    forget_previous_run()

    def program():
        names = runpy.run_path(str(EXAMPLE / "__main__.py"), run_name="__pulumi_program__")
        _sync_await(collect_outputs(run, True))
        # The program's own key Output, before any provider wraps what it is given.
        run.outputs["(program api_key is secret)"] = _sync_await(names["api_key"].is_secret())

    _sync_await(mocks.run_pulumi_func(program))
    return run, fleet


def one(run: MockRun, typ: str) -> dict:
    (resource,) = run.of_type(typ)
    return resource


@pytest.mark.parametrize("secret_names", [["api_key"], []], ids=["fleet-marks-the-key-secret", "fleet-does-not"])
def test_outputs_flow_to_the_client_and_the_key_stays_secret(secret_names):
    run, fleet = run_example(secret_names=secret_names)
    assert fleet.referenced == [FLEET_STACK]
    # Secret in the program itself, whether or not the reference says so (and whatever the
    # Kubernetes provider does with a Secret's data on its own).
    assert run.outputs.pop("(program api_key is secret)") is True

    config_map = one(run, "kubernetes:core/v1:ConfigMap")
    assert config_map["inputs"]["data"] == {"OPENAI_BASE_URL": FLEET_OUTPUTS["openai_base_url"],
                                            "KIMI_MODEL": FLEET_OUTPUTS["model"]}
    assert not list(_secret_paths(config_map))

    secret = one(run, "kubernetes:core/v1:Secret")
    wire = secret["wire"]["stringData"]
    # The key crosses to the provider wrapped as a secret (the whole map or the value), with its value.
    assert is_secret(wire) or is_secret(wire.get("OPENAI_API_KEY")), wire
    assert KEY in json.dumps(wire)
    assert secret["inputs"]["stringData"] == {"secret": True, "value": {"OPENAI_API_KEY": KEY}} or \
        secret["inputs"]["stringData"] == {"OPENAI_API_KEY": {"secret": True, "value": KEY}}

    deployment = one(run, "kubernetes:apps/v1:Deployment")
    template = deployment["inputs"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["envFrom"] == [{"configMapRef": {"name": "kimi-endpoint"}},
                                    {"secretRef": {"name": "kimi-api-key"}}]
    assert config_map["inputs"]["metadata"]["name"] == "kimi-endpoint"
    assert secret["inputs"]["metadata"]["name"] == "kimi-api-key"
    assert template["metadata"]["annotations"] == {"kimi-fleet/api-key-fingerprint": FLEET_OUTPUTS["api_key_fingerprint"]}
    assert not list(_secret_paths(deployment)), "nothing secret in the Deployment: it names the Secret"

    # The stack's own outputs: the URL and the model, never the key.
    assert run.outputs == {"namespace": "kimi-client", "openai_base_url": FLEET_OUTPUTS["openai_base_url"],
                           "model": FLEET_OUTPUTS["model"]}
    assert KEY not in json.dumps(run.outputs)
    for resource in run.resources:
        if resource["type"] != "kubernetes:core/v1:Secret":
            assert KEY not in json.dumps(resource["inputs"]), resource["name"]


@pytest.mark.parametrize("missing", ["openai_base_url", "model", "api_key", "api_key_fingerprint"])
def test_a_fleet_stack_without_an_output_fails_the_program(missing):
    with pytest.raises(Exception, match=missing):
        run_example({k: v for k, v in FLEET_OUTPUTS.items() if k != missing})


def test_the_example_reads_outputs_the_fleet_program_exports():
    exported = set(re.findall(r'pulumi\.export\("(\w+)"', (ROOT / "__main__.py").read_text()))
    read = set(re.findall(r'_output\("(\w+)"\)', (EXAMPLE / "__main__.py").read_text()))
    assert read == {"openai_base_url", "model", "api_key", "api_key_fingerprint"}
    assert read <= exported, read - exported
    assert set(FLEET_OUTPUTS) <= exported


def test_the_example_pins_what_the_program_pins():
    def pins(path: Path) -> dict[str, str]:
        return dict(line.split("==") for line in path.read_text().splitlines() if "==" in line and not line.startswith("#"))

    example, program = pins(EXAMPLE / "requirements.txt"), pins(ROOT / "requirements.txt")
    assert example and all(program[name] == version for name, version in example.items()), (example, program)


def _secret_paths(resource: dict):
    return secret_paths(resource["wire"])
