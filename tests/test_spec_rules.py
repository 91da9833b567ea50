"""The stack spec and the compatibility rules: bad stacks are refused with field, value and reason."""

import pytest

from kimi_fleet import catalog, health
from kimi_fleet.launch import engine_argv
from kimi_fleet.sizing import size
from kimi_fleet.resolve import Resolved
from kimi_fleet.spec import StackSpecError, image_is_pinned
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names

REVISION = "0123456789abcdef0123456789abcdef01234567"


def stack(**overrides) -> dict:
    base = {
        "accelerator": "h200",
        "engine": {"name": "vllm"},
        "target": {"kind": "aws"},
        "domain": "kimi.example.com",
    }
    base.update(overrides)
    return base


def refuse(raw: dict) -> str:
    with pytest.raises(StackSpecError) as caught:
        parse_spec(raw, "t", "stacks/Pulumi.t.yaml")
    return str(caught.value)


def test_a_short_stack_gets_hardware_defaults():
    spec = parse_spec(stack(), "t", "f")
    r = Resolved(spec)
    assert r.tensor_parallel == 8 and r.engines_per_node == 1
    assert r.revision == catalog.CHECKPOINTS["int4"].revision
    assert r.image == "vllm/vllm-openai:v0.22.1"
    assert r.offer.instance_type == "p5en.48xlarge"
    assert spec.capacity.effective_market == "on-demand"


def test_errors_name_the_file_the_field_and_the_value():
    message = refuse(stack(accelerator="h300"))
    assert "stacks/Pulumi.t.yaml" in message
    assert "kimi-fleet:accelerator" in message and "'h300'" in message
    assert "h200" in message  # lists what is allowed


@pytest.mark.parametrize("revision", ["main", "7eb5002f", "7EB5002F6AADC958AED6A9177B7ED26BB94011BB"])
def test_unpinned_revisions_are_refused(revision):
    message = refuse(stack(model={"revision": revision}))
    assert "model.revision" in message and "40-hex" in message


@pytest.mark.parametrize("image,pinned", [
    ("vllm/vllm-openai:latest", False),
    ("vllm/vllm-openai", False),
    ("lmsysorg/sglang:nightly-dev-20260101", False),
    ("registry:5000/vllm", False),
    ("vllm/vllm-openai:v0.22.1", True),
    ("vllm/vllm-openai@sha256:" + "a" * 64, True),
])
def test_image_pinning(image, pinned):
    assert image_is_pinned(image) is pinned
    if not pinned:
        assert "not pinned" in refuse(stack(engine={"name": "vllm", "image": image}))


def test_nvfp4_only_on_blackwell():
    message = refuse(stack(checkpoint="nvfp4"))
    assert "NVFP4 needs Blackwell" in message and "sm_90" in message


def test_sglang_nvfp4_refused_on_sm120():
    message = refuse(stack(accelerator="rtxpro6000", checkpoint="nvfp4", engine={"name": "sglang"},
                           target={"kind": "host"}))
    assert "NaN" in message and "sm_120" in message


def test_nvfp4_on_sm120_needs_the_cuda13_image():
    message = refuse(stack(accelerator="rtxpro6000", checkpoint="nvfp4", target={"kind": "host"},
                           engine={"name": "vllm", "image": "vllm/vllm-openai:v0.22.1"}))
    assert "CUDA 13" in message


def test_sglang_on_amd_refuses_tp8_with_the_head_arithmetic():
    message = refuse(stack(accelerator="mi300x", engine={"name": "sglang"}, target={"kind": "host"},
                           parallelism={"tensorParallel": 8}))
    assert "tensor parallel <= 4" in message
    assert "64 heads / 8 = 8 heads per GPU" in message and "multiple of 16" in message


def test_an_8_gpu_amd_node_runs_two_tp4_engines():
    r = Resolved(parse_spec(stack(accelerator="mi300x", engine={"name": "sglang"}, target={"kind": "host"}), "t", "f"))
    assert (r.tensor_parallel, r.engines_per_node) == (4, 2)
    assert r.image == "lmsysorg/sglang:v0.5.9-rocm700-mi30x" and r.kv_cache_dtype == "fp8_e4m3"


def test_vllm_tool_call_flags_cannot_be_overridden():
    message = refuse(stack(engine={"name": "vllm", "extraArgs": ["--tool-call-parser=hermes"]}))
    assert "--enable-auto-tool-choice" in message and "kimi_k2" in message


def test_language_model_only_excludes_encoder_data_mode():
    message = refuse(stack(engine={"name": "vllm", "languageModelOnly": True, "mmEncoderTpMode": "data"}))
    assert "languageModelOnly" in message


