"""Key rotation without 401s (issue 20, item 5): both keys are accepted while clients move, the old
one is dropped when the stack says so, and the plan says "API key rotated", not "Unchanged".

Under the mocks on every target (what the nodes, pods and host receive), against a real Caddy (both
keys open the endpoint; a missing previous key fails closed), through the node's own key script,
and in the plan's words."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from kimi_fleet import key_rotation
from kimi_fleet.caddy import render_caddyfile
from kimi_fleet.key_rotation import check_rotation
from kimi_fleet.spec import ApiKeyRotationSpec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.test_caddy import needs_caddy
from tooling.mock_run import MockRun, run_config

SINGLE_NODE = "h200-int4-sglang"
FLEET = "b300-int4-sglang"
KUBERNETES = "gb200-int4-vllm"
HOST = "rtxpro6000-int4-sglang"
PASSWORD = "random:index/randomPassword:RandomPassword"
SSM_PARAMETER = "aws:ssm/parameter:Parameter"


def rotated(generation: int, accept_previous: bool):
    def change(config: dict) -> None:
        config["kimi-fleet:apiKeyRotation"] = {"generation": generation, "acceptPrevious": accept_previous}
    return change


def run_stack(stack: str, tmp_path: Path, change=None, *, secrets: dict[str, str] | None = None) -> MockRun:
    """The whole program for `stack` (its file changed by `change`), secrets revealed; `secrets`
    are plain values for secure keys (the mocks cannot decrypt the stack file's)."""
    document = yaml.safe_load(stack_file(stack).read_text())
    if change:
        change(document["config"])
    directory = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    path = directory / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_stack_config(path)
    config.pulumi_config.update(secrets or {})
    return run_config(config, reveal_secrets=True)


def ok(run: MockRun) -> MockRun:
    assert run.error is None, run.error
    return run


def revealed(value):
    assert isinstance(value, dict) and value.get("secret") is True, value
    return value["value"]


def unwrapped(value):
    """A value that may be secret as a whole (the mocks reveal it as {"secret": true, "value": ...})."""
    return value["value"] if isinstance(value, dict) and value.get("secret") is True else value


def passwords(run: MockRun) -> dict[str, dict]:
    return {r["name"]: r["inputs"] for r in run.of_type(PASSWORD)}


def parameter_values(run: MockRun) -> dict[str, str]:
    return {p["inputs"]["name"]: revealed(p["inputs"]["value"]) for p in run.of_type(SSM_PARAMETER)
            if p["inputs"]["type"] == "SecureString"}


def bundle_files(run: MockRun) -> dict[str, str]:
    (bundle,) = [b for b in run.of_type("aws:s3/bucketObjectv2:BucketObjectv2") if "files" in b["inputs"]["content"]]
    return {entry["path"]: entry["content"] for entry in json.loads(bundle["inputs"]["content"])["files"]}


def gate_environment(run: MockRun) -> dict:
    (gate,) = [c for c in run.of_type("command:local:Command") if c["name"].endswith("-gate-verify")]
    return gate["inputs"]["environment"]


# --- the generated key: two slots that take turns ---------------------------------------------

def test_a_stack_that_never_rotates_keeps_its_one_key_resource(tmp_path):
    run = ok(run_stack(SINGLE_NODE, tmp_path))
    assert set(passwords(run)) == {"kimi-api-key", "kimi-api-key-fingerprint-salt"}
    assert "keepers" not in passwords(run)["kimi-api-key"], "a keeper on the original key would regenerate it"
    assert "/kimi-fleet/h200-int4-sglang/api-key-previous" not in parameter_values(run)


def test_each_rotation_regenerates_one_slot_and_the_other_keeps_the_previous_key(tmp_path):
    runs = [ok(run_stack(SINGLE_NODE, tmp_path, rotated(g, True) if g else None)) for g in (0, 1, 2)]
    keys = [revealed(run.outputs["api_key"]) for run in runs]
    assert len(set(keys)) == 3, "every generation is a new key"
    slots = [passwords(run) for run in runs]
    # Generation 1: slot A untouched (its inputs as at generation 0: the engine keeps its value),
    # slot B new. Generation 2: slot A regenerated, slot B untouched.
    assert slots[1]["kimi-api-key"] == slots[0]["kimi-api-key"]
    assert slots[1]["kimi-api-key-b"]["keepers"] == {"generation": "1"}
    assert slots[2]["kimi-api-key-b"] == slots[1]["kimi-api-key-b"]
    assert slots[2]["kimi-api-key"]["keepers"] == {"generation": "2"}
    prefix = f"/kimi-fleet/{SINGLE_NODE}"
    for generation in (1, 2):
        values = parameter_values(runs[generation])
        assert values[f"{prefix}/api-key"] == keys[generation]
        assert values[f"{prefix}/api-key-previous"] == keys[generation - 1]
        assert revealed(gate_environment(runs[generation])["KIMI_API_KEY_PREVIOUS"]) == keys[generation - 1]
    fingerprints = [run.outputs["api_key_fingerprint"] for run in runs]
    assert len(set(fingerprints)) == 3 and all(f.startswith("hmac-sha256:") and len(f) == 20 for f in fingerprints)
    assert not any(key in json.dumps(run.outputs["api_key_fingerprint"]) for run, key in zip(runs, keys))


def test_the_node_gets_the_previous_key_by_version_and_caddy_accepts_it_until_retired(tmp_path):
    accepting = bundle_files(ok(run_stack(SINGLE_NODE, tmp_path, rotated(1, True))))
    env = accepting["/etc/kimi-fleet/node.env"]
    assert f"SSM_PREVIOUS_API_KEY_PARAMETER=/kimi-fleet/{SINGLE_NODE}/api-key-previous\n" in env
    assert "PREVIOUS_API_KEY_FILE=/etc/kimi-fleet/secrets/api-key-previous\n" in env
    assert any(line.startswith("SSM_PREVIOUS_API_KEY_VERSION=") and line.split("=")[1].isdigit()
               for line in env.splitlines())
    assert '\t\theader Authorization "Bearer {env.KIMI_API_KEY_PREVIOUS}"' in accepting["/etc/caddy/Caddyfile"]

    (parameter,) = [p for p in ok(run_stack(SINGLE_NODE, tmp_path, rotated(1, True))).of_type(SSM_PARAMETER)
                    if p["inputs"]["name"].endswith("/api-key-previous")]
    # Its versions outlive the rotation: a node booting an older bundle reads the key it names.
    assert parameter["retain_on_delete"] is True and parameter["inputs"]["overwrite"] is True

    retired_run = ok(run_stack(SINGLE_NODE, tmp_path, rotated(1, False)))
    retired = bundle_files(retired_run)
    assert "PREVIOUS_API_KEY_FILE=\n" in retired["/etc/kimi-fleet/node.env"]
    assert "SSM_PREVIOUS_API_KEY_PARAMETER=\n" in retired["/etc/kimi-fleet/node.env"]
    assert "KIMI_API_KEY_PREVIOUS" not in retired["/etc/caddy/Caddyfile"]
    assert f"/kimi-fleet/{SINGLE_NODE}/api-key-previous" not in parameter_values(retired_run)
    assert "KIMI_API_KEY_PREVIOUS" not in gate_environment(retired_run)


def test_a_fleet_rolls_the_overlap_out_with_its_release(tmp_path):
    """A fleet's nodes read the release from the template's tag: the overlap is a new release, so
    the refresh that brings the new key brings the previous one with it."""
    before = ok(run_stack(FLEET, tmp_path))
    after = ok(run_stack(FLEET, tmp_path, rotated(1, True)))
    assert before.outputs["release"] != after.outputs["release"] or \
        bundle_files(before) != bundle_files(after)
    assert "KIMI_API_KEY_PREVIOUS" in bundle_files(after)["/etc/caddy/Caddyfile"]


def test_kubernetes_pods_take_both_keys_from_the_one_secret(tmp_path):
    run = ok(run_stack(KUBERNETES, tmp_path, rotated(1, True)))
    (secret,) = [s for s in run.of_type("kubernetes:core/v1:Secret") if s["inputs"]["metadata"]["name"] == "kimi-api-key"]
    data = {key: unwrapped(value) for key, value in unwrapped(secret["inputs"]["stringData"]).items()}
    assert set(data) == {"api-key", "api-key-previous"} and data["api-key"] != data["api-key-previous"]
    (deployment, *_) = run.of_type("kubernetes:apps/v1:Deployment")
    pod = deployment["inputs"]["spec"]["template"]["spec"]
    (proxy,) = [c for c in pod["containers"] if c["name"] == "proxy"]
    previous_env = {"name": "KIMI_API_KEY_PREVIOUS", "valueFrom": {"secretKeyRef": {
        "name": "kimi-api-key", "key": "api-key-previous", "optional": True}}}
    assert previous_env in proxy["env"]
    # The same template before, during and after the overlap: a pod of any ReplicaSet that (re)starts
    # reads the keys the Secret holds now, as the Caddyfile it reads now expects.
    plain = ok(run_stack(KUBERNETES, tmp_path))
    (plain_deployment, *_) = plain.of_type("kubernetes:apps/v1:Deployment")
    (plain_proxy,) = [c for c in plain_deployment["inputs"]["spec"]["template"]["spec"]["containers"]
                      if c["name"] == "proxy"]
    assert plain_proxy["env"] == proxy["env"]
    # The tenants' proxies (the metrics gate's Caddyfile holds no API key by design: it serves only the
    # loopback metrics, to the monitoring namespace's Prometheus).
    from kimi_fleet.k8s_manifests import METRICS_GATE_CONFIGMAP
    caddyfiles = [c for c in run.of_type("kubernetes:core/v1:ConfigMap") if "Caddyfile" in (c["inputs"].get("data") or {})
                  and not c["inputs"]["metadata"]["name"].startswith(METRICS_GATE_CONFIGMAP)]
    assert caddyfiles and all("KIMI_API_KEY_PREVIOUS" in c["inputs"]["data"]["Caddyfile"] for c in caddyfiles)


def test_an_existing_host_gets_the_previous_key_as_a_root_only_file(tmp_path):
    secrets = {"kimi-fleet:sshHost": "203.0.113.7", "kimi-fleet:sshPrivateKey": "not-a-real-key"}
    run = ok(run_stack(HOST, tmp_path, rotated(1, True), secrets=secrets))
    copies = {c["name"]: c["inputs"] for c in run.of_type("command:remote:Command")}
    (previous,) = [inputs for name, inputs in copies.items() if name.endswith("-secret-api-key-previous")]
    assert "/var/lib/kimi-fleet/incoming-secrets/api-key-previous" in previous["create"] and "600" in previous["create"]
    assert "/etc/kimi-fleet/secrets/api-key-previous" in previous["delete"]  # removed with the rotation
    assert previous["logging"] == "none"
    retired = ok(run_stack(HOST, tmp_path, rotated(1, False), secrets=secrets))
    assert not [c for c in retired.of_type("command:remote:Command") if c["name"].endswith("-secret-api-key-previous")]


# --- a chosen key -----------------------------------------------------------------------------

CHOSEN = "chosen-key-0123456789abcdef"
CHOSEN_PREVIOUS = "chosen-old-key-fedcba9876543210"


def test_a_chosen_key_rotates_with_its_previous_key_set_beside_it(tmp_path):
    run = ok(run_stack(SINGLE_NODE, tmp_path, rotated(0, True), secrets={
        "kimi-fleet:apiKey": CHOSEN, "kimi-fleet:apiKeyPrevious": CHOSEN_PREVIOUS}))
    values = parameter_values(run)
    assert values[f"/kimi-fleet/{SINGLE_NODE}/api-key"] == CHOSEN
    assert values[f"/kimi-fleet/{SINGLE_NODE}/api-key-previous"] == CHOSEN_PREVIOUS
    assert set(passwords(run)) == {"kimi-api-key-fingerprint-salt"}, "a chosen key generates no key"


@pytest.mark.parametrize("rotation, secrets, says", [
    ((0, True), {}, "acceptPrevious is true at generation 0"),
    ((1, False), {"kimi-fleet:apiKey": CHOSEN}, "apiKeyRotation.generation is 1 with a chosen kimi-fleet:apiKey"),
    ((0, False), {"kimi-fleet:apiKey": CHOSEN, "kimi-fleet:apiKeyPrevious": CHOSEN_PREVIOUS},
     "apiKeyPrevious is set but apiKeyRotation.acceptPrevious is false"),
    ((0, True), {"kimi-fleet:apiKey": CHOSEN}, "no kimi-fleet:apiKeyPrevious"),
    ((1, True), {"kimi-fleet:apiKeyPrevious": CHOSEN_PREVIOUS}, "kimi-fleet:apiKey is not"),
    ((0, True), {"kimi-fleet:apiKey": CHOSEN, "kimi-fleet:apiKeyPrevious": "short"}, "16-256 characters"),
])
def test_a_rotation_that_cannot_be_carried_out_is_refused_before_anything_is_declared(tmp_path, rotation, secrets,
                                                                                         says):
    run = run_stack(SINGLE_NODE, tmp_path, rotated(*rotation), secrets=secrets)
    assert run.error is not None and says in run.error, run.error
    assert not run.resources
    assert CHOSEN_PREVIOUS not in run.error and "short" not in run.error.split("characters")[0]


def test_check_rotation_names_the_stack_file():
    with pytest.raises(ValueError, match=r"^stacks/Pulumi.x.yaml: apiKeyRotation.acceptPrevious"):
        check_rotation(ApiKeyRotationSpec(accept_previous=True), "stacks/Pulumi.x.yaml", chosen=False, previous=False)


# --- a real Caddy, the node's key script ---------------------------------------------------

@needs_caddy
@pytest.mark.parametrize("previous_set", [True, False], ids=["both-keys", "previous-key-missing"])
def test_caddy_accepts_both_keys_during_the_overlap_and_fails_closed_without_the_previous(previous_set):
    from tests.fakes.harness import free_port, start_caddy, start_fake_engine

    current, previous = "current-key-1234567890abcdef", "previous-key-1234567890abcdef"
    https_port, http_port = free_port(), free_port()
    env = {"KIMI_API_KEY": current, **({"KIMI_API_KEY_PREVIOUS": previous} if previous_set else {})}
    url = f"https://localhost:{https_port}/v1/models"
    with start_fake_engine("good") as engine:
        caddyfile = render_caddyfile("localhost", [engine.upstream], engine.health_uri, tls="internal",
                                     https_port=https_port, http_port=http_port, bind_host="127.0.0.1",
                                     previous_key_env="KIMI_API_KEY_PREVIOUS")
        with start_caddy(caddyfile, env, ready_url=url) as caddy:
            with httpx.Client(verify=caddy.ssl_context(), timeout=10) as client:
                statuses = {label: client.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}).status_code
                            for label, key in (("current", current), ("previous", previous), ("wrong", "w" * 20),
                                               ("none", None), ("empty", ""))}
    if previous_set:
        assert statuses == {"current": 200, "previous": 200, "wrong": 401, "none": 401, "empty": 401}
    else:  # a configuration that names a previous key it does not have refuses everything
        assert set(statuses.values()) == {401}


