"""Compatibility rules: each refuses a bad stack with the field, the value and the reason."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from packaging.version import Version

from kimi_fleet import catalog, engine_bugs, engines
from kimi_fleet.engines.flags import argv_problems, load_manifest
from kimi_fleet.launch import engine_argv
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing, size
from kimi_fleet.spec import CONFIG_NAMESPACE

#: Never accepted in extraArgs, for any engine: a key on the command line lands in plain text in
#: launch files and state.
SECRET_FLAGS = {"--api-key": "the proxy holds the key (apiKey secret)", "--hf-token": "hfToken secret",
                "--admin-api-key": "the proxy holds the key (apiKey secret)"}
#: The flags that wire up Kimi's tool calls (refusing them says why).
TOOL_CALL_FLAGS = {"--tool-call-parser", "--enable-auto-tool-choice"}


def managed_flag(arg: str, managed: dict[str, str]) -> str | None:
    """The managed or secret flag an extra argument would set, in any spelling argparse accepts: `_`
    for `-`, `--flag=value`, one dash, and unambiguous prefixes (`--hos` for `--host`, `-tp=4` for
    `--tp`)."""
    if not arg.startswith("-"):
        return None
    name = arg.lstrip("-").split("=", 1)[0].replace("_", "-").lower()
    if not name:
        return None
    for flag in (*managed, *SECRET_FLAGS):
        full = flag.lstrip("-")
        if full == name or full.startswith(name) or name.startswith(full + "."):
            return flag
    return None


def _f(path: str, value) -> str:
    return f"field {CONFIG_NAMESPACE}:{path} (given {value!r})"


Rule = Callable[[Resolved], Iterator[str]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


@rule
def checkpoint_runs_here(r: Resolved) -> Iterator[str]:
    ck, accel, engine = r.checkpoint, r.accelerator, r.spec.engine.name
    if accel.vendor not in ck.vendors:
        yield (f"{_f('checkpoint', ck.id)}: the {ck.quantization} checkpoint does not run on {accel.vendor} "
               f"accelerators ({accel.name}); it runs on {', '.join(ck.vendors)}")
    if engine not in ck.engines:
        yield f"{_f('engine.name', engine)}: checkpoint {ck.id} is served by {', '.join(ck.engines)} only"
    if ck.blackwell_only and not accel.native_fp4:
        yield (f"{_f('checkpoint', ck.id)}: NVFP4 needs Blackwell FP4 tensor cores (sm_100/sm_103/sm_120); "
               f"{accel.name} is {accel.arch} and would only dequantize: use checkpoint int4")
    if ck.repo is None and not r.spec.model.repo:
        yield f"field {CONFIG_NAMESPACE}:model.repo: checkpoint {ck.id} has no public repo ({ck.note}): give yours"
    if r.revision is None:
        known = f"; {ck.revision_source.where}" if ck.revision_source else ""
        yield (f"field {CONFIG_NAMESPACE}:model.revision: no pinned 40-hex commit for {r.repo or ck.id}{known}. "
               f"Look it up (hf api / the repo's commit page) and set model.revision: an unpinned download "
               "changes under a running fleet")


@rule
def engine_fits_vendor(r: Resolved) -> Iterator[str]:
    accel, engine = r.accelerator, r.spec.engine.name
    if accel.vendor not in r.engine.vendors:
        verified = [name for name, profile in catalog.ENGINES.items() if accel.vendor in profile.vendors]
        yield (f"{_f('engine.name', engine)}: no verified {engine} recipe for Kimi-K2.6 on {accel.name} "
               f"({accel.vendor}); engines verified there: {', '.join(verified) or 'none'}")


@rule
def hardware_quirks(r: Resolved) -> Iterator[str]:
    """The catalog's rows for this engine on this hardware: refusals, image needs, head layouts."""
    engine, accel = r.spec.engine.name, r.accelerator
    for quirk in r.quirks:
        if quirk.refuse:
            yield f"{_f('engine.name', engine)} on {accel.name} with checkpoint {r.spec.checkpoint}: {quirk.refuse}"
        if quirk.image_marker and r.image and quirk.image_marker not in r.image:
            yield f"{_f('engine.image', r.image)}: {quirk.image_reason}"
        multiple = quirk.heads_per_rank_multiple
        heads = catalog.KIMI_K26.attention_heads
        if multiple and (heads / r.tensor_parallel) % multiple:
            yield (f"{_f('parallelism.tensorParallel', r.tensor_parallel)}: {engine} on {accel.name} needs tensor "
                   f"parallel <= {heads // multiple}: {heads} heads / {r.tensor_parallel} = "
                   f"{heads / r.tensor_parallel:g} heads per GPU, {quirk.heads_reason} needs a multiple of "
                   f"{multiple}; an 8-GPU node runs two TP{heads // multiple} engines")


