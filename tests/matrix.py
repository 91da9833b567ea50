"""The stack matrix as the tests expect it: which stacks the program refuses, and why."""

from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names

#: Stack -> the field its refusal names. Ascend: no public commit of the W4A8 export to pin.
REFUSED_STACKS = {"ascend-a3-w4a8-sglang": "model.revision", "k8s-h100-int4-vllm": "parallelism.nodes"}
PLANNED_STACKS = [name for name in stack_names() if name not in REFUSED_STACKS]
#: Kubernetes stacks whose replica spans nodes: one LeaderWorkerSet group instead of Deployments
#: (tests/test_k8s_multi_node.py; the Deployment-shaped tests of test_k8s_manifests.py leave them out).
K8S_MULTI_NODE_STACKS = [
    name for name in stack_names()
    if (values := load_stack_config(stack_file(name)).values)["target"]["kind"] == "kubernetes"
    and values.get("parallelism", {}).get("nodes", 1) > 1]
