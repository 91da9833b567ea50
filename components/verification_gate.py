"""VerificationGate: runs the endpoint verification suite after the endpoint exists.

A pulumi-command local.Command: a non-zero exit fails `pulumi up`, so a stack is only done when
its endpoint answers the way clients use it. It re-runs when its triggers change (node ids, the
engine release, the launch files). Commands do not run during preview.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import pulumi
import pulumi_command as command

from kimi_fleet.verification.cli import MEASURED_PREFIX, THROUGHPUT_PREFIX

# Relative to the project directory, where Pulumi runs local commands: the command text must not
# depend on the machine that runs `pulumi up`, or every runner would change it and re-verify.
PYTHON = ".venv/bin/python"  # the virtualenv Pulumi.yaml names
VERIFY_SCRIPT = "scripts/verify.py"
FLEET_RELEASE_SCRIPT = "scripts/await_fleet_release.py"
K8S_ROLLOUT_SCRIPT = "scripts/await_k8s_rollout.py"
PROMOTE_SCRIPT = "scripts/promote_compile_cache.py"
#: How long the gate waits for a node's compile-cache candidate after the suite passed (the node
#: publishes once admitted; a few GB upload in minutes). Nothing in time: a warning, not a failure.
COMPILE_CACHE_PROMOTION_WAIT_SECONDS = 1800


@dataclass
class VerificationGateArgs:
    stack: str
    base_url: pulumi.Input[str]
    api_key: pulumi.Input[str]
    model: str
    engine: str
    #: seconds to wait for the model to load before checking (from the sizing's time to ready)
    ready_timeout_seconds: int
    request_timeout_seconds: int
    #: the engine release the stack's image carries (a failed check names its known bugs)
    engine_release: str | None = None
    #: the context the stack promises: the gate proves it with one long prompt
    context_tokens: int | None = None
    #: sampled requests in flight at once: what the endpoint runs concurrently (more would queue)
    concurrency: int = 16
    checks: list[str] = field(default_factory=list)
    load: int = 0
    #: the stack's cost per hour: the load run's throughput is priced with it
    usd_per_hour: float | None = None
    #: the release id the endpoint must serve on every replica before and during the run
    release: str | None = None
    replicas: int = 1
    #: a fleet behind a load balancer: {region, group, target_groups, template_version, launch_template_id,
    #: min/max_healthy_percentage, instance_warmup_seconds}; the gate first starts the release's instance
    #: refresh and waits (scripts/await_fleet_release.py) until only this release's nodes are healthy targets.
    #: Kubernetes ({"kind": "kubernetes", namespace, context, deployments, leaderworkersets, timeout_seconds,
    #: pod_ready_seconds, scheduling_grace_seconds}: k8s_manifests.rollout_wait): the gate waits for the
    #: Deployments' rollout, or a multi-node replica's LeaderWorkerSet group (scripts/await_k8s_rollout.py),
    #: and undoes it when it fails
    fleet_rollout: pulumi.Input[dict] | None = None
    rollout_timeout_seconds: int = 0
    triggers: list[pulumi.Input] = field(default_factory=list)
    #: a managed mirror's compile-cache promotion after the suite passed (AwsEndpoint's
    #: compile_cache_promotion: region, bucket, cache_prefix, stack, launch, pin_parameter, and
    #: instance_ids or group); None: nothing to promote
    compile_cache_promotion: pulumi.Input[dict] | None = None
    #: the stack's kubeconfig secret (a path or the content), for kubectl on a Kubernetes rollout;
    #: None: kubectl's own (KUBECONFIG, ~/.kube/config), as the provider does
    kubeconfig: pulumi.Input[str] | None = None
    #: during a key rotation, the previous key: the suite's auth check wants it accepted too
    previous_api_key: pulumi.Input[str] | None = None


def is_k8s_rollout(rollout: dict | None) -> bool:
    return bool(rollout) and rollout.get("kind") == "kubernetes"


def k8s_rollout_argv(args: VerificationGateArgs, rollout: dict) -> list[str]:
    """The wait for a Kubernetes release's rollout; it undoes one that fails (exit 1)."""
    argv = [PYTHON, K8S_ROLLOUT_SCRIPT, "--namespace", rollout["namespace"]]
    if rollout.get("context"):
        argv += ["--context", rollout["context"]]
    for name in rollout["deployments"]:
        argv += ["--deployment", name]
    for name in rollout.get("leaderworkersets", ()):
        argv += ["--leaderworkerset", name]
    return argv + ["--release", args.release, "--timeout", str(rollout["timeout_seconds"]),
                   "--pod-ready-seconds", str(rollout["pod_ready_seconds"]),
                   "--scheduling-grace-seconds", str(rollout["scheduling_grace_seconds"])]


def k8s_rollout_wait_seconds(rollout: dict) -> int:
    """The longest the Kubernetes wait runs: the rollout, then an undo given as long."""
    return 2 * int(rollout["timeout_seconds"])


