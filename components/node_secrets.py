"""NodeSecrets: the API key (and a rotation's previous key) and the optional Hugging Face token as
SSM SecureString parameters.

Nodes read them at boot through their instance role; user data carries only the parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet.caddy import check_api_key


def checked_api_key(key: str, field: str = "apiKey") -> str:
    """The key as stored, once it has the one shape every target accepts: refused here, where it is
    set, rather than by the node's proxy after the deploy (ValueError, never echoing the key)."""
    check_api_key(key, field)
    return key


def checked_previous_api_key(key: str) -> str:
    return checked_api_key(key, "apiKeyPrevious")


@dataclass
class NodeSecretsArgs:
    #: e.g. /kimi-fleet/<stack>: the instance role may read below it and nowhere else.
    prefix: str
    api_key: pulumi.Input[str]
    hf_token: pulumi.Input[str] | None
    tags: dict[str, str]
    #: during a key rotation that accepts it, the key clients used before (else None)
    previous_api_key: pulumi.Input[str] | None = None


class NodeSecrets(pulumi.ComponentResource):
    api_key_parameter: pulumi.Output[str]
    #: None when the stack has no Hugging Face token (a public repo or the S3 mirror).
    hf_token_parameter: pulumi.Output[str | None]

    def __init__(self, name: str, args: NodeSecretsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:NodeSecrets", name, None, opts)
        prefix = args.prefix.rstrip("/")
        api_key = self._parameter(f"{name}-api-key", f"{prefix}/api-key",
                                  pulumi.Output.from_input(args.api_key).apply(checked_api_key), args.tags)
        self.api_key_parameter = api_key.name
        #: increments when the key changes: the node's user data carries it, so a rotation reaches the node
        self.api_key_version = api_key.version
        #: the previous key's version while a rotation accepts it (the bundle names it), else None
        self.previous_api_key_version = pulumi.Output.from_input(None)
        if args.previous_api_key is not None:
            # Kept in AWS when the rotation is over (retain on delete), and taken over when the next
            # one opens (overwrite): its version history stays, so a node that boots an older bundle
            # by its digest still reads the previous key that bundle names by version.
            previous = self._parameter(f"{name}-api-key-previous", f"{prefix}/api-key-previous",
                                       pulumi.Output.from_input(args.previous_api_key).apply(checked_previous_api_key),
                                       args.tags, keep_history=True)
            self.previous_api_key_version = previous.version
        self.hf_token_parameter = pulumi.Output.from_input(None)
        if args.hf_token is not None:
            hf_token = self._parameter(f"{name}-hf-token", f"{prefix}/hf-token", args.hf_token, args.tags)
            self.hf_token_parameter = hf_token.name
        self.register_outputs({
            "api_key_parameter": self.api_key_parameter,
            "api_key_version": self.api_key_version,
            "previous_api_key_version": self.previous_api_key_version,
            "hf_token_parameter": self.hf_token_parameter,
        })

    def _parameter(self, resource_name: str, path: str, value: pulumi.Input[str],
                   tags: dict[str, str], *, keep_history: bool = False) -> aws.ssm.Parameter:
        return aws.ssm.Parameter(
            resource_name,
            name=path,
            type="SecureString",  # encrypted with the account's aws/ssm key
            overwrite=True if keep_history else None,
            value=pulumi.Output.secret(value),
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["value"],
                                        retain_on_delete=keep_history),
        )
