"""kimi-fleet: one Kimi-K2.6 endpoint per stack. The stack file is validated before anything is declared."""

import json

import pulumi

from components.fleet import Fleet, FleetArgs
from kimi_fleet.cost import estimate
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import CONFIG_NAMESPACE, StackSpec, StackSpecError, parse_spec
from kimi_fleet.stackfile import SECRET_KEYS, stack_file

config = pulumi.Config(CONFIG_NAMESPACE)
stack = pulumi.get_stack()
raw = {}
for field in StackSpec.model_fields.values():
    if field.alias in SECRET_KEYS or field.alias == "stack":
        continue
    text = config.get(field.alias)
    if text is None:
        continue
    try:  # structured values arrive as JSON; plain ones as their text
        raw[field.alias] = json.loads(text)
    except json.JSONDecodeError:
        raw[field.alias] = text
try:
    spec = parse_spec(raw, stack, str(stack_file(stack).relative_to(stack_file(stack).parent.parent)))
except StackSpecError as error:
    # Refuse before declaring anything: nothing half-deployed.
    raise pulumi.RunError(str(error)) from None

resolved = Resolved(spec)
sizing = size(resolved)
launch = render_launch(resolved)
cost = estimate(resolved)
fleet = Fleet("kimi", FleetArgs(
    resolved=resolved,
    sizing=sizing,
    launch=launch,
    cost=cost,
    api_key=config.get_secret("apiKey"),
    hf_token=config.get_secret("hfToken"),
))

pulumi.export("endpoint", fleet.endpoint_url)
pulumi.export("openai_base_url", fleet.openai_base_url)
pulumi.export("model", spec.model.served_name)
pulumi.export("api_key", fleet.api_key)
pulumi.export("node_ids", fleet.node_ids)
pulumi.export("market", fleet.market)
pulumi.export("hourly_cost_usd", fleet.hourly_cost_usd)
pulumi.export("dns", fleet.dns)
pulumi.export("verification", fleet.verification)
pulumi.export("max_context_tokens", sizing.largest_context)
pulumi.export("time_to_ready_seconds", sizing.cold_start_seconds)