def _key_script_root(tmp_path: Path, previous_file: str | None, files: dict[str, str]) -> tuple[Path, Path]:
    from tests.test_node_files import node_files

    rendered = node_files(SINGLE_NODE)
    root = tmp_path / "root"
    library = root / "usr/local/lib/kimi-fleet/settings.sh"
    library.parent.mkdir(parents=True)
    library.write_text(rendered["/usr/local/lib/kimi-fleet/settings.sh"].content)
    (root / "usr/local/lib/kimi-fleet/node_status.py").write_text("import sys\nsys.exit(0)\n")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    env = rendered["/etc/kimi-fleet/node.env"].content
    env = env.replace("API_KEY_FILE=/etc/kimi-fleet/secrets/api-key\n", f"API_KEY_FILE={secrets_dir}/api-key\n")
    env = env.replace("PREVIOUS_API_KEY_FILE=\n", f"PREVIOUS_API_KEY_FILE={secrets_dir}/{previous_file}\n"
                      if previous_file else "PREVIOUS_API_KEY_FILE=\n")
    (root / "etc/kimi-fleet").mkdir(parents=True)
    (root / "etc/kimi-fleet/node.env").write_text(env)
    for name, content in files.items():
        (secrets_dir / name).write_text(content)
    script = tmp_path / "kimi-caddy-env"
    script.write_text(rendered["/usr/local/sbin/kimi-caddy-env"].content)
    return root, script


