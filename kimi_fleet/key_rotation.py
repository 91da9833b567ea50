"""What a stack says about its API key, without the key: for the plan and the PR diff.

The offline planner cannot decrypt a chosen key (`secure:` in the stack file) and a generated key
lives only in the state, so a rotation is told from what is not secret: the generation of the
generated key, or a change of the chosen key's ciphertext (a secret set again), and whether the
previous key is still accepted. Pure data, no Pulumi.
"""

from __future__ import annotations

from kimi_fleet.spec import CONFIG_NAMESPACE, StackSpec

API_KEY = f"{CONFIG_NAMESPACE}:apiKey"
PREVIOUS_API_KEY = f"{CONFIG_NAMESPACE}:apiKeyPrevious"


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


def rotation_lines(before: dict | None, after: dict | None) -> list[str]:
    """What a change does to clients' keys: a rotation, an overlap opened or closed. [] when the
    key is untouched."""
    if not before or not after:
        return []
    lines = []
    rotated = before["source"] != after["source"] or before["fingerprint"] != after["fingerprint"]
    if rotated:
        how = (f"generation {before['generation']} → {after['generation']}" if after["source"] == "generated"
               and before["source"] == "generated" else "kimi-fleet:apiKey set anew")
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
