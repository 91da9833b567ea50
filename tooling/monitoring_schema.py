"""Validate the stack's monitoring and scaling objects against the published CRDs of the releases the
project pins (tooling/schemas/, each directory's README says where each file comes from):

- PodMonitor and PrometheusRule (monitoring.coreos.com/v1): prometheus-operator v0.93.0;
- ScaledObject (keda.sh/v1alpha1): KEDA v2.20.2.

Each is the CRD's served version's openAPIV3Schema made strict (tooling/crd_schema.py), plus what the
schema cannot say: the ScaledObject CRD's one CEL rule (x-kubernetes-validations on spec) and KEDA's
validating webhook's name rules (apis/keda/v1alpha1/scaledobject_webhook.go verifyName at v2.20.2).
A PrometheusRule's spec is a Prometheus rules file: the tests also run `promtool check rules` on it,
as the Operator's admission webhook parses it with Prometheus's own rule parser.
"""

from __future__ import annotations

import functools

from kimi_fleet.k8s_manifests import (
    KEDA_API_VERSION, KEDA_RELEASE, PROMETHEUS_OPERATOR_API_VERSION, PROMETHEUS_OPERATOR_RELEASE,
)
from tooling.crd_schema import SCHEMAS, crd_json_schema, schema_errors

OPERATOR_DIR = SCHEMAS / f"prometheus-operator-{PROMETHEUS_OPERATOR_RELEASE}"
KEDA_DIR = SCHEMAS / f"keda-{KEDA_RELEASE}"
CRD_FILES = {
    "PodMonitor": (OPERATOR_DIR / "monitoring.coreos.com_podmonitors.yaml", PROMETHEUS_OPERATOR_API_VERSION),
    "PrometheusRule": (OPERATOR_DIR / "monitoring.coreos.com_prometheusrules.yaml", PROMETHEUS_OPERATOR_API_VERSION),
    "ScaledObject": (KEDA_DIR / "keda.sh_scaledobjects.yaml", KEDA_API_VERSION),
}
#: KEDA's webhook: the name is a label value (scaledobject.keda.sh/name) and names the HPA it makes.
LABEL_VALUE_MAX = 63
KEDA_HPA_PREFIX = "keda-hpa-"
#: The CEL rule's default for an unset maxReplicaCount (the CRD's rule text).
KEDA_DEFAULT_MAX = 100


@functools.cache
def json_schema(kind: str) -> dict:
    crd_file, api_version = CRD_FILES[kind]
    return crd_json_schema(crd_file, api_version)


def keda_errors(obj: dict) -> list[str]:
    """The ScaledObject's CEL rule (the CRD's x-kubernetes-validations on spec) and the webhook's
    verifyName: what the API server would refuse beyond the schema."""
    found = []
    spec = obj.get("spec") or {}
    if "minReplicaCount" in spec and spec["minReplicaCount"] > spec.get("maxReplicaCount", KEDA_DEFAULT_MAX):
        found.append("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    name = obj["metadata"]["name"]
    if len(name) > LABEL_VALUE_MAX:
        found.append(f"metadata/name: scaledobject name {name!r} is {len(name)} characters long; must be no more "
                     f"than {LABEL_VALUE_MAX}")
    hpa = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("name") \
        or f"{KEDA_HPA_PREFIX}{name}"
    if len(hpa) > LABEL_VALUE_MAX:
        found.append(f"metadata/name: HPA name {hpa!r} derived from scaledobject is {len(hpa)} characters long")
    return found


def errors(obj: dict) -> list[str]:
    """Every reason the API server would refuse the object; [] when it accepts it."""
    found = schema_errors(json_schema(obj["kind"]), obj)
    if not found and obj["kind"] == "ScaledObject":
        found = keda_errors(obj)  # the CEL rule and the webhook see only what the schema admitted
    return found