@rule
def engine_reads_its_options(r: Resolved) -> Iterator[str]:
    """Options another engine reads are refused, not silently ignored."""
    adapter, spec = r.adapter, r.spec
    for section, options in ((spec.engine, engines.ENGINE_OPTIONS), (spec.parallelism, engines.PARALLELISM_OPTIONS)):
        for attribute, key in options.items():
            value = getattr(section, attribute)
            if attribute not in adapter.options and value != type(section).model_fields[attribute].default:
                yield f"{_f(key, value)}: not an option of {adapter.name}; {adapter.options_hint}"
    yield from adapter.problems(r)


@rule
def parallelism_adds_up(r: Resolved) -> Iterator[str]:
    p, count = r.spec.parallelism, r.spec.accelerator_count
    used = r.gpus_per_engine * r.engines_per_node
    if used != count:
        yield (f"field {CONFIG_NAMESPACE}:parallelism: {r.engines_per_node} engine(s) x {r.gpus_per_engine} GPUs "
               f"(TP {r.tensor_parallel} x DP {r.data_parallel_gpu_factor}) = {used} GPUs, but acceleratorCount "
               f"is {count}")
    heads = catalog.KIMI_K26.attention_heads
    if heads % r.tensor_parallel:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        if p.tensor_parallel is None:  # the user set the accelerators, not the tensor parallel
            yield (f"{_f('acceleratorCount', count)}: one engine spans every accelerator by default, and tensor "
                   f"parallel {r.tensor_parallel} does not divide the model's {heads} attention heads; use an "
                   f"acceleratorCount of {divisors} (or set parallelism.tensorParallel and enginesPerNode)")
        else:
            yield (f"{_f('parallelism.tensorParallel', r.tensor_parallel)}: must divide the model's {heads} "
                   f"attention heads: one of {divisors}")
    if p.dp_attention and (p.data_parallel < 2 or r.tensor_parallel % p.data_parallel):
        yield (f"{_f('parallelism.dataParallel', p.data_parallel)}: DP attention needs dataParallel >= 2 "
               f"dividing tensorParallel {r.tensor_parallel}")


@rule
def image_is_right(r: Resolved) -> Iterator[str]:
    engine, accel = r.spec.engine.name, r.accelerator
    if r.image is None:
        yield (f"field {CONFIG_NAMESPACE}:engine.image: the catalog has no {engine} image for {accel.arch}; "
               "name a pinned one")
        return
    entry = r.image_entry
    if entry is not None:
        if entry.engine != engine:
            yield f"{_f('engine.image', r.image)}: this is a {entry.engine} image, engine is {engine}"
        if accel.arch not in entry.archs:
            yield (f"{_f('engine.image', r.image)}: built for {', '.join(entry.archs)}, not {accel.arch} "
                   f"({accel.name}); 'no kernel image is available' at start")
        minimum = r.checkpoint.min_engine_versions.get(engine)
        if minimum and Version(entry.version) < Version(minimum):
            yield (f"{_f('engine.image', r.image)}: {engine} {entry.version} is older than {minimum}, the first "
                   f"version known to serve checkpoint {r.checkpoint.id}")


@rule
def engine_parser_accepts_the_command_line(r: Resolved) -> Iterator[str]:
    """The argv, extraArgs included, against the recorded parser of the image's engine release."""
    entry = r.image_entry
    manifest = load_manifest(r.spec.engine.name, entry.package_version) if entry else None
    if manifest is None or r.image is None:
        return
    extra = r.spec.engine.extra_args
    # Every node's line of a multi-node replica (the leader's and the headless workers').
    problems = dict.fromkeys(problem for rank in range(r.nodes_per_replica)
                             for problem in argv_problems(engine_argv(r, r.engine.port, rank)[
                                 len(r.adapter.entrypoint_words(r)):], manifest))
    for problem in problems:
        flag = problem.split(":", 1)[0].split()[0]
        if any(arg.split("=", 1)[0] == flag for arg in extra):
            yield f"field {CONFIG_NAMESPACE}:engine.extraArgs (given {list(extra)!r}): {problem}"
        else:
            yield f"{_f('engine.image', r.image)}: its engine's parser refuses what kimi-fleet renders: {problem}"