def fleet_wait_argv(args: VerificationGateArgs, rollout: dict) -> list[str]:
    argv = [PYTHON, FLEET_RELEASE_SCRIPT, "--region", rollout["region"], "--group", rollout["group"]]
    for arn in rollout["target_groups"]:
        argv += ["--target-group", arn]
    argv += ["--template-version", rollout["template_version"], "--release", args.release,
             "--replicas", str(args.replicas), "--timeout", str(args.rollout_timeout_seconds)]
    if rollout.get("launch_template_id"):
        # Rollout mode: the gate starts the refresh and rolls it back to the last good version.
        argv += ["--launch-template-id", rollout["launch_template_id"],
                 "--min-healthy-percentage", str(rollout["min_healthy_percentage"]),
                 "--max-healthy-percentage", str(rollout["max_healthy_percentage"]),
                 "--instance-warmup", str(rollout["instance_warmup_seconds"])]
    return argv


def promote_argv(promotion: dict) -> list[str]:
    """Run with the deployer's credentials, after the suite passed: nodes never promote."""
    argv = [PYTHON, PROMOTE_SCRIPT, "--region", promotion["region"], "--bucket", promotion["bucket"],
            "--cache-prefix", promotion["cache_prefix"], "--stack", promotion["stack"], "--launch", promotion["launch"],
            "--pin-parameter", promotion["pin_parameter"], "--timeout", str(COMPILE_CACHE_PROMOTION_WAIT_SECONDS)]
    if promotion.get("group"):
        return argv + ["--group", promotion["group"]]
    for instance_id in promotion["instance_ids"]:
        argv += ["--instance-id", instance_id]
    return argv


def verify_command(args: VerificationGateArgs, base_url: str, rollout: dict | None = None,
                   promotion: dict | None = None) -> str:
    report = f"build/{args.stack}/verification.json"
    argv = [
        PYTHON, VERIFY_SCRIPT,
        "--base-url", base_url,
        "--model", args.model,
        "--engine", args.engine,
        "--timeout", str(args.request_timeout_seconds),
        "--wait-ready", str(args.ready_timeout_seconds),
        "--json", report,
        "--concurrency", str(args.concurrency),
    ]
    if args.context_tokens:
        argv += ["--context", str(args.context_tokens)]
    if args.checks:
        argv += ["--only", *args.checks]
    if args.load:
        argv += ["--load", str(args.load)]
        if args.usd_per_hour:
            argv += ["--usd-per-hour", f"{args.usd_per_hour:g}"]
    if args.engine_release:
        argv += ["--engine-release", args.engine_release]
    if args.release:
        argv += ["--release", args.release, "--replicas", str(args.replicas)]
    steps = [f"mkdir -p {shlex.quote(f'build/{args.stack}')}"]
    if is_k8s_rollout(rollout) and args.release:
        steps.append(shlex.join(k8s_rollout_argv(args, rollout)))
    elif rollout and args.release:
        steps.append(shlex.join(fleet_wait_argv(args, rollout)))
    steps.append(shlex.join(argv))
    if promotion:  # only after the suite passed (&&); it never fails the gate itself
        steps.append(shlex.join(promote_argv(promotion)))
    # The key travels in the environment (a secret), never on the command line.
    return " && ".join(steps)


class VerificationGate(pulumi.ComponentResource):
    summary: pulumi.Output[str]
    time_to_ready_measured: pulumi.Output[str | None]
    throughput_measured: pulumi.Output[str | None]

    def __init__(self, name: str, args: VerificationGateArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:verification:VerificationGate", name, {"model": args.model}, opts)
        create = pulumi.Output.all(args.base_url, args.fleet_rollout, args.compile_cache_promotion).apply(
            lambda values: verify_command(args, values[0], values[1], values[2]))
        # The command waits for the rollout, then the model load (--wait-ready), then perhaps a
        # compile-cache candidate; give Pulumi more.
        promotion_wait = COMPILE_CACHE_PROMOTION_WAIT_SECONDS if args.compile_cache_promotion is not None else 0
        timeout = f"{args.rollout_timeout_seconds + args.ready_timeout_seconds + promotion_wait + 1800}s"
        environment = {"KIMI_API_KEY": pulumi.Output.secret(args.api_key)}
        if args.previous_api_key is not None:
            environment["KIMI_API_KEY_PREVIOUS"] = pulumi.Output.secret(args.previous_api_key)
        if args.kubeconfig is not None:
            environment["KIMI_KUBECONFIG"] = pulumi.Output.secret(args.kubeconfig)
        self.command = command.local.Command(
            f"{name}-verify",
            create=create,
            environment=environment,
            triggers=args.triggers,
            logging=command.local.Logging.STDOUT_AND_STDERR,
            opts=pulumi.ResourceOptions(
                parent=self,
                custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout),
            ),
        )
        # The table's last lines name every check and its status; the key is masked by the suite.
        self.summary = self.command.stdout.apply(lambda out: "\n".join((out or "").strip().splitlines()[-15:]))
        #: what the node recorded from its first phase to ready, or None (no status served)
        self.time_to_ready_measured = self.command.stdout.apply(_measured)
        #: the load run's output tok/s at its concurrency (and $/M tokens), or None without --load
        self.throughput_measured = self.command.stdout.apply(lambda out: _measured(out, THROUGHPUT_PREFIX))
        self.register_outputs({"summary": self.summary, "time_to_ready_measured": self.time_to_ready_measured,
                               "throughput_measured": self.throughput_measured})


def _measured(stdout: str | None, prefix: str = MEASURED_PREFIX) -> str | None:
    lines = [line for line in (stdout or "").splitlines() if line.startswith(prefix)]
    return lines[-1].removeprefix(prefix).strip() if lines else None
