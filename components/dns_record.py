"""DnsRecord: the stack's domain in a Route53 hosted zone, pointing at the node or the fleet's NLB.

Without a hosted zone there is no record: the `record` output says what to point where by hand
(Caddy needs the name to resolve to the node before it can obtain a certificate).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

#: Short, so a replaced address is picked up quickly.
RECORD_TTL_SECONDS = 60


@dataclass
class DnsRecordArgs:
    domain: str
    hosted_zone_id: str | None
    #: An Elastic IP (A record) ...
    address: pulumi.Input[str] | None = None
    #: ... or a load balancer (alias A record).
    alias_dns_name: pulumi.Input[str] | None = None
    alias_zone_id: pulumi.Input[str] | None = None


class DnsRecord(pulumi.ComponentResource):
    fqdn: pulumi.Output[str]
    #: What the record is, or what to create by hand when no hosted zone is configured.
    record: pulumi.Output[str]

    def __init__(self, name: str, args: DnsRecordArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:DnsRecord", name, None, opts)
        if (args.address is None) == (args.alias_dns_name is None):
            raise ValueError("DnsRecord needs either an address or a load balancer alias")
        target = pulumi.Output.from_input(args.address if args.address is not None else args.alias_dns_name)
        kind = "A" if args.address is not None else "ALIAS A"
        self.fqdn = pulumi.Output.from_input(args.domain)
        if args.hosted_zone_id:
            if args.address is not None:
                aws.route53.Record(f"{name}-a", zone_id=args.hosted_zone_id, name=args.domain, type="A",
                                   ttl=RECORD_TTL_SECONDS, records=[args.address],
                                   opts=pulumi.ResourceOptions(parent=self))
            else:
                aws.route53.Record(f"{name}-alias", zone_id=args.hosted_zone_id, name=args.domain, type="A",
                                   aliases=[aws.route53.RecordAliasArgs(name=args.alias_dns_name,
                                                                        zone_id=args.alias_zone_id,
                                                                        evaluate_target_health=True)],
                                   opts=pulumi.ResourceOptions(parent=self))
            self.record = target.apply(lambda t: f"{args.domain} {kind} {t} (zone {args.hosted_zone_id})")
        else:
            self.record = target.apply(
                lambda t: f"no hosted zone configured: create {args.domain} {kind} {t} at your DNS provider"
            )
        self.register_outputs({"fqdn": self.fqdn, "record": self.record})