@rule
def engine_flags_are_coherent(r: Resolved) -> Iterator[str]:
    e = r.spec.engine
    if e.language_model_only and e.mm_encoder_tp_mode == "data":
        yield (f"{_f('engine.mmEncoderTpMode', 'data')}: languageModelOnly drops the vision encoder, so "
               "--mm-encoder-tp-mode data has nothing to shard")
    managed = {**engines.managed_flags(r.adapter), **quirk_rendered_flags(r)}
    for arg in e.extra_args:
        flag = managed_flag(arg, managed)
        if flag in SECRET_FLAGS:
            # The value is not echoed: it may be a real key.
            yield (f"field {CONFIG_NAMESPACE}:engine.extraArgs: {flag} is refused in any spelling: "
                   f"{SECRET_FLAGS[flag]}; a key on a command line ends up in plain text in files and state")
        elif flag:
            why = (": vLLM tool calls need --enable-auto-tool-choice with the kimi_k2 parser, which kimi-fleet "
                   "always renders" if flag in TOOL_CALL_FLAGS else "")
            yield (f"{_f('engine.extraArgs', arg)}: sets {flag}, which kimi-fleet renders "
                   f"(set {managed[flag]}){why}")
    if e.speculative != "off" and not e.speculative_draft_repo:
        yield (f"{_f('engine.speculative', e.speculative)}: needs engine.speculativeDraftRepo; note "
               f"{catalog.EAGLE3_FINDING.summary}")
    allowed = r.engine.kv_dtypes
    if r.kv_cache_dtype not in allowed:
        yield (f"{_f('kvCacheDtype', r.kv_cache_dtype)}: {e.name} accepts {', '.join(sorted(allowed))} for "
               "Kimi's MLA attention")


def quirk_rendered_flags(r: Resolved) -> dict[str, str]:
    """Every spelling of the options the catalog's hardware quirks render for this stack (the release's
    recorded parser gives the aliases of each option, e.g. vLLM's -ac for --attention-config), with the
    quirk that renders them: extraArgs repeating one would override the quirk or, for an option and its
    JSON twin (--attention-backend, --attention-config.backend), stop the engine at start."""
    rendered = {arg.split("=", 1)[0].split(".", 1)[0] for q in r.quirks for arg in q.flags if arg.startswith("-")}
    if not rendered:
        return {}
    entry = r.image_entry
    manifest = load_manifest(r.spec.engine.name, entry.package_version) if entry else None
    options = (manifest or {}).get("options", {})
    dests = {options[flag]["dest"] for flag in rendered if flag in options}
    spellings = rendered | {flag for flag, option in options.items() if option.get("dest") in dests}
    if "attention_backend" in dests:  # the backend is also a key of --attention-config: one or the other
        spellings |= {flag for flag, option in options.items() if option.get("dest") == "attention_config"}
    why = "; ".join(sorted({f"{q.note or 'a hardware quirk'} ({q.source.where})" for q in r.quirks if q.flags}))
    return {flag: f"nothing: the catalog renders it on this hardware: {why}" for flag in sorted(spellings)}


def flag_values(extra_args: list[str], flag: str) -> list[tuple[str, str | None]]:
    """(as given, value) for every extra argument that sets `flag`, in any spelling argparse accepts
    (`--flag N`, `--flag=N`, `_` for `-`, an unambiguous prefix)."""
    found = []
    for index, arg in enumerate(extra_args):
        if managed_flag(arg, {flag: ""}) != flag:
            continue
        if "=" in arg:
            found.append((arg, arg.split("=", 1)[1]))
        else:
            value = extra_args[index + 1] if index + 1 < len(extra_args) else None
            found.append((f"{arg} {value}" if value is not None else arg, value))
    return found