@pytest.mark.parametrize("case", ["overlap", "no-overlap", "previous-missing", "previous-malformed"])
def test_the_node_hands_caddy_the_keys_it_accepts_and_refuses_a_missing_previous_key(tmp_path, case):
    current, previous = "current-key-1234567890abcdef", "previous-key-1234567890abcdef"
    files = {"api-key": current}
    if case in ("overlap", "previous-malformed"):
        files["api-key-previous"] = previous if case == "overlap" else "x" * 20 + "*"
    root, script = _key_script_root(tmp_path, None if case == "no-overlap" else "api-key-previous", files)
    # Under the test's own root (a node has no KIMI_ROOT: /run/kimi-fleet/caddy.env), never the machine's,
    # which other tests' runs of the same script may write at the same time under pytest-xdist.
    env_file = root / "run/kimi-fleet/caddy.env"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "KIMI_ROOT": str(root)})
    if case == "overlap":
        assert result.returncode == 0, result.stderr
        assert env_file.read_text() == f"KIMI_API_KEY={current}\nKIMI_API_KEY_PREVIOUS={previous}\n"
    elif case == "no-overlap":
        assert result.returncode == 0, result.stderr
        assert env_file.read_text() == f"KIMI_API_KEY={current}\n"
    else:
        assert result.returncode != 0 and not env_file.exists()
        assert "refused" in result.stderr or "No such file" in result.stderr
        assert previous not in result.stderr and "*" not in result.stderr.split("refused")[0]
    env_file.unlink(missing_ok=True)


