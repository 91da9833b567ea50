"""AuthProxy: the authenticating Caddy front of an endpoint, recorded so policies can check it.

It declares no cloud resource: the Caddyfile runs on a node or in a pod. Registering it as a
component puts the exact configuration, and what it does as data (`proxy`: per site whether the
key is required, its upstreams and routes; held against Caddy's own adaptation of the text in
tests), in the state and in front of the policy pack, which checks the data, not the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from kimi_fleet.caddy import RenderedProxy


@dataclass
class AuthProxyArgs:
    rendered: RenderedProxy
    allowed_upstreams: list[str]


class AuthProxy(pulumi.ComponentResource):
    caddyfile: pulumi.Output[str]
    proxy: pulumi.Output[dict]
    allowed_upstreams: pulumi.Output[list[str]]

    def __init__(self, name: str, args: AuthProxyArgs, opts: pulumi.ResourceOptions | None = None):
        props = {"caddyfile": args.rendered.text, "proxy": args.rendered.facts,
                 "allowedUpstreams": args.allowed_upstreams}
        super().__init__("kimi-fleet:proxy:AuthProxy", name, props, opts)
        self.caddyfile = pulumi.Output.from_input(args.rendered.text)
        self.proxy = pulumi.Output.from_input(args.rendered.facts)
        self.allowed_upstreams = pulumi.Output.from_input(args.allowed_upstreams)
        self.register_outputs({"caddyfile": self.caddyfile, "proxy": self.proxy,
                               "allowedUpstreams": self.allowed_upstreams})