@rule
def no_flag_breaks_tool_calls(r: Resolved) -> Iterator[str]:
    """A flag a known engine bug ties to broken tool calls (engine_bugs.FLAG_BUGS) is refused while
    the engine parses tool calls: agents would lose calls in streams (issue 23)."""
    engine = r.spec.engine.name
    rendered = engine_argv(r, r.engine.port)
    if "--tool-call-parser" not in rendered:
        return
    for bug in engine_bugs.FLAG_BUGS:
        if engine not in bug.engines:
            continue
        for given, value in flag_values(list(r.spec.engine.extra_args), bug.flag):
            try:
                too_high = int(value) > bug.flag_limit
            except (TypeError, ValueError):
                continue  # not a number: the engine's own parser rule refuses it
            if too_high:
                yield (f"{_f('engine.extraArgs', given)}: {bug.flag} above {bug.flag_limit} breaks streamed tool "
                       f"calls with --tool-call-parser kimi_k2 ({bug.ref}: {bug.summary}); {bug.workaround}")


@rule
def engines_sharing_a_node_behind_a_load_balancer_are_judged_by_real_generations(r: Resolved) -> Iterator[str]:
    """Several engines on one node are balanced by its Caddy on the engine's health route. vLLM's
    /health stays green with a hung scheduler (vllm #39863): the watchdog restarts the hung engine,
    and while it reloads the node's ready file is gone, so behind a load balancer the healthy engine
    leaves service with it (a single node or a host keeps serving from it)."""
    engine = r.engine
    if r.engines_per_node > 1 and not engine.health_runs_generation and r.target.behind_load_balancer(r):
        given = r.spec.parallelism.engines_per_node or r.engines_per_node
        yield (f"{_f('parallelism.enginesPerNode', given)}: {r.engines_per_node} {engine.name} engines on a node of a "
               f"fleet behind a load balancer: {engine.health_path} answers 200 with a hung scheduler (vllm #39863), "
               "so the watchdog restarts a hung engine and the node leaves its load balancer until that engine has "
               "reloaded (tens of minutes), taking the healthy engine with it. Run one engine per node "
               "(parallelism.tensorParallel equal to acceleratorCount), or a single node (capacity.replicas 1)")


@rule
def a_stated_node_price_is_only_for_machines_the_catalog_does_not_price(r: Resolved) -> Iterator[str]:
    price = r.spec.capacity.node_hourly_usd
    if price is not None and r.offer is not None:
        yield (f"{_f('capacity.nodeHourlyUsd', price)}: this stack's machine ({r.offer.instance_type}) is priced "
               f"from the catalog's snapshot ({r.offer.source.where}); a stated price is for a machine the catalog "
               "does not price (an SSH host of your own, a cluster's node)")


