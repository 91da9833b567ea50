"""A real Auto Scaling API on loopback for the steward (kimi_fleet/steward.py): moto's server, in this
process (its state is the test's to read and to put instances in a wait state), with the one call
moto 5.2 lacks, CompleteLifecycleAction, answered as AWS documents it:
- the group and the hook must exist, and the instance must be in the group waiting on that hook's
  transition (Pending:Wait for EC2_INSTANCE_LAUNCHING, Terminating:Wait for EC2_INSTANCE_TERMINATING);
  anything else is AWS's ValidationError "No active Lifecycle Action found with instance ID ...";
- Pending:Wait + CONTINUE: InService; + ABANDON: Terminating (the group replaces it);
  Terminating:Wait + either result: Terminating:Proceed (the group terminates it).
A wait state is where AWS puts an instance its hook holds: the tests set it (hold())."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from moto.autoscaling import autoscaling_backends
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import EmptyResult
from moto.server import ThreadedMotoServer

ACCOUNT = "123456789012"
WAIT_STATE = {"autoscaling:EC2_INSTANCE_LAUNCHING": "Pending:Wait",
              "autoscaling:EC2_INSTANCE_TERMINATING": "Terminating:Wait"}
AFTER = {("Pending:Wait", "CONTINUE"): "InService", ("Pending:Wait", "ABANDON"): "Terminating",
         ("Terminating:Wait", "CONTINUE"): "Terminating:Proceed", ("Terminating:Wait", "ABANDON"): "Terminating:Proceed"}


def _complete_lifecycle_action(self):
    group_name = self._get_param("AutoScalingGroupName")
    hook_name = self._get_param("LifecycleHookName")
    instance_id = self._get_param("InstanceId")
    result = self._get_param("LifecycleActionResult")
    backend = self.autoscaling_backend
    group = backend.autoscaling_groups.get(group_name)
    hook = backend.lifecycle_hooks.get(f"{group_name}_{hook_name}")
    if group is None or hook is None:
        raise ValidationError(f"No Lifecycle Hook found with name {hook_name} for group {group_name}")
    if result not in ("CONTINUE", "ABANDON"):
        raise ValidationError(f"Invalid LifecycleActionResult {result}")
    state = next((s for s in group.instance_states if s.instance.id == instance_id), None)
    if state is None or state.lifecycle_state != WAIT_STATE[hook.lifecycle_transition]:
        raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")
    state.lifecycle_state = AFTER[(state.lifecycle_state, result)]
    return EmptyResult()


@contextmanager
def autoscaling_api(region: str) -> Iterator[tuple[str, object]]:
    """(endpoint URL, moto's Auto Scaling backend for `region`) of a fresh in-process server."""
    AutoScalingResponse.complete_lifecycle_action = _complete_lifecycle_action
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto's backends are the process's: start from none, whatever an earlier test of this worker left.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=30)
    try:
        yield f"http://{host}:{port}", autoscaling_backends[ACCOUNT][region]
    finally:
        server.stop()
        del AutoScalingResponse.complete_lifecycle_action


def hold(backend, group: str, instance_id: str, lifecycle_state: str) -> None:
    """Put an instance of `group` in a lifecycle state, as a hook holding it would."""
    (state,) = [s for s in backend.autoscaling_groups[group].instance_states if s.instance.id == instance_id]
    state.lifecycle_state = lifecycle_state


def create_groups(url: str, region: str, sizes: dict[str, int], hooks: dict[str, str]) -> None:
    """Auto Scaling groups (name -> size) on the moto server at `url`, from one launch template; the
    first group gets the lifecycle hooks (name -> transition)."""
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=url, region_name=region)
    client = boto3.client("autoscaling", endpoint_url=url, region_name=region)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    template = ec2.create_launch_template(LaunchTemplateName="kimi", LaunchTemplateData={
        "ImageId": image, "InstanceType": "p5e.48xlarge"})["LaunchTemplate"]["LaunchTemplateId"]
    for name, size in sizes.items():
        client.create_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=size, MaxSize=size, DesiredCapacity=size,
            LaunchTemplate={"LaunchTemplateId": template}, AvailabilityZones=[f"{region}a"])
    for hook, transition in hooks.items():
        client.put_lifecycle_hook(AutoScalingGroupName=next(iter(sizes)), LifecycleHookName=hook,
                                  LifecycleTransition=transition)
