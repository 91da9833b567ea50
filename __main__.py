"""kimi-fleet: one Kimi-K2.6 endpoint per stack. The stack file is validated before anything is declared."""

import pulumi

from components.endpoint_outputs import TargetSecrets
from components.fleet import Fleet, FleetArgs
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.caddy import check_api_key
from kimi_fleet.key_rotation import check_rotation
from kimi_fleet.cost import estimate
from kimi_fleet.launch import render_launch
from kimi_fleet.spec import CONFIG_NAMESPACE
from kimi_fleet.validation import validate
from kimi_fleet.stackfile import spec_values, stack_file, validate_stack_name

config = pulumi.Config(CONFIG_NAMESPACE)
stack = pulumi.get_stack()
where = str(stack_file(stack).relative_to(stack_file(stack).parent.parent))
try:
    validate_stack_name(stack, where)
    # Every config key the engine passed (not only the spec's): an unknown key or namespace is refused.
    everything = {**pulumi.runtime.config.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
    # Validated, resolved and sized in one pass: the run reuses both.
    spec, resolved, sizing = validate(spec_values(everything, where), stack, where)
    chosen_key = everything.get(f"{CONFIG_NAMESPACE}:apiKey")
    previous_key = everything.get(f"{CONFIG_NAMESPACE}:apiKeyPrevious")
    for field, key in (("apiKey", chosen_key), ("apiKeyPrevious", previous_key)):  # the same rule on every target
        if key is not None:
            check_api_key(key, field)
    check_rotation(spec.api_key_rotation, where, chosen=chosen_key is not None, previous=previous_key is not None)
except ValueError as error:  # StackFileError, StackSpecError, a key of the wrong shape
    # Refuse before declaring anything: nothing half-deployed.
    raise pulumi.RunError(str(error)) from None

launch = render_launch(resolved)
try:  # render what lands on nodes once up front: a file that cannot be delivered is a refusal
    render_artifacts(resolved, sizing, launch)
except ValueError as error:
    raise pulumi.RunError(f"{where}: {error}") from None
cost = estimate(resolved)
fleet = Fleet("kimi", FleetArgs(
    resolved=resolved,
    sizing=sizing,
    launch=launch,
    cost=cost,
    api_key=config.get_secret("apiKey"),
    previous_api_key=config.get_secret("apiKeyPrevious"),
    hf_token=config.get_secret("hfToken"),
    # Config is read here only; components get what they need.
    target_secrets=TargetSecrets(ssh_host=config.get_secret("sshHost"),
                                 ssh_private_key=config.get_secret("sshPrivateKey"),
                                 kubeconfig=config.get_secret("kubeconfig")),
))

pulumi.export("endpoint", fleet.endpoint_url)
pulumi.export("openai_base_url", fleet.openai_base_url)
pulumi.export("model", spec.model.served_name)
pulumi.export("api_key", fleet.api_key)
pulumi.export("api_key_fingerprint", fleet.api_key_fingerprint)
pulumi.export("node_ids", fleet.node_ids)
pulumi.export("market", fleet.market)
pulumi.export("hourly_cost_usd", fleet.hourly_cost_usd)
pulumi.export("dns", fleet.dns)
pulumi.export("release", fleet.release)
pulumi.export("verification", fleet.verification)
pulumi.export("max_context_tokens", sizing.largest_context)
pulumi.export("time_to_ready_seconds", sizing.cold_start_seconds)
pulumi.export("time_to_ready_measured", fleet.time_to_ready_measured)
pulumi.export("throughput_measured", fleet.throughput_measured)
pulumi.export("dashboard_url", fleet.dashboard_url)
pulumi.export("metrics_location", fleet.metrics_location)
pulumi.export("alarm_topic_arn", fleet.alarm_topic_arn)
pulumi.export("metrics_key", fleet.metrics_key)  # a host's scrape-endpoint key (secret)