# --- what the plan and the PR diff say ---------------------------------------------------------

def test_the_plan_diff_says_rotated_retired_or_nothing():
    generated = {"source": "generated", "generation": 0, "accept_previous": False,
                 "fingerprint": "generation 0", "previous_fingerprint": None}
    rotated_with_overlap = {**generated, "generation": 1, "fingerprint": "generation 1", "accept_previous": True}
    rotated_without = {**rotated_with_overlap, "accept_previous": False}
    [line] = key_rotation.rotation_lines(generated, rotated_with_overlap)
    assert line.startswith("**API key rotated** (generation 0 → 1)") and "stays accepted" in line
    [line] = key_rotation.rotation_lines(generated, rotated_without)
    assert "**no overlap**" in line and "401" in line
    [line] = key_rotation.rotation_lines(rotated_with_overlap, rotated_without)
    assert line.startswith("**previous API key retired**")
    assert key_rotation.rotation_lines(generated, dict(generated)) == []
    chosen = {"source": "chosen", "generation": 0, "accept_previous": False, "fingerprint": "sha256:aaaa",
              "previous_fingerprint": None}
    [line] = key_rotation.rotation_lines(chosen, {**chosen, "fingerprint": "sha256:bbbb"})
    assert "kimi-fleet:apiKey set anew" in line


