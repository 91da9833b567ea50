"""Read a stack's config the way Pulumi would: Pulumi.yaml defaults, then the stack file.

Used by the offline planner (the mock runtime reads config only from PULUMI_CONFIG) and by tests.
`secure:` values stay encrypted: they are reported as secret and never decrypted.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kimi_fleet.spec import CONFIG_NAMESPACE, DNS_LABEL, StackSpec, did_you_mean
from kimi_fleet.validation import parse_spec

#: Config keys that are secrets: only ever `secure:`, never part of the spec.
SECRET_KEYS = ("apiKey", "apiKeyPrevious", "hfToken", "sshHost", "sshPrivateKey", "kubeconfig")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = PROJECT_ROOT / "stacks"
#: A stack name becomes part of paths (build/<stack>), SSM names, unit descriptions and Kubernetes
#: labels: a DNS label, so "." / ".." / separators / specifiers can never be one.
STACK_NAME_PATTERN = re.compile(rf"^{DNS_LABEL}$")
#: Keys a Pulumi stack file may hold besides `config` (written by the CLI).
STACK_FILE_KEYS = ("config", "secretsprovider", "encryptedkey", "encryptionsalt", "environment")
#: Config namespaces a stack may set: ours, and the providers the program uses.
KNOWN_NAMESPACES = (CONFIG_NAMESPACE, "aws", "kubernetes", "command", "random", "pulumi")
#: Stack files are a few dozen lines: anything larger is not one.
MAX_STACK_FILE_BYTES = 64 * 1024
MAX_NESTING = 16


class StackFileError(ValueError):
    """A stack file that cannot be read as one: names the file and, where it can, the key."""


def validate_stack_name(stack: str, where: str) -> str:
    if not STACK_NAME_PATTERN.match(stack):
        raise StackFileError(
            f"{where}: stack name {stack!r} must be 1-63 lowercase letters, digits and '-', starting and "
            "ending with a letter or digit (it names paths, SSM parameters, units and Kubernetes objects)"
        )
    return stack


try:  # libyaml's parser (PyYAML's C extension) when built: the same events, ~4x less CPU per file
    from yaml._yaml import CParser as _EventParser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _EventParser = None


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


class _StrictLoader(yaml.composer.Composer, _EventParser or _PythonEvents, yaml.constructor.SafeConstructor,
                    yaml.resolver.Resolver):
    """Plain YAML only: no tags, anchors or aliases (no billion laughs), no duplicate keys, and
    dates stay strings. Its events come from libyaml when PyYAML has it; composing them into nodes
    stays here (the Composer comes first in the bases), so every event passes the checks below."""

    def __init__(self, stream):
        (_EventParser or _PythonEvents).__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise StackFileError(f"{where}: YAML aliases (*{event.anchor}) are not allowed in a stack file")
        if getattr(event, "anchor", None):
            raise StackFileError(f"{where}: YAML anchors (&{event.anchor}) are not allowed in a stack file")
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise StackFileError(f"{where}: YAML tag {tag} is not allowed: write plain values")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise StackFileError(f"{where}: nested deeper than {MAX_NESTING} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise StackFileError(f"line {key_node.start_mark.line + 1}: key {key!r} is not a string")
            if key == "<<":
                raise StackFileError(f"line {key_node.start_mark.line + 1}: YAML merge keys are not allowed")
            if key in seen:
                raise StackFileError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Dates and times stay strings: a stack has no timestamp field.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def read_stack_yaml(path: Path, text: str | None = None, *, shown: str | None = None) -> dict:
    """The stack file as a mapping; StackFileError naming the file for anything else."""
    path = Path(path)
    shown = shown or _shown(path)
    try:
        if text is None:
            if path.stat().st_size > MAX_STACK_FILE_BYTES:
                raise StackFileError(f"larger than {MAX_STACK_FILE_BYTES // 1024} KiB")
            text = path.read_text(encoding="utf-8")
        document = yaml.load(text, Loader=_StrictLoader)
    except StackFileError as error:
        raise StackFileError(f"{shown}: {error}") from None
    except UnicodeDecodeError as exc:
        raise StackFileError(f"{shown}: cannot read the stack file: it must be UTF-8 text ({exc})") from None
    except yaml.constructor.ConstructorError as exc:
        raise StackFileError(f"{shown}: cannot read the stack file: plain YAML only (strings, numbers, booleans, "
                             f"lists, mappings; no tags, anchors' merge keys or other constructors): {exc}") from None
    except (OSError, yaml.YAMLError, RecursionError) as exc:
        raise StackFileError(f"{shown}: cannot read the stack file: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise StackFileError(f"{shown}: a stack file is a mapping with a `config:` key, not a {type(document).__name__}")
    for key in document:
        if key not in STACK_FILE_KEYS:
            raise StackFileError(f"{shown}: unknown top-level key {key!r}{did_you_mean(key, STACK_FILE_KEYS)}; "
                                 f"allowed: {', '.join(STACK_FILE_KEYS)}")
    return document


def spec_values(config: dict, where: str) -> dict:
    """kimi-fleet values (keys without the namespace) from full config keys, refusing unknown
    namespaces and keys with a suggestion. The one reader for the planner and `__main__.py`;
    values that arrive as JSON text (Pulumi's runtime config) are decoded."""
    known = [f.alias for f in StackSpec.model_fields.values() if f.alias != "stack"]
    values = {}
    for key, value in config.items():
        namespace, sep, name = key.partition(":")
        if not sep or not name:
            raise StackFileError(f"{where}: config key {key!r} has no namespace (expected {CONFIG_NAMESPACE}:<name>)")
        if namespace not in KNOWN_NAMESPACES:
            raise StackFileError(f"{where}: config key {key!r}: unknown namespace {namespace!r}"
                                 f"{did_you_mean(namespace, KNOWN_NAMESPACES)}; allowed: {', '.join(KNOWN_NAMESPACES)}")
        if namespace != CONFIG_NAMESPACE or name in SECRET_KEYS:
            continue
        if name not in known:
            raise StackFileError(f"{where}: field {key}: unknown key{did_you_mean(name, known)}; "
                                 f"known: {', '.join(sorted(known))}")
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        values[name] = value
    return values


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
    #: full key -> a fingerprint of its ciphertext (not of the secret): a re-set secret shows as changed
    secure_fingerprints: dict[str, str] = field(default_factory=dict)

    def spec(self) -> StackSpec:
        return parse_spec(self.values, self.stack, str(self.relative_path))

    @property
    def relative_path(self) -> Path:
        try:
            return self.path.relative_to(PROJECT_ROOT)
        except ValueError:
            return self.path


def stack_names() -> list[str]:
    """The stacks in stacks/ whose file names are valid stack names."""
    names = (p.name[len("Pulumi."):-len(".yaml")] for p in STACKS_DIR.glob("Pulumi.*.yaml"))
    return sorted(name for name in names if STACK_NAME_PATTERN.match(name))


@functools.lru_cache(maxsize=4)
def _parsed_project(text: str) -> dict:
    """Pulumi.yaml, parsed once per content (read every time: an edit is seen)."""
    return yaml.safe_load(text) or {}


def stack_file(stack: str) -> Path:
    return STACKS_DIR / f"Pulumi.{stack}.yaml"


def _project_defaults() -> dict:
    project = copy.deepcopy(_parsed_project((PROJECT_ROOT / "Pulumi.yaml").read_text()))  # callers may edit
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
    shown = _shown(path)
    if stack is None:
        name = path.name
        if not (name.startswith("Pulumi.") and name.endswith(".yaml")):
            raise StackFileError(f"{shown}: a stack file is named Pulumi.<stack>.yaml")
        stack = name[len("Pulumi."):-len(".yaml")]
    validate_stack_name(stack, shown)
    document = read_stack_yaml(path, shown=shown)
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise StackFileError(f"{shown}: `config` must be a mapping")
    merged = {**_project_defaults(), **config}
    secure, pulumi_config, fingerprints = [], {}, {}
    for key, value in merged.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            secure.append(key)
            fingerprints[key] = "sha256:" + hashlib.sha256(str(value["secure"]).encode()).hexdigest()[:12]
            continue
        namespace, _, name = key.partition(":")
        if namespace == CONFIG_NAMESPACE and name in SECRET_KEYS and value is not None:
            raise StackFileError(
                f"{shown}: field {key} is in plain text: set it with `pulumi config set --secret {name}` "
                "so it is encrypted in the stack file and the state"
            )
        pulumi_config[key] = value if isinstance(value, str) else json.dumps(value)
    values = spec_values({k: v for k, v in merged.items() if k not in secure}, shown)
    return StackConfig(stack, path, values, tuple(sorted(secure)), pulumi_config, fingerprints)


def deploy_time_secrets(target: dict) -> tuple[str, ...]:
    """Secrets a target cannot deploy without; `plan` runs with placeholders and lists them.

    An existing host is reached over SSH, unless it is a cloud that only takes a startup script."""
    if target.get("kind") == "host" and not (target.get("host") or {}).get("startupScriptOnly"):
        return ("sshHost", "sshPrivateKey")
    return ()


# --- the published schema of a stack file --------------------------------------------------------

SCHEMA_FILE = STACKS_DIR / "schema.json"
#: The first line of every stack file: editors with the YAML language server complete and check it.
SCHEMA_HEADER = "# yaml-language-server: $schema=./schema.json"


def stack_file_schema() -> dict:
    """JSON Schema of a Pulumi stack file for this program, from StackSpec (written to
    stacks/schema.json by scripts/stack_schema.py). It checks shapes, names, enums and bounds as
    an editor can; the program's own validation (cross-field rules, hardware) still has the last word."""
    spec = StackSpec.model_json_schema(by_alias=True, mode="validation")
    definitions = spec.pop("$defs", {})
    fields = {name: field for name, field in spec["properties"].items() if name != "stack"}
    properties = {f"{CONFIG_NAMESPACE}:{name}": field for name, field in fields.items()}
    secure = {"type": "object", "description": "a secret: set it with `pulumi config set --secret`",
              "properties": {"secure": {"type": "string", "description": "ciphertext written by the Pulumi CLI"}},
              "required": ["secure"], "additionalProperties": False}
    properties.update({f"{CONFIG_NAMESPACE}:{name}": secure for name in SECRET_KEYS})
    config = {
        "type": "object",
        "description": "the stack's settings: kimi-fleet:<field>, and the providers' own (aws:region, ...)",
        "properties": properties,
        "required": [f"{CONFIG_NAMESPACE}:{name}" for name in spec.get("required", []) if name != "stack"],
        # The providers' own settings (aws:region, ...) are theirs to check.
        "patternProperties": {f"^{namespace}:": {} for namespace in KNOWN_NAMESPACES if namespace != CONFIG_NAMESPACE},
        "additionalProperties": False,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kimi-fleet stack file (stacks/Pulumi.<stack>.yaml)",
        "type": "object",
        "properties": {"config": config, **{key: {"description": "written by the Pulumi CLI"}
                                            for key in STACK_FILE_KEYS if key != "config"}},
        "required": ["config"],
        "additionalProperties": False,
        "$defs": definitions,
    }


def render_stack_file_schema() -> str:
    return json.dumps(stack_file_schema(), indent=2) + "\n"
