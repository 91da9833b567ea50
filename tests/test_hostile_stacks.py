"""Hostile and careless stack files, generated from every stack in stacks/.

Each hostile variant must be refused by the planner (exit 2) with the file and the field named, no
traceback, within a time and memory bound; every benign variant that is accepted must render only
values of their allowed shape. Refusals go through `scripts/plan.py main()` in-process, the same
path as `python scripts/plan.py --stack-file F`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import re
import resource

import pytest

from tests.matrix import PLANNED_STACKS
import yaml

from kimi_fleet import node_metrics
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import PROJECT_ROOT, load_stack_config, stack_file, stack_names

PLAN = importlib.util.spec_from_file_location("plan_script", PROJECT_ROOT / "scripts" / "plan.py")
plan = importlib.util.module_from_spec(PLAN)
PLAN.loader.exec_module(plan)

PAYLOADS = [";id", "|id", "&&id", ">x", "$(id)", "`id`", "\nid", "{env.KIMI_API_KEY}", "%h", "\n---\nkind: Pod",
            '"', "'", "\x00", " --privileged", "\\", "#x", "/../../etc"]
#: free-text fields (path in the config, the field name an error must show) injected in every stack
FREE_TEXT = [
    ("model", "repo"), ("model", "servedName"), ("engine", "image"), ("engine", "moeBackend"),
    ("weights", "hostPath"), ("weights", "s3MirrorUri"), ("domain", None), ("acmeEmail", None),
    ("description", None),
]
TARGET_TEXT = {
    "aws": ["region", "ssmPrefix", "instanceType", "hostedZoneId", "keyName"],
    "kubernetes": ["namespace", "deviceClass", "storageClass", "kubeconfigContext"],
    "host": ["address", "user"],
}
PATH_LIKE = {"repo", "servedName", "image", "hostPath", "s3MirrorUri", "ssmPrefix"}
ABSURD = [float("inf"), float("-inf"), float("nan"), 1e-300, 1e308, -1, 10**15]
NUMERIC = [("weights", "downloadGbps"), ("weights", "ebsSizeGib"), ("budgetPerHourUsd", None),
           ("contextLength", None), ("acceleratorCount", None), ("capacity", "replicas")]
TYPOS = [("budget_per_hour_usd", "budgetPerHourUsd"), ("contextLenght", "contextLength"), ("acelerator", "accelerator")]
NESTED_TYPOS = [("engine", "memoryFractoin", "memoryFraction"), ("weights", "hostpath", "hostPath"),
                ("capacity", "worklaod", "workload")]
BOMB = "config:\n  kimi-fleet:description: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  kimi-fleet:d{i}: &a{i} [*{'a' if i == 0 else f'a{i - 1}'}, *{'a' if i == 0 else f'a{i - 1}'}]\n"
    for i in range(30))
RAW_DOCUMENTS = {
    "billion-laughs": BOMB,
    "deep-nesting": "config:\n  kimi-fleet:engine: " + "[" * 5000 + "]" * 5000 + "\n",
    "binary-tag": "config:\n  kimi-fleet:domain: !!binary aGVsbG8=\n",
    "timestamp": "config:\n  kimi-fleet:domain: 2026-12-01\n  kimi-fleet:accelerator: h200\n",
    "python-tag": "config:\n  kimi-fleet:domain: !!python/object/apply:os.system [id]\n",
    "top-level-list": "- config\n- x\n",
    "duplicate-key": "config:\n  kimi-fleet:domain: a.example.com\n  kimi-fleet:domain: b.example.com\n",
    "second-top-level-key": "config:\n  kimi-fleet:domain: a.example.com\nconfg:\n  x: 1\n",
    "unknown-namespace": "config:\n  kimifleet:domain: a.example.com\n",
    "no-namespace": "config:\n  domain: a.example.com\n",
    "merge-key": "config:\n  kimi-fleet:engine:\n    <<: {name: vllm}\n",
    "not-utf8": b"config:\n  kimi-fleet:domain: \xff\xfe\n",
}
#: libyaml's emitter where PyYAML has it (the same text as yaml.safe_dump, about 4x less CPU for the
#: ~3,900 variants); the pure-Python one otherwise.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _dump(value) -> str:
    return yaml.dump(value, Dumper=_DUMPER)


BAD_NAMES = ["Pulumi...yaml", "Pulumi....yaml", "Pulumi.ax;cmd;.yaml", "Pulumi.A.yaml", "Pulumi.a b.yaml",
             "Pulumi.-x.yaml", "Pulumi.%h.yaml"]


def _document(stack: str) -> dict:
    return yaml.safe_load(stack_file(stack).read_text())


def _set(config: dict, top: str, leaf: str | None, value, target_kind: str | None = None) -> dict:
    config = copy.deepcopy(config)
    key = f"kimi-fleet:{top}"
    if leaf is None:
        config[key] = value
    elif top == "target":
        config[key] = {**config[key], target_kind: {**(config[key].get(target_kind) or {}), leaf: value}}
    else:
        config[key] = {**(config.get(key) or {}), leaf: value}
    return config


def hostile_variants():
    """(label, file name, file text, words the error must contain)."""
    for stack in stack_names():
        document = _document(stack)
        config = document["config"]
        kind = config["kimi-fleet:target"]["kind"]
        fields = list(FREE_TEXT) + [("target", leaf) for leaf in TARGET_TEXT[kind]]
        for top, leaf in fields:
            for payload in PAYLOADS:
                base = "/data/w" if leaf == "hostPath" else "ops@example.com" if top == "acmeEmail" else "x"
                if top == "description" and payload not in ("\n---\nkind: Pod", "\x00", "\nid"):
                    continue  # free prose: only control characters are refused there
                if payload == "/../../etc" and leaf not in PATH_LIKE:
                    continue  # traversal matters where a value is a path
                value = {**document, "config": _set(config, top, leaf, base + payload, kind)}
                yield (f"{stack}:{top}.{leaf}:{payload!r}", f"Pulumi.{stack}.yaml", _dump(value),
                       [f"kimi-fleet:{top}", leaf or top])
        if kind in ("aws", "host"):
            # The SSH allowlist reaches a security group (AWS) or the host's nftables rules.
            for payload in PAYLOADS:
                settings = {"sshAllowlist": ["203.0.113.7/32" + payload], **({"firewall": True} if kind == "host" else {})}
                target = {**config["kimi-fleet:target"],
                          kind: {**(config["kimi-fleet:target"].get(kind) or {}), **settings}}
                value = {**document, "config": {**config, "kimi-fleet:target": target}}
                yield (f"{stack}:target.sshAllowlist:{payload!r}", f"Pulumi.{stack}.yaml", _dump(value),
                       ["kimi-fleet:target", "sshAllowlist"])
        for payload in [p for p in PAYLOADS if p != "/../../etc"]:
            value = {**document, "config": _set(config, "engine", "env", {"KIMI_X": "1" + payload})}
            yield (f"{stack}:env-value:{payload!r}", f"Pulumi.{stack}.yaml", _dump(value),
                   ["kimi-fleet:engine.env"])
        for arg in ("--host=0.0.0.0", "--hos=0.0.0.0", "--max_model_len=8", "-tp=4", "--api-key=sk-x",
                    "--API_KEY", "marlin --privileged", "--port", "--served-model-name=x"):
            engine = {**config["kimi-fleet:engine"], "extraArgs": [arg]}
            value = {**document, "config": {**config, "kimi-fleet:engine": engine}}
            yield (f"{stack}:extraArgs:{arg}", f"Pulumi.{stack}.yaml", _dump(value),
                   ["kimi-fleet:engine.extraArgs"])
        for top, leaf in NUMERIC:
            for number in ABSURD:
                value = {**document, "config": _set(config, top, leaf, number)}
                yield (f"{stack}:{top}.{leaf}:{number}", f"Pulumi.{stack}.yaml", _dump(value),
                       [f"kimi-fleet:{top}"])
        for wrong, right in TYPOS:
            value = {**document, "config": {**config, f"kimi-fleet:{wrong}": 1}}
            yield (f"{stack}:typo:{wrong}", f"Pulumi.{stack}.yaml", _dump(value),
                   [wrong, f"did you mean {right!r}"])
        for top, wrong, right in NESTED_TYPOS:
            value = {**document, "config": _set(config, top, wrong, 1)}
            yield (f"{stack}:typo:{top}.{wrong}", f"Pulumi.{stack}.yaml", _dump(value),
                   [f"kimi-fleet:{top}.{wrong}", f"did you mean {right!r}"])
        for name in BAD_NAMES:
            yield (f"{stack}:name:{name}", name, stack_file(stack).read_text(), ["stack name"])
        for label, raw in RAW_DOCUMENTS.items():
            yield (f"{stack}:{label}", f"Pulumi.{stack}.yaml", raw, [])
    for namespace in ("kube-system", "default", "Kimi", "kimi\n---"):
        document = _document("gb200-int4-vllm")
        value = {**document, "config": _set(document["config"], "target", "namespace", namespace, "kubernetes")}
        yield (f"namespace:{namespace!r}", "Pulumi.gb200-int4-vllm.yaml", _dump(value),
               ["kimi-fleet:target.kubernetes.namespace"])


@functools.cache
def variants() -> tuple:
    """Every hostile variant, built once per process when a test first asks (not at import: each
    pytest-xdist worker collects every file, and the variants are only needed where they run)."""
    return tuple(hostile_variants())
#: pydantic's phrasing, which says what failed but not what the field allows.
VALIDATOR_WORDS = ("Unable to parse input string", "Field required")


def test_at_least_500_hostile_variants_cover_every_stack():
    assert len(variants()) >= 500, len(variants())
    assert {label.split(":")[0] for label, *_ in variants()} >= set(stack_names())


# A hang guard, not a speed goal (a YAML bomb or a runaway regex never ends): about 15 s on an
# idle 2-core machine, 40 s with the CPU shared three ways.
@pytest.mark.timeout(600)
def test_every_hostile_variant_is_refused_with_file_and_field_and_no_traceback(tmp_path):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted, unnamed, unclear = [], [], []
    for index, (label, name, text, words) in enumerate(variants()):
        folder = tmp_path / f"v{index}"
        folder.mkdir()
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = plan.main(["--stack-file", str(path), "--no-preflight", "--build-dir", str(tmp_path / "build")])
        message = out.getvalue() + err.getvalue()  # the reasons once (stdout), the fields on stderr
        if code != 2:
            accepted.append((label, code))
            continue
        assert "Traceback" not in message, label
        if name not in message or not all(word in message for word in words):
            unnamed.append((label, message[:300]))
        # What to do, not the validator's own words: the allowed shape or range replaces them.
        if any(raw in message for raw in VALIDATOR_WORDS) or (
                label.endswith("--max_model_len=8") and "vllm" in label.split(":")[0]
                and "did you mean --max-model-len" not in message):
            unclear.append((label, message[:300]))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert not accepted, accepted[:10]
    assert not unnamed, unnamed[:5]
    assert not unclear, unclear[:5]
    assert grown_mib < 300, grown_mib
    assert not (tmp_path / "build").exists(), "a refused stack wrote artifacts"


PLAIN_LINE = re.compile(r"[A-Z][A-Z0-9_]*=[A-Za-z0-9._:/@,+=-]*")
BENIGN = [
    ("domain", None, "kimi-b.example.org"), ("weights", "hostPath", "/data/other/weights"),
    ("acmeEmail", None, "ops+kimi@example.org"), ("description", None, "A benign description: é, {}, $x."),
    ("engine", "env", {"NCCL_DEBUG": "INFO", "KIMI_EXTRA": "a,b=c:d/e"}),
]


@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_accepted_benign_variants_render_only_values_of_their_allowed_shape(stack, tmp_path):
    document = _document(stack)
    kind = document["config"]["kimi-fleet:target"]["kind"]
    for top, leaf, value in BENIGN:
        if top == "weights" and kind == "kubernetes":
            continue
        path = tmp_path / f"Pulumi.{stack}.yaml"
        path.write_text(yaml.safe_dump({**document, "config": _set(document["config"], top, leaf, value, kind)}))
        r = Resolved(load_stack_config(path).spec())
        sizing = size(r)
        artifacts = render_artifacts(r, sizing, render_launch(r))
        for name, text in artifacts.items():
            if name.endswith(".env"):
                lines = [line for line in text.splitlines() if line and not line.startswith("#")]
                assert all(PLAIN_LINE.fullmatch(line) for line in lines), (name, lines)
            if name.endswith(".argv.json"):
                assert all(re.fullmatch(r"[A-Za-z0-9._:/@,+=-]+", a) for a in json.loads(text)), name
            if name == "Caddyfile":
                # Only the keys' own placeholders (the API key; the scrape key of a node whose metrics
                # endpoint is keyed, node_metrics.METRICS_KEY_ENV) and the request line the route
                # allowlist matches (caddy._REQUEST_LINE), nothing a stack value smuggled in.
                assert set(re.findall(r"\{[^}\s]*\}", text)) <= {
                    "{env.KIMI_API_KEY}", f"{{env.{node_metrics.METRICS_KEY_ENV}}}", "{http.request.method}",
                    "{http.request.uri}"}, text
        # The description is prose for people: it never reaches a node file.
        if top == "description":
            assert not any("benign description" in text for text in artifacts.values())
