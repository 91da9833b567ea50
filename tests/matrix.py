"""The stack matrix as the tests expect it: which stacks the program refuses, and why."""

from kimi_fleet.stackfile import stack_names

#: Stack -> the field its refusal names. Ascend: no public commit of the W4A8 export to pin.
#: H100: one replica over two nodes, sized and laid out per node, not deployable yet (issue 22).
REFUSED_STACKS = {"ascend-a3-w4a8-sglang": "model.revision", "h100-int4-vllm": "parallelism.nodes"}
PLANNED_STACKS = [name for name in stack_names() if name not in REFUSED_STACKS]
