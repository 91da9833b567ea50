"""Read a stack's config the way Pulumi would: Pulumi.yaml defaults, then the stack file.

Used by the offline planner (the mock runtime reads config only from PULUMI_CONFIG) and by tests.
`secure:` values stay encrypted: they are reported as secret and never decrypted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kimi_fleet.spec import CONFIG_NAMESPACE, StackSpec, parse_spec

#: Config keys that are secrets: only ever `secure:`, never part of the spec.
SECRET_KEYS = ("apiKey", "hfToken", "sshHost", "sshPrivateKey", "kubeconfig")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = PROJECT_ROOT / "stacks"


@dataclass(frozen=True)
class StackConfig:
    stack: str
    path: Path
    #: kimi-fleet keys without the namespace, secure values removed
    values: dict
    #: full keys ("kimi-fleet:apiKey") that hold `secure:` ciphertext
    secure_keys: tuple[str, ...]
    #: every plain key with its namespace, as PULUMI_CONFIG wants it
    pulumi_config: dict[str, str] = field(default_factory=dict)

    def spec(self) -> StackSpec:
        return parse_spec(self.values, self.stack, str(self.relative_path))

    @property
    def relative_path(self) -> Path:
        try:
            return self.path.relative_to(PROJECT_ROOT)
        except ValueError:
            return self.path


def stack_names() -> list[str]:
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in STACKS_DIR.glob("Pulumi.*.yaml"))


def stack_file(stack: str) -> Path:
    return STACKS_DIR / f"Pulumi.{stack}.yaml"


def _project_defaults() -> dict:
    project = yaml.safe_load((PROJECT_ROOT / "Pulumi.yaml").read_text()) or {}
    defaults = {}
    for key, decl in (project.get("config") or {}).items():
        full = key if ":" in key else f"{CONFIG_NAMESPACE}:{key}"
        if isinstance(decl, dict) and "value" in decl:
            defaults[full] = decl["value"]
        elif isinstance(decl, dict) and "default" in decl:
            defaults[full] = decl["default"]
        elif not isinstance(decl, dict):
            defaults[full] = decl
    return defaults


def load_stack_config(path: Path, stack: str | None = None) -> StackConfig:
    """Merge project defaults and one stack file; raise ValueError on an unreadable file."""
    path = Path(path)
    if stack is None:
        name = path.name
        if not (name.startswith("Pulumi.") and name.endswith(".yaml")):
            raise ValueError(f"{path}: a stack file is named Pulumi.<stack>.yaml")
        stack = name[len("Pulumi."):-len(".yaml")]
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the stack file: {exc}") from None
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: `config` must be a mapping")
    merged = {**_project_defaults(), **config}
    values, secure, pulumi_config = {}, [], {}
    for key, value in merged.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            secure.append(key)
            continue
        namespace, _, name = key.partition(":")
        if namespace == CONFIG_NAMESPACE and name in SECRET_KEYS:
            raise ValueError(
                f"{path}: field {key} is in plain text: set it with `pulumi config set --secret {name}` "
                "so it is encrypted in the stack file and the state"
            )
        if not name:
            raise ValueError(f"{path}: config key {key!r} has no namespace (expected {CONFIG_NAMESPACE}:<name>)")
        pulumi_config[key] = value if isinstance(value, str) else json.dumps(value)
        if namespace == CONFIG_NAMESPACE:
            values[name] = value
    return StackConfig(stack, path, values, tuple(sorted(secure)), pulumi_config)


def deploy_time_secrets(target: dict) -> tuple[str, ...]:
    """Secrets a target cannot deploy without; `plan` runs with placeholders and lists them.

    An existing host is reached over SSH, unless it is a cloud that only takes a startup script."""
    if target.get("kind") == "host" and not (target.get("host") or {}).get("startupScriptOnly"):
        return ("sshHost", "sshPrivateKey")
    return ()
