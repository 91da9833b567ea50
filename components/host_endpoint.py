"""HostEndpoint: the stack on a machine you already have, over SSH (pulumi-command).

The same node files cloud-init writes on AWS are copied to the host, then the same idempotent
bootstrap runs: it restarts an engine only when its env file changed, so switching engine or
quantization is an edit of the stack and `pulumi up`. Secrets reach root-only files through the
command's stdin, never its command line. A GPU cloud that only takes a startup script (seed 000)
gets no SSH resources: the component records the cloud-config to paste.
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import shlex
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random
from pulumi_command import remote

from components.auth_proxy import AuthProxy, AuthProxyArgs
from components.endpoint_outputs import EndpointArgs, publish_endpoint
from components.mirror_fill import MirrorManifestPin, MirrorManifestPinArgs
from components.node_secrets import checked_api_key, checked_previous_api_key
from kimi_fleet import node_files, node_metrics
from kimi_fleet.cost import estimate
from kimi_fleet.node_files import SecretsSource
from kimi_fleet.spec import CONFIG_NAMESPACE

#: The deployer's copy of the applier (not a bundle file: a release never rewrites what applies it).
HOST_APPLIER = "/usr/local/lib/kimi-fleet-deploy/apply_release.py"
#: Where the deployer copies each release bundle (root-only); the applier checks its SHA-256.
HOST_BUNDLE_DIR = "/var/lib/kimi-fleet/bundles"
#: The deployer's drop box for the host's secrets (root-only): the applier takes them in at the swap.
HOST_INCOMING_SECRETS = "/var/lib/kimi-fleet/incoming-secrets"
#: Beyond the bootstrap: the new release's admission wait and, when it fails, the restored one's
#: (each the warm start and the node's own admission deadline plus the applier's margins:
#: apply_release.admission_budget), and the new images' pulls while the old release serves.
APPLY_MARGIN_SECONDS = 2 * (600 + 4 * 60) + 1800
#: The scrape endpoint's key: as long as the generated API key, letters and digits (Caddy's key rule).
METRICS_KEY_LENGTH = 48


@dataclass
class HostEndpointArgs(EndpointArgs):
    """The shared endpoint inputs; nothing Host-specific beyond the spec."""


def install_from_stdin(path: str, mode: int) -> str:
    """A remote command that writes stdin to `path` atomically with `mode`, as root."""
    tmp = f"{path}.kimi-tmp"
    script = (
        f"umask 077 && mkdir -p {shlex.quote(posixpath.dirname(path))} && cat > {shlex.quote(tmp)} && "
        f"chmod {mode:o} {shlex.quote(tmp)} && mv {shlex.quote(tmp)} {shlex.quote(path)}"
    )
    return f"sudo sh -c {shlex.quote(script)}"


def incoming_secret(path: str) -> str:
    """Where the deployer drops the secret the node reads at `path` (apply_release.take_incoming_secrets
    finds it by the same last part)."""
    return f"{HOST_INCOMING_SECRETS}/{posixpath.basename(path)}"


def host_apply_command(digest: str, seconds: int) -> str:
    """The applier as a transient systemd unit: a dropped SSH session (or an interrupted `pulumi up`)
    does not stop it mid-swap or mid-rollback, and the unit is killed past `seconds` (the command
    provider enforces no timeout). The unit's log comes back on the session; once applied, older
    bundles go (the applier keeps its own rollback copies)."""
    bundle = f"{HOST_BUNDLE_DIR}/{digest}.json"
    script = (
        f"unit=kimi-apply-{digest[:12]}-$(date +%s); "
        f"sudo systemd-run --unit=\"$unit\" --collect --wait --quiet --property=RuntimeMaxSec={seconds} "
        f"/usr/bin/python3 {HOST_APPLIER} --bundle-file {bundle} --expect {digest} --secrets-from {HOST_INCOMING_SECRETS}; "
        "status=$?; "
        "sudo journalctl -u \"$unit\" -o cat --no-pager; "
        f"if [ $status -eq 0 ]; then sudo find {HOST_BUNDLE_DIR} -maxdepth 1 -name '*.json' ! -name {digest}.json -delete; fi; "
        "exit $status"
    )
    return f"sh -c {shlex.quote(script)}"


def _dns_record_type(address: str) -> str:
    try:
        return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
    except ValueError:
        return "CNAME"


class HostEndpoint(pulumi.ComponentResource):
    endpoint_url: pulumi.Output[str]
    openai_base_url: pulumi.Output[str]
    node_ids: pulumi.Output[list[str]]
    market: pulumi.Output[str]
    hourly_cost_usd: pulumi.Output[float | None]
    #: The cloud-config to paste into a startup-script-only cloud; None on an SSH host.
    user_data: str | None
    #: The scrape endpoint (a stack output): https://<domain>:9443/metrics/ then <job> (kimi-engine/<i>,
    #: kimi-gpu, kimi-proxy, kimi-node), behind `metrics_key` as a Bearer token. No dashboard here.
    metrics_location: str
    dashboard_url: None
    #: The scrape endpoint's own key (secret). A startup-script host gets it by hand at
    #: /etc/kimi-fleet/secrets/metrics-key (mode 600); until then the endpoint refuses every scrape.
    metrics_key: pulumi.Output[str]

    def __init__(self, name: str, args: HostEndpointArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:host:HostEndpoint", name, None, opts)
        r, sizing, launch = args.resolved, args.sizing, args.launch
        host_spec = r.spec.target.host
        child = pulumi.ResourceOptions(parent=self)

        # The scrape endpoint: a site of the host's own Caddy on its own port and key (node_metrics.py).
        # The host spec names no private address to bind it to; a key works wherever the host is.
        self.metrics_location = node_metrics.scrape_location(r.spec.domain)
        self.dashboard_url = None
        self.metrics_key = pulumi.Output.secret(random.RandomPassword(
            f"{name}-metrics-key", length=METRICS_KEY_LENGTH, special=False, opts=child).result)

        release = node_files.node_release(r, launch, sizing)
        self.proxy = AuthProxy(
            f"{name}-proxy",
            AuthProxyArgs(rendered=node_files.render_proxy_for(r, launch, release=release),
                          allowed_upstreams=launch.upstreams),
            child,
        )
        if host_spec.startup_script_only:
            if r.spec.weights.source == "s3-mirror":
                # The pasted cloud-config is rendered before `pulumi up` verifies anything: it could
                # only carry the placeholder, which every node refuses. Say so now, not at boot.
                raise ValueError(
                    f"stack {r.spec.stack}: weights.source s3-mirror with target.host.startupScriptOnly: the node "
                    "would need the mirror manifest's SHA-256, which the deployer learns only when it checks the "
                    "manifest against the Hub during `pulumi up`; use weights.source huggingface, or an SSH host")
            self.user_data = node_files.render_startup_script(r, launch, sizing)
            node_ids: pulumi.Input[list[str]] = []
            hourly = r.offer.on_demand_usd_per_hour if r.offer else None
        else:
            self.user_data = None
            address = self._deploy_over_ssh(name, args, child)
            node_ids = pulumi.Output.from_input(address).apply(lambda a: [a])
            hourly = estimate(r).fleet_usd_per_hour  # a machine you own: its stated price (nodeHourlyUsd), if any

        publish_endpoint(self, domain=r.spec.domain, node_ids=node_ids, market=r.spec.capacity.effective_market,
                         hourly_cost_usd=hourly, extra={"metrics_location": self.metrics_location,
                                                        "metrics_key": self.metrics_key})

    def _deploy_over_ssh(self, name: str, args: HostEndpointArgs, child: pulumi.ResourceOptions) -> pulumi.Input[str]:
        r, sizing, launch = args.resolved, args.sizing, args.launch
        host_spec = r.spec.target.host
        given = args.target_secrets
        address = host_spec.address or given.ssh_host
        if address is None or given.ssh_private_key is None:
            missing = [name for name, value in (("sshHost", address), ("sshPrivateKey", given.ssh_private_key))
                       if value is None]
            raise ValueError(f"stack {r.spec.stack}: an existing host needs the secret config "
                             f"{', '.join(f'{CONFIG_NAMESPACE}:{m}' for m in missing)} "
                             "(pulumi config set --secret ...)")
        connection = remote.ConnectionArgs(
            host=address, user=host_spec.user, port=host_spec.port, private_key=given.ssh_private_key,
        )
        secrets = SecretsSource("files")

        packages = remote.Command(
            f"{name}-packages",
            connection=connection,
            create="sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                   + " ".join(node_files.NODE_PACKAGES),
            opts=child,
        )
        # The key's shape is checked here, where it is set, not by the host's proxy after the deploy.
        secret_values = {"api-key": (secrets.api_key_file, pulumi.Output.from_input(args.api_key).apply(checked_api_key))}
        if args.hf_token is not None:
            secret_values["hf-token"] = (secrets.hf_token_file, args.hf_token)
        # The scrape endpoint's key, its own secret file (Caddy reads it as METRICS_KEY_ENV).
        secret_values["metrics-key"] = (node_metrics.METRICS_KEY_FILE, self.metrics_key)
        if args.previous_api_key is not None:  # a rotation's overlap; removed with it (the delete below)
            secret_values["api-key-previous"] = (node_files.PREVIOUS_API_KEY_FILE,
                                                 pulumi.Output.from_input(args.previous_api_key).apply(checked_previous_api_key))
        # Into the deployer's root-only drop box, not over the live key: the applier takes them in
        # with the release (at its swap), so a release that fails goes back with its own key.
        copies: list[remote.Command] = [
            remote.Command(
                f"{name}-secret-{label}",
                connection=connection,
                create=install_from_stdin(incoming_secret(path), 0o600),
                delete=f"sudo rm -f {shlex.quote(path)} {shlex.quote(incoming_secret(path))}",
                stdin=pulumi.Output.secret(value),
                logging=remote.Logging.NONE,
                opts=child,
            )
            for label, (path, value) in secret_values.items()
        ]

        files = node_files.render_node_files(r, launch, sizing, secrets=secrets)
        bundle: pulumi.Input[str] = node_files.release_bundle(files)
        if r.spec.weights.source == "s3-mirror":
            # The mirror's manifest, checked against the Hub on this side; node.env carries its
            # SHA-256 and the node refuses any other manifest (issue 21, item 4).
            pin = MirrorManifestPin(f"{name}-mirror-pin", MirrorManifestPinArgs(
                mirror_uri=r.spec.weights.s3_mirror_uri, repo=r.repo, revision=r.revision, region=None,
                hf_token=args.hf_token), child)
            bundle = pin.manifest_sha256.apply(lambda digest: node_files.release_bundle(node_files.render_node_files(
                r, launch, sizing, secrets=secrets, mirror_manifest_sha256=digest)))
        digest = pulumi.Output.from_input(bundle).apply(node_files.bundle_digest)
        bundle_path = digest.apply(lambda d: f"{HOST_BUNDLE_DIR}/{d}.json")

        # The release travels as one content-addressed bundle, applied by the same applier as an AWS
        # single node: staged, prepared while the current release serves (secrets, weights, images),
        # swapped, admitted within the sizing's budget, and restored if it is not (issue 20).
        applier = remote.Command(
            f"{name}-applier",
            connection=connection,
            create=install_from_stdin(HOST_APPLIER, 0o755),
            stdin=node_files.node_script("apply_release.py"),
            opts=child,
        )
        bundle_copy = remote.Command(
            f"{name}-bundle",
            connection=connection,
            create=bundle_path.apply(lambda path: install_from_stdin(path, 0o600)),
            stdin=bundle,
            opts=child,
        )
        # What each node file's resource did before the bundle: it removes its file on destroy. They
        # stay, named as before, so moving an existing host to the bundle removes nothing that serves.
        cleanups = [
            remote.Command(
                f"{name}-file-{file.path.strip('/').replace('/', '-')}",
                connection=connection,
                create="true",
                delete=f"sudo rm -f {shlex.quote(file.path)}",
                opts=child,
            )
            for file in files.values()
        ]

        admission = sizing.warm_start_seconds + node_files.ADMISSION_DEADLINE_SECONDS
        seconds = node_files.bootstrap_timeout_seconds(sizing) + 2 * admission + APPLY_MARGIN_SECONDS
        timeout = f"{seconds}s"
        remote.Command(
            f"{name}-bootstrap",
            connection=connection,
            # Fails (and so does `pulumi up`) naming the release, the host and the cause when the
            # release does not admit itself; the previous release then serves again.
            create=digest.apply(lambda d: host_apply_command(d, seconds)),
            # A rotated secret re-runs it too (Caddy restarts on a new key); the digest stays secret.
            # The scrape key is generated once and never rotated: its copy is a dependency, no trigger.
            triggers=[digest] + [
                pulumi.Output.secret(value).apply(lambda v: hashlib.sha256(v.encode()).hexdigest())
                for label, (_, value) in secret_values.items() if label != "metrics-key"
            ],
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(
                depends_on=[packages, applier, bundle_copy, *copies, *cleanups],
                custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout),
            )),
        )

        if host_spec.hosted_zone_id:
            aws.route53.Record(
                f"{name}-dns",
                zone_id=host_spec.hosted_zone_id,
                name=r.spec.domain,
                type=pulumi.Output.from_input(address).apply(_dns_record_type),
                ttl=60,
                records=[address],
                opts=child,
            )
        return address