@pytest.mark.parametrize("before, after, accept, refused", [
    (0, 1, True, False), (1, 2, True, False), (2, 2, True, False), (3, 3, False, False),
    (0, 2, True, True), (1, 3, False, True), (3, 2, True, True), (2, 0, False, True),
])
def test_a_generation_that_does_not_step_by_one_is_refused_by_the_plan_diff(before, after, accept, refused):
    """0 → 2 regenerates both slots and 3 → 2 regenerates the one clients use: the previous key would
    be one nobody holds. The PR diff refuses it (plan.py --diff exits 2)."""
    from tooling.plan_diff import diff_refused

    def facts(generation, accept_previous):
        return {"source": "generated", "generation": generation, "accept_previous": accept_previous,
                "fingerprint": f"generation {generation}", "previous_fingerprint": None}

    lines = key_rotation.rotation_lines(facts(before, False), facts(after, accept))
    assert any(line.startswith(key_rotation.REFUSED) for line in lines) is refused, lines
    assert diff_refused("\n".join(f"- {line}" for line in lines)) is refused
    chosen = {**facts(0, False), "source": "chosen", "fingerprint": "sha256:aaaa"}
    assert key_rotation.rotation_refusals(chosen, facts(0, True)) and not key_rotation.rotation_refusals(
        chosen, facts(0, False))


