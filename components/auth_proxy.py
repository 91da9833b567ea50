"""AuthProxy: the authenticating Caddy front of an endpoint, recorded so policies can check it.

It declares no cloud resource: the Caddyfile runs on a node or in a pod. Registering it as a
component puts the exact configuration and its allowed upstreams in the state and in front of
the policy pack (`admin off`, Bearer key required, loopback upstreams only).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi


@dataclass
class AuthProxyArgs:
    caddyfile: str
    allowed_upstreams: list[str]


class AuthProxy(pulumi.ComponentResource):
    caddyfile: pulumi.Output[str]
    allowed_upstreams: pulumi.Output[list[str]]

    def __init__(self, name: str, args: AuthProxyArgs, opts: pulumi.ResourceOptions | None = None):
        props = {"caddyfile": args.caddyfile, "allowedUpstreams": args.allowed_upstreams}
        super().__init__("kimi-fleet:proxy:AuthProxy", name, props, opts)
        self.caddyfile = pulumi.Output.from_input(args.caddyfile)
        self.allowed_upstreams = pulumi.Output.from_input(args.allowed_upstreams)
        self.register_outputs({"caddyfile": self.caddyfile, "allowedUpstreams": self.allowed_upstreams})
