"""kimi-fleet-safety: the policy pack the Pulumi CLI runs (`--policy-pack policy`).

Only wiring lives here: each `ResourceValidationPolicy` calls a pure validator from
validators.py with the resource's type and input props and reports one violation per message.

The CLI runs this file with `runpy.run_path(<policy dir>, run_name="__main__")` (module
`pulumi.policy`), which puts this directory first on sys.path. `PolicyPack(...)` starts the gRPC
analyzer server and blocks forever, so it is only constructed when run as `__main__`: importing
or `runpy`-loading the file under another name builds `POLICIES` without serving (tests use this).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from pulumi_policy import (
    EnforcementLevel,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)


def _load_validators():
    # Load by path under a private name: a PyPI package called `validators` must never shadow it.
    name = "kimi_fleet_policy_validators"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "validators.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


validators = _load_validators()


def resource_options(args: ResourceValidationArgs) -> dict:
    """The options a validator may read, in the engine's names (as check_resources gets them)."""
    return {"protect": bool(args.opts.protect), "ignoreChanges": list(args.opts.ignore_changes or [])}


def _wrap(validator, reads_options: bool = False):
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        messages = (validator(args.resource_type, args.props, resource_options(args)) if reads_options
                    else validator(args.resource_type, args.props))
        for message in messages:
            report_violation(message, None)

    validate.__name__ = f"validate_{validator.__name__}"
    return validate


def build_policies() -> list[ResourceValidationPolicy]:
    policies = []
    for level, specs in ((EnforcementLevel.MANDATORY, validators.MANDATORY),
                         (EnforcementLevel.ADVISORY, validators.ADVISORY)):
        for spec in specs:
            policies.append(ResourceValidationPolicy(
                name=spec.name,
                description=spec.description,
                validate=_wrap(spec.validator, spec.reads_options),
                enforcement_level=level,
            ))
    return policies


POLICIES = build_policies()

if __name__ == "__main__":
    PolicyPack(
        name="kimi-fleet-safety",
        policies=POLICIES,
        enforcement_level=EnforcementLevel.MANDATORY,
        description="kimi-fleet safety policies (see policy/validators.py).",
    )
