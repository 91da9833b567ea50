"""The target registry: one module per place a stack can run (AWS, Kubernetes, an existing host,
a startup-script GPU cloud), each a `Target` (see base.py). A second cloud is a module here, its
spec section and its endpoint component."""

from __future__ import annotations

from kimi_fleet.targets.aws import AWS
from kimi_fleet.targets.base import Target
from kimi_fleet.targets.host import Host, StartupScriptCloud
from kimi_fleet.targets.kubernetes import Kubernetes

_BY_KIND: dict[str, Target] = {t.kind: t for t in (AWS(), Kubernetes(), Host())}
_STARTUP_SCRIPT_CLOUD = StartupScriptCloud()


def for_spec(spec) -> Target:
    """The target a stack runs on (a host that takes only a startup script is a GPU cloud)."""
    if spec.target.kind == "host" and spec.target.host.startup_script_only:
        return _STARTUP_SCRIPT_CLOUD
    return _BY_KIND[spec.target.kind]


__all__ = ["Target", "for_spec"]
