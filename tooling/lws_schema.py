"""Validate a LeaderWorkerSet against the published CRD of the LWS release the project pins
(tooling/schemas/lws-v<release>/), offline and strictly, as the API server and LWS's webhook would.

Three layers: the CRD's v1 openAPIV3Schema converted to a JSON Schema (draft 2020-12) with every
object closed (strict field validation: an unknown or misspelt field is an error, not pruned);
`x-kubernetes-list-map-keys` uniqueness (duplicate env names, ports, volumes), which JSON Schema
cannot say; the validating webhook's rules the CRD lacks (pkg/webhooks/leaderworkerset_webhook.go
generalValidate at v0.10.0). The pod templates inside are also core/v1 pod specs: the tests check
them with kubernetes-validate as they do a Deployment's.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import yaml

from kimi_fleet.k8s_manifests import LWS_API_VERSION, LWS_RELEASE

CRD_FILE = (Path(__file__).resolve().parent / "schemas" / f"lws-{LWS_RELEASE}"
            / "leaderworkerset.x-k8s.io_leaderworkersets.yaml")
#: The webhook's own rule for the name (it names the group's headless Service): a DNS-1035 label.
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: What a client may set in metadata (the CRD says only `type: object`; the API server checks ObjectMeta).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": DNS_1035},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_PERCENT = re.compile(r"^[0-9]+%$")


def _closed(node):
    """The CRD's schema with every object that lists its properties closed, sets unique."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if out.get("x-kubernetes-preserve-unknown-fields") or out.get("x-kubernetes-embedded-resource"):
        raise ValueError("the CRD opens an object (preserve-unknown-fields): the strict conversion would not hold")
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "properties" in out:
        out["properties"] = {key: _closed(value) for key, value in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = _closed(out[key])
    return out


@functools.cache
def json_schema() -> dict:
    """The strict JSON Schema of a LeaderWorkerSet, from the vendored CRD."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == LWS_API_VERSION]
    schema = _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"].update({
        "apiVersion": {"type": "string", "const": LWS_API_VERSION},
        "kind": {"type": "string", "const": crd["spec"]["names"]["kind"]},
        "metadata": OBJECT_META,
    })
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _list_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {dict(zip(keys, key))}")
            seen.add(key)


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                          {"x-kubernetes-list-map-keys": _list_map_keys})


def _scaled(value: int | str, total: int, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    whole, rest = divmod(int(value[:-1]) * total, 100)
    return whole + (1 if round_up and rest else 0)


def webhook_errors(obj: dict) -> list[str]:
    """The webhook's checks the CRD schema cannot make, after its defaulting (replicas 1, size 1,
    maxUnavailable 1, maxSurge 0)."""
    errors = []
    spec = obj.get("spec") or {}
    size = (spec.get("leaderWorkerTemplate") or {}).get("size", 1)
    replicas = spec.get("replicas", 1)
    update = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    unavailable, surge = update.get("maxUnavailable", 1), update.get("maxSurge", 0)
    if size < 1:
        errors.append("spec.leaderWorkerTemplate.size: size must be equal or greater than 1")
    if replicas * size > 2**31 - 1:
        errors.append("spec.replicas: the product of replicas and size must not exceed MaxInt32")
    for name, value in (("maxUnavailable", unavailable), ("maxSurge", surge)):
        if isinstance(value, str) and not _PERCENT.match(value):
            errors.append(f"rollingUpdateConfiguration.{name}: must be an integer or a percentage")
        elif isinstance(value, str) and int(value[:-1]) > 100:
            errors.append(f"rollingUpdateConfiguration.{name}: must not be greater than 100%")
        elif isinstance(value, int) and value < 0:
            errors.append(f"rollingUpdateConfiguration.{name}: must be greater than or equal to 0")
    if update.get("partition", 0) < 0:
        errors.append("rollingUpdateConfiguration.partition: must be greater than or equal to 0")
    if not errors and replicas and not _scaled(unavailable, replicas, False) and not _scaled(surge, replicas, True):
        errors.append("rollingUpdateConfiguration.maxUnavailable: must not be 0 when `maxSurge` is 0")
    return errors


def errors(obj: dict) -> list[str]:
    """Every reason the API server (with LWS's webhook) would refuse the object; [] when it accepts it."""
    found = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in sorted(_Validator(json_schema()).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    return found or webhook_errors(obj)  # the webhook sees only what the schema admitted