def test_a_machine_the_target_cannot_provide_is_refused():
    message = refuse(stack(accelerator="mi300x", engine={"name": "sglang"}))
    assert "field kimi-fleet:acceleratorCount (given 8): no AWS instance type in the catalog carries 8x AMD" in message
    assert "the catalog has no AWS instance with mi300x" in message


def test_an_accelerator_count_the_heads_do_not_divide_is_blamed_on_the_count_the_user_set():
    """Issue 26: acceleratorCount: 3 was blamed on parallelism.tensorParallel, a field never set."""
    message = refuse(stack(acceleratorCount=3, target={"kind": "host"}))
    assert "field kimi-fleet:acceleratorCount (given 3)" in message
    assert "use an acceleratorCount of 1, 2, 4, 8, 16, 32, 64" in message
    assert "parallelism.tensorParallel (given" not in message
    message = refuse(stack(parallelism={"tensorParallel": 3, "enginesPerNode": 1}, acceleratorCount=3,
                           target={"kind": "host"}))
    assert "field kimi-fleet:parallelism.tensorParallel (given 3): must divide the model's 64 attention heads: " \
           "one of 1, 2, 4, 8, 16, 32, 64" in message
    message = refuse(stack(target={"kind": "aws", "aws": {"instanceType": "p5.48xlarge"}}))
    assert "carries 8x h100" in message


def test_interactive_spot_needs_an_on_demand_base():
    message = refuse(stack(capacity={"workload": "interactive", "market": "spot", "onDemandBase": 0}))
    assert "onDemandBase >= 1" in message
    spec = parse_spec(stack(capacity={"workload": "batch"}), "t", "f")
    assert spec.capacity.effective_market == "spot" and spec.capacity.effective_on_demand_base == 0


def test_ssh_open_to_the_world_is_refused():
    message = refuse(stack(target={"kind": "aws", "aws": {"sshAllowlist": ["0.0.0.0/0"]}}))
    assert "opens SSH to the world" in message


def test_a_stack_that_does_not_fit_names_the_largest_context():
    message = refuse(stack(accelerator="rtxpro6000", engine={"name": "sglang"}, target={"kind": "host"}))
    assert "does not fit" in message and "largest context that fits is" in message


def test_h100_on_one_node_does_not_fit_at_all():
    message = refuse(stack(accelerator="h100", contextLength=8192,
                           target={"kind": "aws", "aws": {"instanceType": "p5.48xlarge"}}))
    assert "no room for any context" in message


def test_unknown_fields_are_refused_with_the_key_meant():
    assert "field kimi-fleet:gpuCount (given 8): unknown key" in refuse(stack(gpuCount=8))
    message = refuse(stack(engine={"name": "vllm", "memoryFractoin": 0.9}))
    assert "field kimi-fleet:engine.memoryFractoin (given 0.9): unknown key (did you mean 'memoryFraction'?)" in message


def test_secrets_in_plain_text_are_refused(tmp_path):
    path = tmp_path / "Pulumi.leaky.yaml"
    path.write_text("config:\n  kimi-fleet:apiKey: hunter2\n")
    with pytest.raises(ValueError, match="pulumi config set --secret apiKey"):
        load_stack_config(path)


from tests.matrix import REFUSED_STACKS as EXPECTED_REFUSALS  # noqa: E402


@pytest.mark.parametrize("name", stack_names())
def test_every_stack_in_the_matrix_is_valid_or_refused_for_its_known_reason(name):
    """Refused by its spec, or (a stack that is sized and laid out but not deployable yet) by the
    rendering of what would land on its nodes: either way before anything is declared."""
    from kimi_fleet.artifacts import render_artifacts
    from kimi_fleet.launch import render_launch
    from kimi_fleet.sizing import size

    config = load_stack_config(stack_file(name))
    if name not in EXPECTED_REFUSALS:
        config.spec()
        return
    try:
        r = Resolved(config.spec())
    except StackSpecError as refused:
        assert EXPECTED_REFUSALS[name] in str(refused)
        return
    with pytest.raises(ValueError, match=EXPECTED_REFUSALS[name]):
        render_artifacts(r, size(r), render_launch(r))


def test_the_matrix_has_the_issue_stacks_and_seed_000s_startup_script_cloud():
    assert set(stack_names()) == {
        "h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang", "h100-int4-vllm",
        "rtxpro6000-int4-sglang", "rtxpro6000-nvfp4-vllm", "mi300x-int4-sglang", "mi355x-int4-sglang",
        "gb200-int4-vllm", "ascend-a3-w4a8-sglang", "spheron-h200-int4-vllm", "k8s-h100-int4-vllm", "b300-nvfp4-vllm",
    }


