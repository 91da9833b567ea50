"""One replica across several nodes (issue 22): the spec's rules, the per-stage sizing, every node's
engine line in the pinned engine's own recorded parser, the cost of all the nodes, and the refusal to
deploy what is not declared yet."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from kimi_fleet import catalog
from kimi_fleet.engines.flags import argv_problems, load_manifest
from kimi_fleet.cost import estimate
from kimi_fleet.launch import engine_argv, render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import StackSpecError
from kimi_fleet.stackfile import PROJECT_ROOT, load_stack_config, stack_file
from kimi_fleet.validation import parse_spec

STACK = "h100-int4-vllm"


def variant(**changes) -> dict:
    values = copy.deepcopy(load_stack_config(stack_file(STACK)).values)
    for key, value in changes.items():  # a target is replaced whole, other settings merged
        merge = isinstance(value, dict) and key != "target"
        values[key] = {**values.get(key, {}), **value} if merge else value
    return values


def resolved(**changes) -> Resolved:
    return Resolved(parse_spec(variant(**changes), STACK, f"stacks/Pulumi.{STACK}.yaml"))


def refusal(**changes) -> str:
    with pytest.raises(StackSpecError) as refused:
        resolved(**changes)
    return str(refused.value)


def test_two_h100_nodes_hold_what_one_cannot():
    two = resolved()
    sizing = size(two)
    assert two.multi_node and two.pipeline_parallel == 2 and two.tensor_parallel == 8
    assert two.stage_layers == (31, 30)  # vLLM gives the first stage the extra layer
    assert sizing.fits and sizing.max_sequence_tokens >= two.spec.context_length
    one = refusal(parallelism={"nodes": 1})
    assert "field kimi-fleet:contextLength" in one and "no room for any context" in one
    # Each stage holds about half the layers' weights and caches half the layers' latents.
    single = Resolved(two.spec.model_copy(update={"parallelism": type(two.spec.parallelism)()}))
    assert size(single).weights_bytes_per_device * 0.45 < sizing.weights_bytes_per_device \
        < size(single).weights_bytes_per_device * 0.56
    assert sizing.kv_bytes_per_token == catalog.KIMI_K26.kv_elements_per_token * 31 // 61


@pytest.mark.parametrize("engine, nodes, split", [
    # vLLM distributed/utils.py get_pp_indices: leftovers to the second-last stage, then backwards.
    ("vllm", 2, (31, 30)), ("vllm", 4, (15, 15, 16, 15)), ("vllm", 8, (7, 7, 8, 8, 8, 8, 8, 7)),
    # SGLang srt/distributed/utils.py get_pp_indices: one each to the last stages.
    ("sglang", 2, (30, 31)), ("sglang", 4, (15, 15, 15, 16)), ("sglang", 8, (7, 7, 7, 8, 8, 8, 8, 8)),
])
def test_the_layers_split_over_stages_as_each_engine_splits_them(engine, nodes, split):
    from kimi_fleet.spec import StackSpec

    values = variant(parallelism={"nodes": nodes}, engine={"name": engine})
    r = Resolved(StackSpec.model_validate({"stack": STACK, **values}))
    assert r.stage_layers == split and sum(split) == catalog.KIMI_K26.layers


def test_sglang_puts_the_extra_layer_on_the_last_stage():
    r = Resolved(parse_spec(variant(engine={"name": "sglang", "memoryFraction": 0.8, "maxNumBatchedTokens": 4096},
                                    kvCacheDtype="fp8_e4m3", contextLength=32768), STACK, "f"))
    assert r.stage_layers == (30, 31)
    leader, worker = (engine_argv(r, 30000, rank, "10.0.0.5") for rank in (0, 1))
    manifest = load_manifest("sglang", r.image_entry.package_version)
    words = len(r.adapter.entrypoint_words(r))
    assert argv_problems(leader[words:], manifest) == [] and argv_problems(worker[words:], manifest) == []
    assert "--dist-init-addr" in leader and "10.0.0.5:29501" in leader
    assert "--node-rank" in worker and worker[worker.index("--node-rank") + 1] == "1"
    assert "--headless" not in worker  # SGLang has no such flag: its worker serves a dummy /health


@pytest.mark.parametrize("rank", [0, 1])
def test_every_node_line_parses_in_the_pinned_engines_recorded_parser(rank):
    r = resolved()
    manifest = load_manifest("vllm", r.image_entry.package_version)
    argv = engine_argv(r, r.engine.port, rank, "10.0.0.5")
    assert argv_problems(argv[2:], manifest) == []
    assert argv[argv.index("--node-rank") + 1] == str(rank)
    assert argv[argv.index("--master-addr") + 1] == "10.0.0.5"
    assert ("--headless" in argv) is (rank == 1)


def test_the_fabric_reaches_the_engine_container():
    instance = render_launch(resolved(), 1).instances[0]
    assert "--device=/dev/infiniband" in instance.docker_args  # every EFA device, however many are attached
    assert {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_DEBUG": "INFO"}.items() <= instance.env.items()
    # A stack's own env cannot silence the transport line the fabric check reads.
    quiet = render_launch(resolved(engine={"env": {"NCCL_DEBUG": "WARN"}}), 1).instances[0]
    assert quiet.env["NCCL_DEBUG"] == "INFO"
    # A one-node stack gets none of it.
    single = render_launch(Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())).instances[0]
    assert not any("infiniband" in a for a in single.docker_args) and "FI_PROVIDER" not in single.env


@pytest.mark.parametrize("changes, field, says", [
    ({"parallelism": {"nodes": 2, "pipelineParallel": 1}}, "parallelism.pipelineParallel", "one pipeline stage per node"),
    ({"parallelism": {"nodes": 2, "tensorParallel": 4}}, "parallelism.tensorParallel", "each node's 8 accelerators"),
    ({"parallelism": {"nodes": 2, "dataParallel": 2}}, "parallelism.dataParallel", "data parallel across nodes"),
    ({"capacity": {"replicas": 2}}, "capacity.replicas", "one multi-node replica per stack"),
    ({"engine": {"speculative": "eagle3", "speculativeDraftRepo": "lightseekorg/kimi-k2.6-eagle3-mla"}},
     "engine.speculative", "beside pipeline parallel"),
    ({"engine": {"image": "vllm/vllm-openai:v0.11.0"}}, "parallelism.nodes", "the catalog must know"),
    ({"capacity": {"workload": "batch"}}, "capacity.market", "one spot reclaim stops every node"),
    ({"engine": {"env": {"VLLM_PP_LAYER_PARTITION": "30,31"}}}, "engine.env.VLLM_PP_LAYER_PARTITION",
     "the engine's default split"),
    ({"target": {"kind": "aws", "aws": {"region": "us-east-1", "instanceType": "p5en.48xlarge"}},
      "accelerator": "h200"}, "parallelism.nodes", "the catalog records no EFA fabric for p5en.48xlarge"),
    ({"target": {"kind": "host", "host": {"address": "203.0.113.7"}}}, "parallelism.nodes", "a host target is one machine"),
])
def test_a_multi_node_replica_that_cannot_work_is_refused_naming_the_field(changes, field, says):
    message = refusal(**changes)
    assert f"field kimi-fleet:{field}" in message and says in message, message


def test_a_replica_costs_all_its_nodes():
    cost = estimate(resolved())
    offer = catalog.MACHINE_OFFERS["p5.48xlarge"]
    assert cost.nodes_per_replica == 2
    assert cost.on_demand_usd_per_hour == pytest.approx(2 * offer.on_demand_usd_per_hour)
    assert cost.fleet_usd_per_hour == pytest.approx(2 * offer.on_demand_usd_per_hour)


def test_the_plan_lays_out_each_node_and_declares_the_replica(tmp_path):
    result = subprocess.run([sys.executable, "scripts/plan.py", STACK, "--json", "--build-dir", str(tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (plan,) = json.loads(result.stdout)
    assert plan["valid"] and not plan["errors"] and (tmp_path / STACK).exists()
    declared = " ".join(plan["resources"]) if isinstance(plan["resources"][0], str) else json.dumps(plan["resources"])
    for what in ("PlacementGroup", "kimi-aws-replica-sg", "kimi-aws-rank0-node-instance", "kimi-aws-rank1-node-instance",
                 "kimi-aws-rank1-release-apply"):
        assert what in declared
    leader, worker = plan["layout"]
    assert (leader["layers"], worker["layers"]) == ("0-30", "31-60")
    assert leader["role"].startswith("leader") and "--headless" in worker["argv"]
    assert plan["sizing"]["fits"] and plan["cost"]["nodes_per_replica"] == 2
    human = subprocess.run([sys.executable, "scripts/plan.py", STACK], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=300)
    assert "node 1: worker (headless), stage 1, layers 31-60" in human.stdout
    assert (leader["fetch_bytes"], worker["fetch_bytes"]) == tuple(row["bytes"] for row in plan["sizing"]["node_weights"])
    assert leader["fetch_estimate"] and "estimate" in leader["fetch_basis"]
    assert "fetches and verifies ~312 GB: the small files and the shards of layers 0-30" in human.stdout
    assert "fetches and verifies ~302 GB: the small files and the shards of layers 31-60" in human.stdout
    assert "image build   5 min: the EFA engine image built on the new node, an ESTIMATE" in human.stdout
    assert "(2 nodes each)" in human.stdout


# --- the fabric check: NCCL's own words decide ---------------------------------------------------

EFA_LOG = """\
ip-10-0-1-5:123:456 [0] NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.21.1
ip-10-0-1-5:123:456 [0] NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 32 nics)
ip-10-0-1-5:123:456 [0] NCCL INFO Using network Libfabric
ip-10-0-1-5:123:456 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/Libfabric/0/GDRDMA
"""
SOCKET_LOG = """\
ip-10-0-1-6:123:456 [0] NCCL INFO NET/Plugin: Could not find: libnccl-net.so
ip-10-0-1-6:123:456 [0] NCCL INFO NET/Socket : Using [0]ens32:10.0.1.6<0>
ip-10-0-1-6:123:456 [0] NCCL INFO Using network Socket
"""
IB_LOG = "node [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/IB/0/GDRDMA\n"


def _transports(tmp_path):
    path = tmp_path / "transports.json"
    path.write_text(json.dumps({"fabric": catalog.NCCL_FABRIC_TRANSPORTS,
                                "socket": list(catalog.NCCL_SOCKET_TRANSPORTS)}))
    return path


@pytest.mark.parametrize("log, code, says", [
    (EFA_LOG, 0, "rank 1: NCCL over efa (ip-10-0-1-5:123:456 [0] NCCL INFO Using network Libfabric)"),
    (IB_LOG, 0, "rank 1: NCCL over infiniband"),
    (SOCKET_LOG, 1, "rank 1: NCCL runs over TCP sockets, not the fabric"),
    (EFA_LOG + SOCKET_LOG, 1, "rank 1: NCCL runs over TCP sockets"),
    ("INFO loading weights\n", 3, "rank 1: NCCL has not named its transport yet"),
])
def test_the_fabric_check_reads_the_transport_from_ncclls_log_and_names_the_rank(tmp_path, log, code, says):
    script = PROJECT_ROOT / "kimi_fleet/node_scripts/fabric_check.py"
    result = subprocess.run(["/usr/bin/python3", str(script), str(_transports(tmp_path)), "1", "-"], input=log,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == code, result.stderr
    assert result.stdout.startswith(says), result.stdout


# --- each node fetches its own stage's shards (issue 22, item 5) -----------------------------------

def test_each_node_fetches_its_stage_and_time_to_ready_counts_that_share_and_the_efa_image_build():
    from kimi_fleet import health
    from kimi_fleet.node_files import ADMISSION_DEADLINE_SECONDS

    r, whole = resolved(), catalog.CHECKPOINTS["int4"].size_bytes
    sizing = size(r)
    leader, worker = sizing.node_weights
    shard = whole / 64
    # Stage 0: 31 layers, the embedding; stage 1: 30 layers, the head; both the vision tower and one
    # straddling shard: an estimate, each a little over half, together the checkpoint and the overlap.
    assert leader["estimate"] and worker["estimate"] and whole / 2 < worker["bytes"] < leader["bytes"] < 0.55 * whole
    assert leader["bytes"] + worker["bytes"] == pytest.approx(whole + 2 * shard + 0.8e9, rel=1e-3)
    phases = {p["phase"]: p for p in sizing.ready_phases}
    rate = int(catalog.TRANSFER_SOURCES[r.spec.weights.source].bytes_per_second)
    assert phases["download"]["seconds"] == -(-leader["bytes"] // rate)  # the slowest node's bytes, not the whole
    assert "the largest node's share of 595 GB" in phases["download"]["basis"]
    # The EFA image build: a catalog estimate, said to be one, in time to ready and in the health budgets.
    build = phases["image build"]
    assert build["seconds"] == sizing.image_build_seconds == catalog.EFA_IMAGE_BUILD_SECONDS and build["estimate"]
    assert "ESTIMATE" in build["basis"] and "not measured" in catalog.EFA_IMAGE_BUILD_SOURCE.where
    assert sizing.cold_start_seconds == sum(p["seconds"] for p in sizing.ready_phases)
    windows = health.windows(sizing, verification_seconds=ADMISSION_DEADLINE_SECONDS, fleet=False)
    assert windows.load_budget_terms["image build (estimate)"] == catalog.EFA_IMAGE_BUILD_SECONDS
    assert windows.grace_terms["image build (estimate)"] == catalog.EFA_IMAGE_BUILD_SECONDS
    # One node: the whole checkpoint, no build; a Kubernetes replica's pods (hostPath, from the Hub)
    # fetch their stage's share as the AWS nodes do, the same estimate and time to ready; no build (a
    # prebuilt image).
    single = size(Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec()))
    assert [row["bytes"] for row in single.node_weights] == [whole] and single.image_build_seconds == 0
    assert "image build" not in {p["phase"] for p in single.ready_phases}
    k8s = Resolved(load_stack_config(stack_file("k8s-h100-int4-vllm")).spec())
    assert k8s.stage_fetch and not k8s.builds_efa_image and k8s.stage_ranges == r.stage_ranges
    k8s_sizing = size(k8s)
    assert k8s_sizing.node_weights == sizing.node_weights
    k8s_phases = {p["phase"]: p for p in k8s_sizing.ready_phases}
    assert k8s_phases["download"] == phases["download"] and k8s_sizing.download_seconds == sizing.download_seconds
    # A claim shared by every pod is filled whole by the download Job: no stage there.
    pvc = Resolved(load_stack_config(stack_file("k8s-h100-int4-vllm")).spec().model_copy(
        update={"weights": k8s.spec.weights.model_copy(update={"volume": "pvc"})}))
    assert not pvc.stage_fetch and {row["bytes"] for row in size(pvc).node_weights} == {whole}


def test_each_rank_gets_its_stage_as_integers_in_its_node_settings():
    from kimi_fleet.node_files import SecretsSource, render_node_files

    r = resolved()
    assert r.stage_ranges == ((0, 31), (31, 61))
    sizing, secrets = size(r), SecretsSource.ssm("/kimi-fleet/h100", "us-east-1", hf_token=True)
    for rank, (first, end) in enumerate(r.stage_ranges):
        env = render_node_files(r, render_launch(r, rank), sizing, secrets=secrets, ebs_volume_id="vol-0123456789abcdef0",
                                node_rank=rank)["/etc/kimi-fleet/node.env"].content
        settings = dict(line.split("=", 1) for line in env.splitlines() if "=" in line and not line.startswith("#"))
        assert (settings["PP_STAGE"], settings["PP_STAGES"], settings["PP_FIRST_LAYER"], settings["PP_END_LAYER"]) == (
            str(rank), "2", str(first), str(end))
        assert settings["WEIGHTS_FETCH_BYTES"] == str(sizing.node_weights[rank]["bytes"])
        assert settings["CHECKPOINT_BYTES"] == str(catalog.CHECKPOINTS["int4"].size_bytes)  # room: the whole, still
    single = Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())
    env = render_node_files(single, render_launch(single), size(single), secrets=secrets,
                            ebs_volume_id="vol-0123456789abcdef0")["/etc/kimi-fleet/node.env"].content
    assert "\nPP_STAGES=\n" in env and "\nPP_STAGE=\n" in env


@pytest.mark.parametrize("tensor, stages", [
    ("language_model.model.layers.30.mlp.experts.383.down_proj.weight_packed", {0}),
    ("language_model.model.layers.31.self_attn.kv_a_proj_with_mqa.weight", {1}),
    ("language_model.layers.45.mlp.gate.weight", {1}),  # the legacy NVFP4 spelling vLLM maps (kimi_k25.py:296-304)
    ("model.layers.0.mlp.down_proj.weight", {0}),  # a text-only K2 checkpoint's names
    ("language_model.model.layers.61.eh_proj.weight", set()),  # past the last layer (MTP): no stage loads it
    ("language_model.model.embed_tokens.weight", {0}),
    ("language_model.model.norm.weight", {1}),
    ("language_model.lm_head.weight", {1}),
    ("vision_tower.encoder.blocks.0.wqkv.weight", {0, 1}),  # built on every stage (kimi_k25.py:336-357)
    ("mm_projector.proj.0.weight", {0, 1}),
    ("something.new.weight", {0, 1}),  # unrecognised: every stage, never a missing tensor
])
def test_a_tensor_belongs_to_the_stages_that_build_it(tensor, stages):
    from kimi_fleet.node_scripts.weights_manifest import Stage

    r = resolved()
    nodes = [Stage(rank, len(r.stage_ranges), first, end) for rank, (first, end) in enumerate(r.stage_ranges)]
    assert {node.index for node in nodes if node.loads(tensor)} == stages


def test_a_replaced_efa_node_that_keeps_its_volume_still_builds_the_engine_image():
    from kimi_fleet import health
    from kimi_fleet.replacement import Replacement, replacement_lines
    from kimi_fleet.rollout import rollout_facts

    r = resolved()
    sizing = size(r)
    facts = rollout_facts(r, sizing, render_launch(r), estimate(r)).as_dict()
    assert facts["image_build_seconds"] == catalog.EFA_IMAGE_BUILD_SECONDS and facts["weights_volume"] == "ebs"
    node = Replacement("aws:ec2/instance:Instance", "kimi-aws-rank1-node-instance", ("instanceType",), False, True)
    (line,) = replacement_lines([node], facts, facts)
    minutes = -(-(sizing.volume_start_seconds + catalog.EFA_IMAGE_BUILD_SECONDS + health.BOOT_SECONDS
                     + health.IMAGE_PULL_SECONDS) // 60)
    assert f"about {minutes} min without service" in line, line


def _k26_index(r: Resolved, drop: str | None = None) -> dict:
    """A synthetic index with the real K2.6 names, one shard per layer: every layer, the embedding,
    the final norm, lm_head and the vision tower; `drop` leaves out every tensor whose name contains it."""
    names = {"language_model.model.embed_tokens.weight": "model-embed.safetensors",
             "language_model.model.norm.weight": "model-last.safetensors",
             "language_model.lm_head.weight": "model-last.safetensors",
             "vision_tower.encoder.blocks.0.wqkv.weight": "model-vision.safetensors"}
    for layer in range(r.stage_ranges[-1][1]):
        names[f"language_model.model.layers.{layer}.mlp.experts.0.down_proj.weight_packed"] = \
            f"model-layer{layer:03d}.safetensors"
    return {"weight_map": {name: path for name, path in names.items() if drop is None or drop not in name}}


@pytest.mark.parametrize("drop, rank, says", [
    ("layers.7.", 0, "layer 7"),  # a layer whose tensors the classifier would not see (renamed)
    ("layers.40.", 1, "layer 40"),
    ("lm_head", 1, "lm_head"),
    (".norm.", 1, "the final norm (norm)"),
    ("embed_tokens", 0, "the embedding (embed_tokens)"),
])
def test_a_stage_whose_index_lacks_one_of_its_layers_or_ends_is_refused_by_name(drop, rank, says):
    """vLLM 0.22.1 does not check a quantized model's weights were all loaded (default_loader.py:401-437):
    a tensor no stage fetched would be silently uninitialised, so stage_files refuses instead."""
    from kimi_fleet.node_scripts.weights_manifest import Stage, stage_files

    r = resolved()
    stages = [Stage(i, len(r.stage_ranges), first, end) for i, (first, end) in enumerate(r.stage_ranges)]
    first, end = r.stage_ranges[0]
    for stage in stages:  # the whole index: each stage gets its layers' shards, its ends and the vision tower
        files = stage_files(_k26_index(r), stage)
        assert "model-vision.safetensors" in files
        assert ("model-embed.safetensors" in files) == (stage.index == 0)
        assert ("model-last.safetensors" in files) == (stage.index == len(stages) - 1)
        assert {f"model-layer{n:03d}.safetensors" for n in range(stage.first_layer, stage.end_layer)} <= files
    with pytest.raises(ValueError) as refused:
        stage_files(_k26_index(r, drop), stages[rank])
    assert f"maps no tensor of {says}" in str(refused.value) and stages[rank].marker in str(refused.value)
    other = stages[1 - rank]  # the other stage does not need what is missing: it still gets its files
    assert stage_files(_k26_index(r, drop), other)
    assert (first, end) == (0, 31)
