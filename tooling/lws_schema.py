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

import functools
import re

from kimi_fleet.k8s_manifests import LWS_API_VERSION, LWS_RELEASE
from tooling.crd_schema import SCHEMAS, crd_json_schema, object_meta, schema_errors

CRD_FILE = SCHEMAS / f"lws-{LWS_RELEASE}" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
#: The webhook's own rule for the name (it names the group's headless Service): a DNS-1035 label.
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: What a client may set in metadata (the CRD says only `type: object`; the API server checks ObjectMeta).
OBJECT_META = object_meta(DNS_1035, 63)
_PERCENT = re.compile(r"^[0-9]+%$")


@functools.cache
def json_schema() -> dict:
    """The strict JSON Schema of a LeaderWorkerSet, from the vendored CRD (tooling/crd_schema.py)."""
    return crd_json_schema(CRD_FILE, LWS_API_VERSION, OBJECT_META)


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
    found = schema_errors(json_schema(), obj)
    return found or webhook_errors(obj)  # the webhook sees only what the schema admitted