@rule
def one_replica_across_nodes_is_sound(r: Resolved) -> Iterator[str]:
    """A replica over several nodes: tensor parallel inside each node, one pipeline stage per node,
    on an engine release that spans nodes, over a fabric, never on spot (issue 22)."""
    p, spec = r.spec.parallelism, r.spec
    if p.pipeline_parallel and p.pipeline_parallel != p.nodes:
        yield (f"{_f('parallelism.pipelineParallel', p.pipeline_parallel)}: one pipeline stage per node "
               f"(parallelism.nodes is {p.nodes}): stages inside a node would idle GPUs, and tensor parallel "
               "across nodes puts two all-reduces per layer on the inter-node fabric and keeps a full copy "
               "of the MLA latent KV on every rank (vLLM's multi_node_tp recipe needs an InfiniBand-class fabric)")
    if not r.multi_node:
        return
    support = catalog.MULTI_NODE.get(spec.engine.name)
    version = r.engine_version
    if support is None or version is None or version < Version(support.min_version):
        releases = ", ".join(f"{s.engine} >= {s.min_version}" for s in catalog.MULTI_NODE.values())
        yield (f"{_f('parallelism.nodes', p.nodes)}: {spec.engine.name} {version or '(an image the catalog does not know)'} "
               f"does not span nodes the way kimi-fleet renders it ({releases}: --nnodes/--node-rank and a leader "
               "address); the catalog must know the image's engine release")
    if r.tensor_parallel != spec.accelerator_count:
        yield (f"{_f('parallelism.tensorParallel', r.tensor_parallel)}: a multi-node replica runs tensor parallel "
               f"over each node's {spec.accelerator_count} accelerators (one pipeline stage per node)")
    if p.data_parallel > 1 or p.dp_attention:
        yield (f"{_f('parallelism.dataParallel', p.data_parallel)}: data parallel across nodes (Moonshot's DP16 + "
               "expert parallel) is not rendered: a multi-node replica is tensor parallel inside each node and "
               "one pipeline stage per node, the layout vLLM's recipes give for 16 Hopper GPUs")
    if spec.capacity.scaling is not None:
        yield (f"{_f('capacity.scaling', spec.capacity.scaling.max_replicas)}: a multi-node replica does not scale: "
               "one replica per stack (below), and a second would need a second placement group and fabric check")
    if spec.capacity.replicas > 1:
        yield (f"{_f('capacity.replicas', spec.capacity.replicas)}: one multi-node replica per stack: a fleet's "
               "group, refresh and health treat one instance as one replica, so a rolling refresh would stop "
               "one node of a pair")
    if p.engines_per_node not in (None, 1):
        yield f"{_f('parallelism.enginesPerNode', p.engines_per_node)}: a multi-node replica is one engine per node"
    if p.decode_context_parallel > 1:
        yield (f"{_f('parallelism.decodeContextParallel', p.decode_context_parallel)}: not with a multi-node "
               "replica (kimi-fleet has no recipe or measurement of it)")
    if support and support.pp_refuses_speculative and spec.engine.speculative != "off":
        yield (f"{_f('engine.speculative', spec.engine.speculative)}: {spec.engine.name} cannot run a speculative "
               "draft beside pipeline parallel (vLLM config/vllm.py:2009: EAGLE3's drafter on the last stage gets one "
               "of its three hidden-state inputs; SGLang server_args.py:7250 refuses it)")
    for name in sorted(n for n in spec.engine.env if n.endswith("PP_LAYER_PARTITION")):
        yield (f"{_f(f'engine.env.{name}', spec.engine.env[name])}: the layers per stage are the engine's default "
               "split (vLLM distributed/utils.py:95-140 get_pp_indices), which the plan sizes and each node's "
               "weights fetch follows: another split would load layers whose shards the node did not fetch")
    if spec.capacity.effective_market == "spot":
        yield (f"{_f('capacity.market', 'spot')}: one spot reclaim stops every node of a multi-node replica "
               "(the survivors cannot serve a half model), and AWS places no spot instance that stops on "
               "interruption in a cluster placement group; use on-demand or capacity-block")


@rule
def target_can_provide(r: Resolved) -> Iterator[str]:
    spec, accel = r.spec, r.accelerator
    if r.gpus_per_engine > accel.devices_per_node:
        yield (f"field {CONFIG_NAMESPACE}:acceleratorCount (given {spec.accelerator_count}): one engine needs "
               f"{r.gpus_per_engine} {accel.name} devices but a node holds {accel.devices_per_node}; to span "
               "nodes, set parallelism.nodes (tensor parallel inside each node, one pipeline stage per node)")
    volumes = r.target.weight_volumes
    if r.weights_volume not in volumes:
        yield (f"{_f('weights.volume', r.weights_volume)}: a {spec.target.kind} target stores weights on "
               f"{', '.join(sorted(volumes))}")
    if spec.capacity.effective_market == "capacity-block" and not r.target.sells_capacity_blocks:
        yield f"{_f('capacity.market', 'capacity-block')}: Capacity Blocks are an AWS purchase option"
    if spec.weights.mirror == "managed" and not r.target.fills_managed_mirrors:
        yield (f"{_f('weights.mirror', 'managed')}: a managed mirror is an S3 bucket the program fills on AWS; "
               f"a {spec.target.kind} target fetches from the Hub or from an external s3MirrorUri")
    if spec.weights.source == "s3-mirror" and not r.target.fetches_from_s3_mirror:
        # Otherwise the download would quietly come from the Hub, at a fraction of the rate the
        # sizing (and the download's deadline) assumed for the mirror.
        yield (f"{_f('weights.source', 's3-mirror')}: a {spec.target.kind} target's weights download fetches "
               "from the Hugging Face Hub and verifies every file against its tree (its volume is the "
               "cluster's copy); set weights.source huggingface")
    yield from r.target.problems(r)


def check_rules(resolved: Resolved) -> tuple[list[str], Sizing | None]:
    """Every compatibility problem, and the sizing once the layout itself is sound (the memory fit
    is checked on it, and the caller keeps it: a run sizes a stack once)."""
    problems = [problem for check in RULES for problem in check(resolved)]
    if problems:
        return problems, None
    sizing = size(resolved)
    if not sizing.fits:
        return [f"{_f('contextLength', resolved.spec.context_length)}: does not fit: {sizing.why_not()}"], sizing
    return [], sizing
