"""Validate a custom resource against the published CRD of the release the project pins, offline and
strictly, as the API server would (tooling/schemas/<project>-<release>/, each file as published).

The CRD's openAPIV3Schema of the version the object names (the one the CRD serves) becomes a JSON
Schema (draft 2020-12) with every object that lists its properties closed (the API server's strict
field validation: an unknown or misspelt field is an error, not pruned), `nullable` and
`x-kubernetes-int-or-string` spelled out, `x-kubernetes-list-type: set` items unique, and
`x-kubernetes-list-map-keys` uniqueness (duplicate env names, ports, volumes) checked by a keyword
JSON Schema lacks. What a CRD says in CEL (`x-kubernetes-validations`) or a project's webhook checks
is each module's own (tooling/lws_schema.py, tooling/monitoring_schema.py), with its source.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: DNS-1123 subdomain (metav1.ObjectMeta names of most kinds) and label (namespaces).
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def object_meta(name_pattern: str = DNS_1123_SUBDOMAIN, name_max: int = 253) -> dict:
    """What a client may set in metadata here (the CRD says only `type: object`; the API server
    checks ObjectMeta): name, namespace, labels, annotations."""
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": name_max, "pattern": name_pattern},
            "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_1123_LABEL},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }


def closed(node):
    """The CRD's schema with every object that lists its properties closed, sets unique."""
    if isinstance(node, list):
        return [closed(item) for item in node]
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
        out["properties"] = {key: closed(value) for key, value in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = closed(out[key])
    return out


def served_version(crd: dict, api_version: str) -> dict:
    """The CRD's version entry for `group/version`, which it must serve."""
    (version,) = [v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == api_version]
    if not version.get("served"):
        raise ValueError(f"{crd['metadata']['name']} does not serve {api_version}")
    return version


def crd_json_schema(crd_file: Path, api_version: str, metadata: dict | None = None) -> dict:
    """The strict JSON Schema of the kind `crd_file` defines, at `api_version`."""
    crd = yaml.safe_load(crd_file.read_text())
    schema = closed(copy.deepcopy(served_version(crd, api_version)["schema"]["openAPIV3Schema"]))
    schema["properties"].update({
        "apiVersion": {"type": "string", "const": api_version},
        "kind": {"type": "string", "const": crd["spec"]["names"]["kind"]},
        "metadata": metadata or object_meta(),
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


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                         {"x-kubernetes-list-map-keys": _list_map_keys})


def schema_errors(schema: dict, obj: dict) -> list[str]:
    """Every place `obj` breaks `schema`, as 'path: message'; [] when it holds."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(Validator(schema).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
