"""A stack's API key rotation: whether it can be carried out (check_rotation, before anything is
declared), and what it does, said without the key, for the plan and the PR diff.

The offline planner cannot decrypt a chosen key (`secure:` in the stack file) and a generated key
lives only in the state, so a rotation is told from what is not secret: the generation of the
generated key, or a change of the chosen key's ciphertext (a secret set again), and whether the
previous key is still accepted. Pure data, no Pulumi.
"""

from __future__ import annotations

from kimi_fleet.spec import CONFIG_NAMESPACE, ApiKeyRotationSpec, StackSpec

API_KEY = f"{CONFIG_NAMESPACE}:apiKey"
PREVIOUS_API_KEY = f"{CONFIG_NAMESPACE}:apiKeyPrevious"


def check_rotation(rotation: ApiKeyRotationSpec, where: str, *, chosen: bool, previous: bool) -> None:
    """A key rotation that can be carried out: the previous key exists where it is accepted, and a
    previous key is never set without being accepted (a secret nobody uses)."""
    if previous and not chosen:
        raise ValueError(f"{where}: kimi-fleet:apiKeyPrevious is set but kimi-fleet:apiKey is not: the previous key "
                         "of a generated key is kept by the stack itself (apiKeyRotation.generation); remove it")
    if previous and not rotation.accept_previous:
        raise ValueError(f"{where}: kimi-fleet:apiKeyPrevious is set but apiKeyRotation.acceptPrevious is false: "
                         "set acceptPrevious: true to accept it during the rotation, or remove the secret "
                         "(pulumi config rm kimi-fleet:apiKeyPrevious) once every client uses the new key")
    if rotation.accept_previous and chosen and not previous:
        raise ValueError(f"{where}: apiKeyRotation.acceptPrevious is true with a chosen kimi-fleet:apiKey but no "
                         "kimi-fleet:apiKeyPrevious: set the key clients used before (pulumi config set --secret "
                         "kimi-fleet:apiKeyPrevious ...), or set acceptPrevious: false")
    if rotation.accept_previous and not chosen and rotation.generation == 0:
        raise ValueError(f"{where}: apiKeyRotation.acceptPrevious is true at generation 0: there is no previous "
                         "generated key; bump apiKeyRotation.generation to rotate (1 for the first rotation)")
    if rotation.generation and chosen:
        raise ValueError(f"{where}: apiKeyRotation.generation is {rotation.generation} with a chosen kimi-fleet:apiKey: "
                         "the generation rotates the generated key only; rotate a chosen key by setting "
                         "kimi-fleet:apiKey (and kimi-fleet:apiKeyPrevious to the old one); set generation: 0")


def api_key_facts(spec: StackSpec, secure_fingerprints: dict[str, str]) -> dict:
    """{source, generation, accept_previous, fingerprint, previous_fingerprint} for the plan's JSON."""
    chosen = API_KEY in secure_fingerprints
    return {
        "source": "chosen" if chosen else "generated",
        "generation": spec.api_key_rotation.generation,
        "accept_previous": spec.api_key_rotation.accept_previous,
        # of the ciphertext, never of the key: a re-set secret shows as a new fingerprint
        "fingerprint": secure_fingerprints.get(API_KEY) if chosen else f"generation {spec.api_key_rotation.generation}",
        "previous_fingerprint": secure_fingerprints.get(PREVIOUS_API_KEY),
    }


def describe(facts: dict) -> str:
    """One line for the plan."""
    if facts["source"] == "chosen":
        line = f"chosen (kimi-fleet:apiKey, ciphertext {facts['fingerprint']})"
    else:
        line = f"generated, generation {facts['generation']} (bump apiKeyRotation.generation to rotate)"
    if facts["accept_previous"]:
        line += ("; the previous key is accepted too until apiKeyRotation.acceptPrevious is false "
                 "(then it gets 401)")
    return line


#: What a refused rotation line starts with: `plan.py --diff` exits 2 when any stack has one.
REFUSED = "**refused**"


def rotation_refusals(before: dict | None, after: dict | None) -> list[str]:
    """A change the two slots cannot carry out: the previous key would be one nobody holds.

    The generated key's slots hold generation g and g-1. A jump (0 → 2) or a step back regenerates
    the slot that should hold the key clients use, so `acceptPrevious` would accept a fresh random
    key while every client gets 401. The program cannot see the state's last generation; the plan
    of the change can (before and after), so the PR check refuses it."""
    if not before or not after or after["source"] != "generated":
        return []
    step = after["generation"] - before["generation"]
    if before["source"] == "chosen" and after["accept_previous"]:
        return [f"{REFUSED}: apiKeyRotation.acceptPrevious while moving from a chosen kimi-fleet:apiKey to a "
                "generated one: the generated slots never held the chosen key, so clients would get 401. Move "
                "with acceptPrevious: false (announced, no overlap), or keep the chosen key and rotate it"]
    if before["source"] == "generated" and step not in (0, 1):
        return [f"{REFUSED}: apiKeyRotation.generation {before['generation']} → {after['generation']}: a rotation "
                "goes up by one per deploy (the previous key is generation g-1 only after g-1 was deployed; "
                "any other step regenerates the slot clients use). Deploy each step in turn"]
    return []


def rotation_lines(before: dict | None, after: dict | None) -> list[str]:
    """What a change does to clients' keys: a rotation, an overlap opened or closed. [] when the
    key is untouched."""
    if not before or not after:
        return []
    lines = rotation_refusals(before, after)
    rotated = before["source"] != after["source"] or before["fingerprint"] != after["fingerprint"]
    if rotated:
        how = (f"generation {before['generation']} → {after['generation']}" if after["source"] == "generated"
               and before["source"] == "generated" else
               "kimi-fleet:apiKey set anew (told from its ciphertext: a secret set again to the same value, or a "
               "changed secrets provider, shows here too)" if after["source"] == "chosen" else
               "from a chosen kimi-fleet:apiKey to a generated one")
        overlap = ("the previous key stays accepted (apiKeyRotation.acceptPrevious) until you set acceptPrevious: "
                   "false once every client uses the new one" if after["accept_previous"] else
                   "**no overlap**: requests with the old key get 401 as soon as each node serves this release "
                   "(set apiKeyRotation.acceptPrevious: true to accept both while clients move)")
        lines.append(f"**API key rotated** ({how}): clients need the new `api_key` output; {overlap}")
    elif before["accept_previous"] and not after["accept_previous"]:
        lines.append("**previous API key retired**: requests with it get 401 once each node serves this release")
    elif after["accept_previous"] and not before["accept_previous"]:
        lines.append("previous API key accepted again (apiKeyRotation.acceptPrevious)")
    elif after["accept_previous"] and before["previous_fingerprint"] != after["previous_fingerprint"]:
        lines.append("the accepted previous API key changed (kimi-fleet:apiKeyPrevious set anew)")
    return lines