def test_vllm_engines_share_a_node_on_the_recipes_blackwell_layout_and_the_plan_says_what_a_hang_costs():
    """Issue 25: two TP4 engines per B200/B300 node (the K2.6 recipes' NVFP4 layout). vLLM's /health is
    liveness only (vllm #39863): the node's watchdog probes each engine by a real generation and
    restarts a hung one, so the plan states the window in which a hung engine keeps its share."""
    for name in ("b200-nvfp4-vllm", "b300-nvfp4-vllm"):
        r = Resolved(load_stack_config(stack_file(name)).spec())
        assert (r.tensor_parallel, r.engines_per_node) == (4, 2) and not r.engine.health_runs_generation
        argv = engine_argv(r, 8000)
        for flag in catalog.VLLM_BLACKWELL_NVFP4_FLAGS:
            assert flag in argv, (name, flag)
        assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
        windows = health.windows(size(r), verification_seconds=600, fleet=False)
        warning = health.shared_node_exposure("vllm", r.engine.health_path, False, r.engines_per_node, windows)
        seconds = health.hung_engine_window_seconds(windows)
        assert "1/2 of new requests" in warning and f"up to {seconds} s" in warning
        # The probes wait out their timeout (longer than the timer interval): the window counts them.
        assert seconds >= windows.probe_interval_seconds + windows.stalled_probes * windows.probe_timeout_seconds
    # Behind a load balancer the node leaves service while the hung engine reloads, the healthy one with it.
    message = refuse(stack(accelerator="b200", checkpoint="nvfp4", engine={"name": "vllm"},
                           parallelism={"tensorParallel": 4}, capacity={"replicas": 2}))
    assert "field kimi-fleet:parallelism.enginesPerNode (given 2)" in message and "vllm #39863" in message
    assert "load balancer" in message
    # Not on INT4 or another architecture: the recipe's path is Blackwell NVFP4 only.
    for name in ("h200-int4-vllm", "rtxpro6000-nvfp4-vllm", "gb200-int4-vllm"):
        argv = engine_argv(Resolved(load_stack_config(stack_file(name)).spec()), 8000)
        assert "TOKENSPEED_MLA" not in argv, name
    # An engine whose health route generates, or a node with one engine, has nothing to warn about.
    two_sglang = Resolved(load_stack_config(stack_file("mi300x-int4-sglang")).spec())
    assert two_sglang.engines_per_node == 2 and two_sglang.engine.health_runs_generation
    assert health.shared_node_exposure("sglang", "/health_generate", True, 2, windows) is None
    assert health.shared_node_exposure("vllm", "/health", False, 1, windows) is None


@pytest.mark.parametrize("extra", [["--stream-interval", "4"], ["--stream-interval=2"], ["--stream_interval=8"]])
def test_a_stream_interval_above_1_is_refused_while_tools_are_parsed(extra):
    """vllm #45866 / #31501: streamed tool calls are lost with --stream-interval > 1 (issue 23)."""
    message = refuse(stack(engine={"name": "vllm", "extraArgs": extra}))
    given = " ".join(extra) if len(extra) == 2 else extra[0]
    assert f"field kimi-fleet:engine.extraArgs (given {given!r}): --stream-interval above 1 breaks streamed" in message
    assert "vllm #45866" in message and "leave --stream-interval at its default 1" in message


def test_a_stream_interval_of_1_is_accepted():
    parse_spec(stack(engine={"name": "vllm", "extraArgs": ["--stream-interval", "1"]}), "t", "f")


@pytest.mark.parametrize("extra", [["--attention-backend", "FLASHINFER_MLA"], ["--attention_backend=TRITON_MLA"],
                                   ["--block-size", "16"], ["--attention-config.backend=FLASHINFER_MLA"],
                                   ["-ac.backend=FLASHINFER_MLA"],
                                   ["--attention-config.mla_prefill_backend=FLASH_ATTN"]])
def test_extra_args_cannot_override_or_contradict_the_recipes_blackwell_flags(extra):
    """Review of issue 25: the catalog renders the recipe's attention path on Blackwell NVFP4; repeating
    one of its options (or the backend's JSON twin, which makes vLLM refuse to start) is refused."""
    message = refuse(stack(accelerator="b200", checkpoint="nvfp4", parallelism={"tensorParallel": 4},
                           engine={"name": "vllm", "extraArgs": extra}))
    assert "field kimi-fleet:engine.extraArgs" in message and "the catalog renders it on this hardware" in message
    assert "vllm-project/recipes" in message


def test_the_same_options_stay_free_where_no_quirk_renders_them():
    Resolved(parse_spec(stack(engine={"name": "vllm", "extraArgs": ["--block-size", "32"]}), "t", "t.yaml"))