def test_the_plan_reads_a_re_set_chosen_key_from_its_ciphertext_never_the_key(tmp_path):
    def facts(ciphertext: str) -> dict:
        document = yaml.safe_load(stack_file(SINGLE_NODE).read_text())
        document["config"]["kimi-fleet:apiKey"] = {"secure": ciphertext}
        path = tmp_path / ciphertext / f"Pulumi.{SINGLE_NODE}.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(document))
        config = load_stack_config(path)
        return key_rotation.api_key_facts(config.spec(), config.secure_fingerprints)

    first, second = facts("v1:AAAAcipher1"), facts("v1:AAAAcipher2")
    assert first["source"] == "chosen" and first["fingerprint"] != second["fingerprint"]
    assert "cipher1" not in first["fingerprint"]
    assert key_rotation.rotation_lines(first, second)[0].startswith("**API key rotated**")


# --- the gate's auth check -----------------------------------------------------------------------

@pytest.mark.parametrize("accepted_by_endpoint, passes", [({"new", "old"}, True), ({"new"}, False)])
def test_the_gate_wants_the_previous_key_accepted_during_the_overlap(accepted_by_endpoint, passes):
    import asyncio

    from kimi_fleet.verification.checks import check_auth
    from kimi_fleet.verification.client import Endpoint

    keys = {"new": "new-key-0123456789abcdef", "old": "old-key-0123456789abcdef"}
    accepted = {f"Bearer {keys[name]}" for name in accepted_by_endpoint}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") in accepted:
            return httpx.Response(200, json={"object": "list", "data": []})
        return httpx.Response(401, json={"error": {"message": "missing or invalid API key"}})

    endpoint = Endpoint("https://kimi.test/v1", keys["new"], "kimi-k2.6", "vllm", 10, True,
                        previous_api_key=keys["old"])

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await check_auth(client, endpoint)

    outcome = asyncio.run(run())
    assert (outcome.status == "pass") is passes, outcome
    if not passes:
        assert outcome.reason == "request with the previous key got 401 (expected 200)"
    assert keys["old"] not in repr(endpoint)


# --- a release that retires the previous key, then fails ------------------------------------------

def test_a_failed_release_that_retired_the_previous_key_gets_it_back(tmp_path, monkeypatch):
    """Release N accepts the previous key; N+1 retires it (its bootstrap removes the file) and fails:
    the restore puts N's previous key back, so N's Caddy starts with both keys again."""
    from kimi_fleet.node_scripts import apply_release

    monkeypatch.setattr(apply_release, "ROOT", tmp_path)
    key_file, previous_file = "/etc/kimi-fleet/secrets/api-key", "/etc/kimi-fleet/secrets/api-key-previous"
    live = tmp_path / "etc/kimi-fleet"
    (live / "secrets").mkdir(parents=True)
    (live / "node.env").write_text(f"API_KEY_FILE={key_file}\nHF_TOKEN_FILE=\nPREVIOUS_API_KEY_FILE={previous_file}\n")
    (tmp_path / key_file.lstrip("/")).write_text("key-of-release-n")
    (tmp_path / previous_file.lstrip("/")).write_text("previous-key-of-release-n")
    staged = tmp_path / "stage"
    (staged / "etc/kimi-fleet/secrets").mkdir(parents=True)
    (staged / "etc/kimi-fleet/node.env").write_text(f"API_KEY_FILE={key_file}\nHF_TOKEN_FILE=\nPREVIOUS_API_KEY_FILE=\n")
    (staged / key_file.lstrip("/")).write_text("key-of-release-n-plus-1")

    replaced = apply_release.take_secrets(staged, apply_release.secret_paths(staged), apply_release.secret_paths(tmp_path))
    assert (tmp_path / key_file.lstrip("/")).read_text() == "key-of-release-n-plus-1"
    (tmp_path / previous_file.lstrip("/")).unlink()  # what N+1's bootstrap does with a retired key
    apply_release.put_back_secrets(replaced)
    assert (tmp_path / key_file.lstrip("/")).read_text() == "key-of-release-n"
    assert (tmp_path / previous_file.lstrip("/")).read_text() == "previous-key-of-release-n"
    assert oct((tmp_path / previous_file.lstrip("/")).stat().st_mode & 0o777) == "0o600"
